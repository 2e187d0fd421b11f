"""The nano model: the shipped checkpoint loads and answers held-out streams, training reduces the loss, and
the training forward's layouts compute exactly the attention of the streaming methods at inference."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mukv.cache import FullCache, SlidingWindowCache, UniformSampling
from mukv.cache.base import AnswerContext, decode_attention
from mukv.data.synthetic import CHANCE, QUESTION_TYPES, TRAIN_SEED_BASE, SyntheticSpec, make_synthetic_dataset
from mukv.engine import EngineSettings, StreamingEngine
from mukv.judge.exact import ExactMatchJudge
from mukv.models.loading import load_video_llm, model_geometry
from mukv.models.nano import ASSET_DIR, build_word_tokenizer
from mukv.train import (
    TOKENS_PER_FRAME,
    Example,
    QuestionBatch,
    TrainSettings,
    batch_loss,
    forward_layout,
    full_layout,
    make_example,
    mukv_layout,
    pixels_of,
    subset_layout,
    visual_tokens,
    window_layout,
)

ATOL = 2e-4


@pytest.fixture(scope="module")
def nano():
    return load_video_llm("nano", None, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def stream():
    """A held-out stream of 8 frames and its questions (evaluation seed)."""
    (video,) = make_synthetic_dataset(SyntheticSpec(num_videos=1, duration_s=16, sample_fps=0.5,
                                                    questions_per_video=5, question_times="end", seed=99))
    return video.source.frames(0, 8), video.questions


# ------------------------------------------------------------------------------------------ checkpoint
def test_shipped_checkpoint_is_complete_and_small():
    names = {p.name for p in ASSET_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "mukv_nano.json"} <= names
    total = sum(p.stat().st_size for p in ASSET_DIR.iterdir())
    assert total < 20 * 2**20, total
    geo = model_geometry("nano", None, "cpu", "float32")
    assert geo.tokens_per_frame == TOKENS_PER_FRAME


def test_word_tokenizer_round_trip():
    tok = build_word_tokenizer()
    ids = tok("What colour was the star?<|im_end|>", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["what", "colour", "was", "the", "star", "?", "<|im_end|>"]
    assert tok.decode(tok("red", add_special_tokens=False).input_ids + ids[-1:], skip_special_tokens=True) == "red"
    assert tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False).input_ids) == ["[unk]"]
    # with the cell words, the grid's "row r" / "column c" are one token each; other numbers stay apart
    cells = build_word_tokenizer(with_cell_words=True)
    ids = cells("What shape is at row 2 column 4 now? row 7", add_special_tokens=False).input_ids
    assert cells.convert_ids_to_tokens(ids) == ["what", "shape", "is", "at", "row 2", "column 4", "now", "?", "row",
                                                "7"]
    # the shipped tokenizer is the one its recipe trains with
    from mukv.models.nano import read_meta

    shipped = load_video_llm("nano", None, "cpu", "float32").tokenizer
    recipe = read_meta(ASSET_DIR)["settings"].get("cell_words", False)
    assert shipped.get_vocab() == build_word_tokenizer(with_cell_words=recipe).get_vocab()


def test_shipped_checkpoint_answers_held_out_streams(nano):
    """cache=full within the training length, held-out seeds: the issue's target of >= 90% on detail questions,
    and every other type well above chance.

    Measured on 1,000 held-out questions (BENCHMARKS.md section 1): detail 100%, count 100%, current 100%,
    order 78%, motion 75%; here (40 or so of each) detail 100, motion 80, current 100, order 85, count 100
    on count-only streams and on the mixed ones. A checkpoint at 90% on detail passes with p ~ 0.6, one at 80%
    fails with p > 0.9. Current, order and motion must reach 75%: an earlier checkpoint fails order (53%,
    chance 50%), one before it current (34%, chance 33%), and one before that motion (77% in range, fails
    with p ~ 0.5). Count is asked twice: on mixed streams like the benchmark's (50% overall, and 40%, twice
    chance, on the streams that have rings: a checkpoint that only tells none from some, 62% in range, fails
    that), and on streams with count questions only, which show rings but no needles or balls (75%): the
    checkpoint shipped before this one counted 68% in range and 12% there.
    """
    judge = ExactMatchJudge()
    right: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    counted: list[tuple[str, bool]] = []  # (answer, right) of the count questions of the mixed streams

    def on_answer(rec):
        if (rec.qtype,) == spec.question_types:  # not the count questions of streams whose needles ran out
            right[rec.qtype].append(judge.judge(rec.question, rec.answer, rec.prediction).correct)

    def on_mixed_answer(rec):
        if rec.qtype == "count":
            counted.append((rec.answer, judge.judge(rec.question, rec.answer, rec.prediction).correct))

    engine = StreamingEngine(nano, FullCache(), EngineSettings(max_new_tokens=2, progress=False))
    detail = SyntheticSpec(num_videos=16, duration_s=48, sample_fps=0.5, questions_per_video=5, seed=500,
                           question_types=("detail",))
    motion = SyntheticSpec(num_videos=40, duration_s=20, sample_fps=0.5, questions_per_video=1, seed=600,
                           question_types=("motion",), question_times="end")
    current = SyntheticSpec(num_videos=20, duration_s=48, sample_fps=0.5, questions_per_video=2, seed=800,
                            question_types=("current",))
    order = SyntheticSpec(num_videos=20, duration_s=48, sample_fps=0.5, questions_per_video=2, seed=900,
                          question_types=("order",))
    count = SyntheticSpec(num_videos=20, duration_s=48, sample_fps=0.5, questions_per_video=2, seed=700,
                          question_types=("count",))
    mixed = SyntheticSpec(num_videos=40, duration_s=60, sample_fps=0.5, questions_per_video=5, seed=3000)
    for spec in (detail, motion, current, order, count):
        for video in make_synthetic_dataset(spec):
            engine.run_video(video, on_answer)
    for video in make_synthetic_dataset(mixed):
        engine.run_video(video, on_mixed_answer)
    for qtype in ("detail", "motion", "current", "order", "count"):
        assert len(right[qtype]) >= 30, (qtype, len(right[qtype]))
    assert np.mean(right["detail"]) >= 0.9, right["detail"]
    for qtype in ("motion", "current", "order"):
        assert np.mean(right[qtype]) >= 0.75 > CHANCE[qtype] + 0.2, (qtype, right[qtype])
    rings = [ok for answer, ok in counted if answer != "0"]
    assert len(counted) >= 30 and len(rings) >= 15 and len({answer for answer, _ in counted}) >= 3, counted
    assert np.mean([ok for _, ok in counted]) >= 0.5, counted
    assert np.mean(rings) >= 0.4 >= 2 * CHANCE["count"], counted  # counts, not only "none" / "some"
    assert np.mean(right["count"]) >= 0.75, right["count"]  # and counts whatever else is on screen


# ------------------------------------------------------------------------------------------ training
def test_a_few_training_steps_reduce_the_loss():
    from mukv.models import attention_hook
    from mukv.models.adapter import DEFAULT_INIT_PROMPT
    from mukv.models.nano import build_nano
    from mukv.models.rope import RotaryTable

    model, tok = build_nano(seed=0)
    model.model.language_model.config._attn_implementation = attention_hook.register()
    model.train()
    rope = RotaryTable(model.model.language_model.rotary_emb.inv_freq)
    init = tok(DEFAULT_INIT_PROMPT, add_special_tokens=False).input_ids
    examples = [make_example(TRAIN_SEED_BASE + i, 3, 0.5, 8.0) for i in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss, _ = batch_loss(model, rope, tok, init, examples, "full", random.Random(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def _aux_loss_steps(model, extra_params, rope, tok, init, examples, aux, part: str, steps: int) -> list[float]:
    """``steps`` AdamW steps on ``examples`` (full layout) with ``aux``; the value of loss ``part`` at each."""
    opt = torch.optim.AdamW(list(model.parameters()) + list(extra_params), lr=3e-3)
    values = []
    for _ in range(steps):
        parts: dict[str, float] = {}
        loss, _ = batch_loss(model, rope, tok, init, examples, "full", random.Random(0), aux, parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(parts[part])
    return values


def test_count_supervision_is_learned_and_attend_until_releases_the_heads():
    """`train.count_weight`: a few steps with the count head's cross-entropy bring its attention towards
    the rings + init prompt; `train.attend_until` turns the answer-attention supervision off from there on."""
    from mukv.models import attention_hook
    from mukv.models.adapter import DEFAULT_INIT_PROMPT
    from mukv.models.nano import build_nano
    from mukv.models.rope import RotaryTable
    from mukv.train import AuxLosses

    model, tok = build_nano(seed=0)
    model.model.language_model.config._attn_implementation = attention_hook.register()
    rope = RotaryTable(model.model.language_model.rotary_emb.inv_freq)
    init = tok(DEFAULT_INIT_PROMPT, add_special_tokens=False).input_ids
    examples = [make_example(TRAIN_SEED_BASE + i, 6, 0.5, 8.0, types=("count",), questions=1) for i in range(4)]
    aux = AuxLosses(count_weight=5.0, count_layer=1, count_head=3)
    ce = _aux_loss_steps(model, [], rope, tok, init, examples, aux, "count", 6)
    assert ce[-1] < 0.8 * ce[0], ce
    cfg = TrainSettings(attend_weight=0.7, attend_until=0.5)
    assert cfg.attend_weight_at(0.2) == 0.7 and cfg.attend_weight_at(0.5) == 0.0 and cfg.attend_weight_at(0.9) == 0.0
    assert TrainSettings(attend_weight=0.7, attend_until=1.0).attend_weight_at(0.99) == 0.7
    order = TrainSettings(order_weight=0.4, order_until=0.5)
    assert order.order_weight_at(0.49) == 0.4 and order.order_weight_at(0.5) == 0.0


def test_training_never_sees_held_out_seeds():
    from mukv.errors import ConfigError

    with pytest.raises(ConfigError, match="training seeds"):
        make_example(5, 4, 0.5, 4.0)  # an evaluation seed
    with pytest.raises(ConfigError, match="evaluation seeds"):
        SyntheticSpec(seed=TRAIN_SEED_BASE)
    assert TrainSettings().seed * 10_000_000 + TRAIN_SEED_BASE >= TRAIN_SEED_BASE


# ----------------------------------------------------------------------------- layout == streaming methods
def _train_first_logits(llm, frames, question, layout_fn):
    """First-answer-token logits of the training forward for ``question`` over ``frames``."""
    from mukv.models.rope import RotaryTable

    ex = Example(frames, [question], set(), set())
    qb = QuestionBatch(llm.tokenizer, [ex])
    init = llm.init_prompt_ids()
    with torch.no_grad():
        vis = visual_tokens(llm.model, pixels_of(frames)).reshape(1, -1, llm.geometry.hidden_size)
        layout = layout_fn(len(init), vis.shape[1])
        logits = forward_layout(llm.model, RotaryTable(llm.rope.inv_freq), init, vis, qb, layout)
    return logits[0, 0, int(qb.answer_pos[0, 0])].float()


def _engine_first_logits(llm, method, frames, question, chunk=64):
    engine = StreamingEngine(llm, method, EngineSettings(max_new_tokens=1, progress=False))
    method.start_video(llm.init_prompt_ids())
    for a in range(0, len(frames), chunk):
        method.ingest(llm.encode_frames(frames[a: a + chunk]), a)
    answer, _, _ = engine.answer(question.question)
    return answer.first_token_logits


def _context_first_logits(llm, context: AnswerContext, question):
    prompt = llm.question_prompt_ids(question.question)
    attend = decode_attention(context, llm, reserve=len(prompt) + 2)
    with torch.inference_mode():
        return llm.logits(llm.forward(llm.embed_ids(prompt), attend)[:, -1])[0]


def test_visual_tokens_equal_encode_frames(nano, stream):
    frames, _ = stream
    with torch.no_grad():
        got = visual_tokens(nano.model, pixels_of(frames))
    torch.testing.assert_close(got, nano.encode_frames(frames), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [64, 3])
def test_full_layout_equals_full_cache(nano, stream, chunk):
    frames, questions = stream
    for q in questions[:2]:
        want = _engine_first_logits(nano, FullCache(), frames, q, chunk)
        got = _train_first_logits(nano, frames, q, lambda n_init, n_vid: full_layout(1, n_init, n_vid))
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_uniform_layout_equals_uniform_sampling(nano, stream):
    frames, questions = stream
    method = UniformSampling(num_frames=3)
    q = questions[0]
    want = _engine_first_logits(nano, method, frames, q)
    picked = method.sampled_frames()
    assert len(picked) == 3
    got = _train_first_logits(nano, frames[picked], q, lambda n_init, n_vid: full_layout(1, n_init, n_vid))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_local", [40, 100])
def test_window_layout_equals_sliding_window(nano, stream, n_local):
    frames, questions = stream  # 11 init + 128 video tokens: the window slides, the sink is used
    q = questions[1]
    want = _engine_first_logits(nano, SlidingWindowCache(n_local=n_local), frames, q, chunk=2)
    got = _train_first_logits(nano, frames, q, lambda n_init, n_vid: window_layout(1, n_init, n_vid, n_local))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_subset_layout_equals_reindexed_retrieval(nano, stream):
    """ReKV's answer context: frames encoded in the stream, a subset re-rotated to contiguous positions."""
    frames, questions = stream
    picked = [1, 4, 7]
    method = FullCache()
    StreamingEngine(nano, method, EngineSettings(progress=False))
    method.start_video(nano.init_prompt_ids())
    method.ingest(nano.encode_frames(frames), 0)
    n_init = method.n_init
    keep = list(range(n_init)) + [n_init + f * TOKENS_PER_FRAME + t for f in picked for t in range(TOKENS_PER_FRAME)]
    keys = [nano.rope.rotate_range(L.k[..., keep, :], 0) for L in method.layers]
    context = AnswerContext(keys, [L.v[..., keep, :] for L in method.layers], next_position=len(keep))
    q = questions[2]
    want = _context_first_logits(nano, context, q)
    got = _train_first_logits(nano, frames, q, lambda n_init, n_vid: subset_layout(1, n_init, [picked]))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    full = _train_first_logits(nano, frames, q, lambda n_init, n_vid: full_layout(1, n_init, n_vid))
    assert (full - got).abs().max() > 10 * ATOL  # the layouts differ: the test can tell them apart


def test_block_layout_equals_independent_block_encoding(nano, stream):
    """MuKV's layout: every block encoded alone after the init prompt at positions init_len + offset,
    trimmed, assembled with overlapping positions, the prompt at position = cache length."""
    frames, questions = stream
    vis = nano.encode_frames(frames).reshape(-1, nano.geometry.hidden_size)
    blocks = [(0, 64), (64, 16), (80, 16), (96, 4), (100, 4), (104, 4), (108, 4), (112, 16)]
    kept = [[0, 5, 17, 63], list(range(64, 80)), [], [97], [100, 101, 102, 103], [], [110], [112, 120, 127]]
    init_ids = nano.init_prompt_ids()
    n_init = len(init_ids)
    keys = [[] for _ in range(nano.geometry.num_layers)]
    values = [[] for _ in range(nano.geometry.num_layers)]
    for (a, g), kp in zip(blocks, kept, strict=True):
        m = FullCache()
        StreamingEngine(nano, m, EngineSettings(progress=False))
        m.start_video(init_ids)
        m.ingest(vis[a: a + g].reshape(1, g, -1), 0)
        ctx = m.window_context()  # init + block at positions 0 .. init_len + g - 1
        if not keys[0]:
            for i in range(len(keys)):
                keys[i].append(ctx.keys[i][..., :n_init, :])
                values[i].append(ctx.values[i][..., :n_init, :])
        sel = [n_init + t - a for t in kp]
        for i in range(len(keys)):
            keys[i].append(ctx.keys[i][..., sel, :])
            values[i].append(ctx.values[i][..., sel, :])
    keys = [torch.cat(k, dim=-2) for k in keys]
    values = [torch.cat(v, dim=-2) for v in values]
    context = AnswerContext(keys, values, next_position=int(keys[0].shape[-2]))
    for q in questions[:2]:
        want = _context_first_logits(nano, context, q)
        got = _train_first_logits(nano, frames, q,
                                  lambda n_i, n_v: mukv_layout(1, n_i, n_v, blocks, [kept]))
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_asset_folder_is_tracked_by_git_and_packaged():
    root = Path(__file__).resolve().parents[1]
    ignore = (root / ".gitignore").read_text()
    assert "assets" not in ignore
    assert "assets/**/*" in (root / "setup.cfg").read_text()


def test_cell_probe_puts_the_cell_into_the_visual_tokens():
    """`train.probe_cells`: a few steps of the probe loss alone make each visual token say which cell it is
    (chance 1/16; a recipe without it left a fresh linear probe at about 11%)."""
    from mukv.models.nano import build_nano
    from mukv.train import CellProbe, pixels_of, visual_tokens

    model, _ = build_nano(seed=0)
    torch.manual_seed(0)
    examples = [make_example(TRAIN_SEED_BASE + i, 3, 0.5, 8.0) for i in range(4)]
    pixels = pixels_of(np.concatenate([ex.frames for ex in examples]))
    probe = CellProbe(model.config.text_config.hidden_size, cells=True)
    assert CellProbe(model.config.text_config.hidden_size).cell is None  # only when asked
    opt = torch.optim.AdamW(list(model.parameters()) + list(probe.parameters()), lr=3e-3)
    target = torch.arange(16).repeat(len(pixels))

    def cell_accuracy() -> float:
        with torch.no_grad():
            vis = visual_tokens(model, pixels).reshape(-1, model.config.text_config.hidden_size)
            return float((probe.cell(vis).argmax(-1) == target).float().mean())

    before = cell_accuracy()
    _train_probe(model, probe, pixels, examples, opt, 200)
    assert before < 0.25 and cell_accuracy() > 0.8


def _train_probe(model, probe, pixels, examples, opt, steps: int) -> None:
    """``steps`` optimiser steps on the probe loss alone (vision tower, projector and probe)."""
    from mukv.train import visual_tokens

    for _ in range(steps):
        loss = probe.loss(visual_tokens(model, pixels), examples)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_word_probe_grounds_the_answer_words_in_what_they_name():
    """`train.probe_words`: the probe scores each visual token's shape and colour by its cosine to the
    language model's own embeddings of the shape and colour names, and its row and column through the digit
    words (here; the recipe's cell words, `train.cell_words`, take longer to separate the shapes). A few steps of that loss alone give every shape word an embedding that picks out its own tokens
    (the trap it guards against: answer words the model cannot yet tell apart drifting to cosine 0.99)."""
    from mukv.data.synthetic import COLOUR_NAMES, SHAPES
    from mukv.models.nano import build_nano
    from mukv.train import TrainSettings, make_probe, pixels_of, visual_tokens

    model, tokenizer = build_nano(seed=0)
    torch.manual_seed(0)
    examples = [make_example(TRAIN_SEED_BASE + i, 3, 0.5, 8.0) for i in range(6)]
    pixels = pixels_of(np.concatenate([ex.frames for ex in examples]))
    probe = make_probe(model, tokenizer, TrainSettings(probe_words=True, probe_cells=True, cell_words=False,
                                                       parse_weight=0.0))
    embeddings = model.get_input_embeddings().weight
    assert all(p is not embeddings for p in probe.parameters())  # the model owns the words; no copy to train
    shape_ids = tokenizer.convert_tokens_to_ids(list(SHAPES))
    assert len(set(shape_ids)) == len(SHAPES) and len(set(tokenizer.convert_tokens_to_ids(list(COLOUR_NAMES)))) == 6
    shapes = torch.from_numpy(np.concatenate([ex.cell_shape for ex in examples]).reshape(-1))
    drawn = shapes < len(SHAPES)

    def shape_accuracy() -> float:
        """Each drawn token's nearest shape word (cosine), against the shape it shows."""
        with torch.no_grad():
            vis = visual_tokens(model, pixels).reshape(-1, embeddings.shape[1])[drawn]
            sim = F.normalize(vis, dim=-1) @ F.normalize(embeddings[shape_ids], dim=-1).T
            return float((sim.argmax(-1) == shapes[drawn]).float().mean())

    before = shape_accuracy()
    opt = torch.optim.AdamW(list(model.parameters()) + list(probe.parameters()), lr=3e-3)
    _train_probe(model, probe, pixels, examples, opt, 150)
    assert before < 0.5 and shape_accuracy() > 0.9


# ----------------------------------------------------------------------------------- auxiliary signals
@pytest.mark.parametrize("layout_name", ["full", "uniform", "window", "rekv", "mukv"])
def test_attention_targets_mark_each_questions_evidence(layout_name):
    """`train.attend_weight`: the supervised context entries of a question are its evidence, under every
    layout (``uniform`` drops and renumbers frames): the needle of a detail question (its colour), the asked
    cell in the last frame for current (its shape), the four ball tokens of a motion run."""
    from mukv.data.synthetic import COLOUR_NAMES, MOTION_SHAPE, SHAPES
    from mukv.train import _remap_current, attention_targets, build_layout

    n_init, n_frames = 5, 12
    examples = [make_example(TRAIN_SEED_BASE + 40 + i, n_frames, 0.5, 4.0, questions=12) for i in range(4)]
    layout, kept = build_layout(layout_name, examples, n_init, n_frames, random.Random(3))
    if kept is not None:
        examples = [_remap_current(ex, k) for ex, k in zip(examples, kept, strict=True)]
    tok = build_word_tokenizer()
    qb = QuestionBatch(tok, examples)
    targets = attention_targets(layout, examples, qb, n_init, (0,))
    seen = set()
    for i, ex in enumerate(examples):
        for j, q in enumerate(ex.questions):
            video = (layout.ctx_idx[i][targets.target[i, j]] - n_init).tolist()
            frame, cell = np.divmod(np.array(video, dtype=int), TOKENS_PER_FRAME)
            if q.qtype in ("count", "order") or (layout_name == "window" and not video):
                assert not video or q.qtype not in ("count", "order")
                continue
            seen.add(q.qtype)
            if q.qtype == "detail":
                assert len(video) == 1 and COLOUR_NAMES[ex.cell_colour[frame[0], cell[0]]] == q.answer
            elif q.qtype == "current":
                assert len(video) == 1 and frame[0] == len(ex.frames) - 1
                assert SHAPES[ex.cell_shape[frame[0], cell[0]]] == q.answer
            else:
                # a window may hold only the end of the run
                assert (len(video) == 4 or layout_name == "window") and all(SHAPES[ex.cell_shape[f, c]] == MOTION_SHAPE
                                               for f, c in zip(frame, cell, strict=True))
    assert seen == {"detail", "current", "motion"} or layout_name == "window"


def test_attention_targets_supervise_only_the_chosen_types():
    """`train.attend_types`: questions of other types get no target (the recipe supervises "current" only)."""
    from mukv.train import attention_targets, build_layout

    examples = [make_example(TRAIN_SEED_BASE + 40 + i, 8, 0.5, 4.0, questions=12) for i in range(3)]
    layout, _ = build_layout("full", examples, 5, 8, random.Random(0))
    qb = QuestionBatch(build_word_tokenizer(), examples)
    every = attention_targets(layout, examples, qb, 5, (0,))
    current = attention_targets(layout, examples, qb, 5, (0,), "mean", ("current",))
    assert current.head == "mean"
    for i, ex in enumerate(examples):
        for j, q in enumerate(ex.questions):
            assert torch.equal(current.target[i, j], every.target[i, j] if q.qtype == "current"
                               else torch.zeros_like(every.target[i, j]))
    assert current.target.any() and (every.target.sum() > current.target.sum())


def test_evidence_log_mass_is_the_attention_on_the_evidence():
    """The supervised quantity is the softmax attention mass each head puts on the evidence, from the
    answer position, over exactly the keys that position may see; `train.attend_head` picks the best head,
    the heads' mean mass, or one head."""
    from mukv.cache.attention import attention_weights
    from mukv.train import AttentionTargets, _answer_attention

    def _evidence_log_mass(qq, keys, mask, scaling, t, q_len):
        t.record(*_answer_attention(qq, keys, mask, scaling, t.answer_pos, q_len), q_len)
        return t.log_mass[-1]

    torch.manual_seed(0)
    b, h, hk, d, n_q, q_len, c = 2, 4, 2, 8, 3, 5, 7
    qq = torch.randn(b, h, n_q * q_len, d)
    keys = torch.randn(b, hk, c + n_q * q_len, d)
    j = torch.arange(n_q * q_len)
    own = ((j[:, None] // q_len) == (j[None, :] // q_len)) & (j[None, :] <= j[:, None])
    valid = torch.rand(b, c) > 0.2
    mask = torch.cat((valid[:, None, :].expand(b, n_q * q_len, c), own.expand(b, -1, -1)), dim=-1)
    answer_pos = torch.tensor([[2, 4, 1], [3, 0, -1]])
    target = (torch.rand(b, n_q, c) > 0.6) & valid[:, None]
    target[0, 0] = False
    target[0, 0, int(valid[0].nonzero()[0])] = True
    got = _evidence_log_mass(qq, keys, mask, 0.3, AttentionTargets((0,), answer_pos, target), q_len)
    p = attention_weights(qq, keys, 0.3, mask[:, None])
    want = torch.zeros(b, h, n_q)
    for i in range(b):
        for q in range(n_q):
            if answer_pos[i, q] < 0 or not target[i, q].any():
                continue
            row = q * q_len + int(answer_pos[i, q])
            want[i, :, q] = p[i, :, row, :c][:, target[i, q]].sum(-1).log()
            assert torch.allclose(got[i, :, q], want[i, :, q], atol=1e-5), (i, q)
    supervised = target.any(-1) & (answer_pos >= 0)
    for head, reduce in (("best", lambda m: m.amax(1)), ("mean", lambda m: m.exp().mean(1).log()), ("2", lambda m: m[:, 2])):
        t = AttentionTargets((0,), answer_pos, target, head, log_mass=[got])
        assert torch.allclose(t.loss(), -reduce(want)[supervised].mean(), atol=1e-5), head
    assert AttentionTargets((0,), answer_pos, target, "best", log_mass=[got]).loss() <= AttentionTargets(
        (0,), answer_pos, target, "mean", log_mass=[got]).loss()
    # targets among each question's own tokens (the cell words the asked-cell probe reads): only keys the
    # answer position may see count, and a question with no context target is supervised through them
    own_target = torch.rand(b, n_q, q_len) > 0.5
    t = AttentionTargets((0,), answer_pos, torch.zeros_like(target), "best", own_target)
    got = _evidence_log_mass(qq, keys, mask, 0.3, t, q_len)
    for i in range(b):
        for q in range(n_q):
            row = q * q_len + int(answer_pos[i, q])
            seen = own_target[i, q] & (torch.arange(q_len) <= int(answer_pos[i, q]))
            if answer_pos[i, q] < 0 or not seen.any():
                continue
            want = p[i, :, row, c + q * q_len: c + (q + 1) * q_len][:, seen].sum(-1).log()
            assert torch.allclose(got[i, :, q], want, atol=1e-5), (i, q)


def test_count_targets_spread_over_the_rings_in_context_and_the_sink():
    """`train.count_weight`: at a "count" answer the supervised head's target is uniform over the rings the
    layout keeps and the init prompt's n tokens, so that k rings give it k / (k + n) of the mass; the recorded
    loss is the cross-entropy of that head's attention to it."""
    from mukv.cache.attention import attention_weights
    from mukv.models.nano import build_nano
    from mukv.train import (
        CountTargets,
        QuestionBatch,
        _answer_attention,
        _remap_current,
        build_layout,
        count_targets,
        make_example,
    )

    _, tok = build_nano(0)
    n_init = 3
    exs = [make_example(TRAIN_SEED_BASE + s, 16, 0.5, 4.0, types=("count", "detail"), questions=2) for s in range(6)]
    counts = [int(next(q for q in ex.questions if q.qtype == "count").answer) for ex in exs]
    assert [len(ex.ring_tokens) for ex in exs] == counts and max(counts) > 0
    qb = QuestionBatch(tok, exs)
    for name in ("full", "uniform", "rekv", "window"):
        layout, kept = build_layout(name, exs, n_init, 16, random.Random(1))
        seen = exs if kept is None else [_remap_current(ex, k) for ex, k in zip(exs, kept, strict=True)]
        t = count_targets(layout, seen, qb, n_init, 1, 0)
        for i, ex in enumerate(exs):
            # the original video token behind each context entry (None: the init prompt or padding)
            frames = kept[i] if kept is not None else list(range(16))
            original = [None if not v or x < n_init else frames[(x - n_init) // TOKENS_PER_FRAME] * TOKENS_PER_FRAME
                        + (x - n_init) % TOKENS_PER_FRAME for x, v in zip(layout.ctx_idx[i].tolist(),
                                                                         layout.ctx_valid[i].tolist(), strict=True)]
            want = list(range(n_init)) + [k for k, o in enumerate(original) if o in ex.ring_tokens]
            for j, q in enumerate(ex.questions):
                row = t.target[i, j]
                if q.qtype != "count":
                    assert not row.any()
                    continue
                assert (row > 0).nonzero().flatten().tolist() == want, (name, i)
                assert bool(layout.ctx_valid[i, :n_init].all()) and layout.ctx_idx[i, :n_init].tolist() == list(range(n_init))
                assert torch.allclose(row[want], torch.full((len(want),), 1 / len(want)))
            if name == "full":
                assert len(want) == len(ex.ring_tokens) + n_init
    # the loss: cross-entropy of one head's attention at the answer position to the target
    torch.manual_seed(0)
    b, h, d, n_q, q_len, c = 2, 4, 8, 2, 5, 6
    qq, keys = torch.randn(b, h, n_q * q_len, d), torch.randn(b, 2, c + n_q * q_len, d)
    j = torch.arange(n_q * q_len)
    own = ((j[:, None] // q_len) == (j[None, :] // q_len)) & (j[None, :] <= j[:, None])
    mask = torch.cat((torch.ones(b, n_q * q_len, c, dtype=torch.bool), own.expand(b, -1, -1)), dim=-1)
    answer_pos = torch.tensor([[1, 3], [2, -1]])
    target = torch.zeros(b, n_q, c)
    target[0, 1, [0, 2, 5]] = 1 / 3
    target[1, 0, [0]] = 1.0
    t = CountTargets(1, 2, answer_pos, target)
    t.record(*_answer_attention(qq, keys, mask, 0.3, answer_pos, q_len), q_len)
    p = attention_weights(qq, keys, 0.3, mask[:, None])
    want = [-(p[0, 2, q_len + 3, [0, 2, 5]].log().mean()), -p[1, 2, 2, 0].log()]
    assert torch.allclose(t.loss(), torch.stack(want).mean(), atol=1e-5)
    assert CountTargets(1, 2, answer_pos, torch.zeros(b, n_q, c)).loss() is None


def test_motion_probe_reads_the_ball_after_its_first_frame():
    """`train.motion_weight`: the direction probe is trained at the ball tokens of frames 2-4 of a run (the
    first cannot know where the ball goes), labelled with the run's direction; `motion_attend_layers`
    pairs each of them with the ball of the frame before."""
    from mukv.data.synthetic import DIRECTIONS, MOTION_SHAPE, SHAPES
    from mukv.models.nano import build_nano
    from mukv.train import make_motion_probe, previous_ball_targets

    model, tokenizer = build_nano(seed=0)
    probe = make_motion_probe(model, tokenizer, TrainSettings(motion_weight=1.0, motion_layer=1, motion_words=False))
    assert probe is not None and make_motion_probe(model, tokenizer, TrainSettings(motion_weight=0.0)) is None
    examples = [make_example(TRAIN_SEED_BASE + 60 + i, 8, 0.5, 4.0, types=("motion",)) for i in range(3)]
    n_init, d = 4, model.config.text_config.hidden_size
    hidden = torch.zeros(3, n_init + 8 * TOKENS_PER_FRAME, d)
    rows, keys, valid = previous_ball_targets(examples, n_init)
    assert valid.sum() == 9
    for i, ex in enumerate(examples):
        (q,) = ex.questions
        run = [n_init + f * TOKENS_PER_FRAME + c for f, c in zip(q.meta["run_frames"], q.meta["run_cells"], strict=True)]
        assert all(SHAPES[ex.cell_shape[(t - n_init) // 16, (t - n_init) % 16]] == MOTION_SHAPE for t in run)
        assert rows[i][valid[i]].tolist() == run[1:] and keys[i][valid[i]].tolist() == run[:-1]
        # the right direction at frames 2-4, a wrong one at the first frame
        for k, t in enumerate(run):
            hidden[i, t, (DIRECTIONS.index(q.answer) + (0 if k else 1)) % 4] = 1.0
    with torch.no_grad():
        probe.head.weight.zero_()
        probe.head.bias.zero_()
        probe.head.weight[:, :4] = 100.0 * torch.eye(4)
    assert float(probe.loss((None, hidden), examples, n_init).detach()) < 1e-3


def test_order_probe_labels_each_needle_with_the_needles_before_it():
    """`train.order_weight`: at each needle token the probe is asked, per needle shape, whether that needle was
    shown earlier (so the later needle of an order question carries the answer word); `order_attend_layers`
    pairs each needle token with every earlier one."""
    from mukv.data.synthetic import NEEDLE_SHAPES
    from mukv.models.nano import build_nano
    from mukv.train import earlier_needle_targets, make_order_probe

    examples = [make_example(TRAIN_SEED_BASE + 40 + i, 16, 0.5, 8.0, types=("order", "detail"), questions=3)
                for i in range(6)]
    n_init = 5
    orders = 0
    for ex in examples:
        shapes = [shape for _, shape in ex.needle_tokens]
        assert len(set(shapes)) == len(shapes) and set(shapes) <= set(NEEDLE_SHAPES)
        where = {shape: t for t, shape in ex.needle_tokens}
        for q in ex.questions:
            if q.qtype == "order":
                orders += 1
                first, second = q.answer, q.meta["second_shape"]
                assert where[first] // TOKENS_PER_FRAME == q.meta["first_frame"] < where[second] // TOKENS_PER_FRAME
    assert orders >= 4
    rows, keys, valid = earlier_needle_targets(examples, n_init)
    for i, ex in enumerate(examples):
        want = sorted((n_init + t, n_init + u) for t, _ in ex.needle_tokens for u, _ in ex.needle_tokens if u < t)
        assert sorted(zip(rows[i][valid[i]].tolist(), keys[i][valid[i]].tolist(), strict=True)) == want
    model, tok = build_nano(seed=0)
    probe = make_order_probe(model, tok, TrainSettings(order_weight=1.0, order_layer=1))
    assert make_order_probe(model, tok, TrainSettings(order_weight=0.0)) is None
    n_tok = 16 * TOKENS_PER_FRAME
    hidden = tuple(torch.randn(len(examples), n_init + n_tok, model.config.text_config.hidden_size) for _ in range(3))
    logits, labels = [], []
    for i, ex in enumerate(examples):
        for t, _ in ex.needle_tokens:
            logits.append(probe.logits(hidden[1][i, n_init + t]))
            labels.append([float(any(u < t and other == s for u, other in ex.needle_tokens)) for s in NEEDLE_SHAPES])
    want = F.binary_cross_entropy_with_logits(torch.stack(logits), torch.tensor(labels))
    assert torch.allclose(probe.loss(hidden, examples, n_init), want)
    assert 0 < sum(map(sum, labels)) < len(labels) * len(NEEDLE_SHAPES)


def test_motion_probe_scores_against_the_direction_words():
    """`train.motion_words`: the probe's class scores are dot products with the direction words' embeddings,
    so its gradient reaches those words (and moving a word moves its score)."""
    from mukv.data.synthetic import DIRECTIONS
    from mukv.models.nano import build_nano
    from mukv.train import make_motion_probe

    model, tokenizer = build_nano(seed=0)
    probe = make_motion_probe(model, tokenizer, TrainSettings(motion_weight=1.0, motion_words=True))
    ids = tokenizer.convert_tokens_to_ids(list(DIRECTIONS))
    h = torch.randn(5, model.config.text_config.hidden_size)
    words = model.get_input_embeddings().weight
    z = probe.head(torch.nn.functional.layer_norm(h, h.shape[-1:]))
    assert torch.allclose(probe.logits(h), z @ words[ids].T, atol=1e-5)
    probe.logits(h)[:, 3].sum().backward()
    assert words.grad[ids[3]].abs().sum() > 0 and words.grad[ids[0]].abs().sum() == 0


def test_asked_cell_probe_reads_current_answers_through_the_cell_words():
    """`train.parse_weight`: the probe is trained at the answer position of "current" questions only, labelled
    with the asked row and column, and scores them against the "row r" / "column c" embeddings."""
    from mukv.data.synthetic import GRID
    from mukv.models.nano import build_nano, cell_words
    from mukv.train import build_layout, make_parse_probe

    model, tok = build_nano(seed=0, with_cell_words=True)
    cfg = TrainSettings(cell_words=True, parse_weight=1.0, parse_layer=1)
    probe = make_parse_probe(model, tok, cfg)
    assert make_parse_probe(model, tok, TrainSettings(parse_weight=0.0)) is None
    examples = [make_example(TRAIN_SEED_BASE + 80 + i, 4, 0.5, 4.0, types=("current", "detail"), questions=2)
                for i in range(3)]
    qb = QuestionBatch(tok, examples)
    n_context, d = 7, model.config.text_config.hidden_size
    hidden = torch.randn(3, n_context + qb.n_q * qb.q_len, d, requires_grad=True)
    loss = probe.loss((None, hidden), examples, qb, n_context)
    loss.backward()
    touched = {(i, t) for i, t in (hidden.grad.abs().sum(-1) > 0).nonzero().tolist()}
    want = {(i, n_context + j * qb.q_len + int(qb.answer_pos[i, j])) for i, ex in enumerate(examples)
            for j, q in enumerate(ex.questions) if q.qtype == "current"}
    assert want and touched == want
    # the class scores are the maps against the cell words' embeddings
    ids = tok.convert_tokens_to_ids(cell_words())
    h = torch.randn(2, d)
    words = model.get_input_embeddings().weight
    rows, cols = probe.logits(h)
    hn = F.layer_norm(h, (d,))
    assert torch.allclose(rows, probe.row(hn) @ words[ids[:GRID]].T, atol=1e-5)
    assert torch.allclose(cols, probe.col(hn) @ words[ids[GRID:]].T, atol=1e-5)
    # its attention targets: each current question's "row r" and "column c" tokens, nothing in the context
    layout, _ = build_layout("full", examples, n_context, 4, random.Random(0))
    targets = probe.attention_targets(layout, examples, qb)
    assert targets.layers == cfg.parse_attend_layers and not targets.target.any()
    for i, ex in enumerate(examples):
        for j, q in enumerate(ex.questions):
            words = tok.convert_ids_to_tokens(qb.ids[i, j][targets.question_target[i, j]].tolist())
            cell = q.meta["cell"] if q.qtype == "current" else None
            assert words == ([] if cell is None else [f"row {cell // GRID + 1}", f"column {cell % GRID + 1}"])
    detail_only = [make_example(TRAIN_SEED_BASE + 90, 4, 0.5, 4.0, types=("detail",), questions=1)]
    assert probe.loss((None, hidden), detail_only, QuestionBatch(tok, detail_only), n_context) is None


def test_answer_word_separation_pushes_collapsed_words_apart():
    """`train.separate_weight`: zero while an answer set's embeddings are below the margin, positive when two
    words collapse, and a few gradient steps on it alone bring the pair below the margin."""
    from mukv.train import answer_word_separation

    words = torch.nn.Embedding(6, 16)
    with torch.no_grad():
        words.weight.copy_(torch.eye(6, 16))
    assert float(answer_word_separation(words, [[0, 1, 2], [3, 4]], 0.2).detach()) == 0.0
    with torch.no_grad():
        words.weight[1] = words.weight[0] + 0.05 * torch.randn(16)  # "up" and "down" at cosine ~0.98
    opt = torch.optim.SGD(words.parameters(), lr=0.5)
    first = float(answer_word_separation(words, [[0, 1, 2], [3, 4]], 0.2).detach())
    assert first > 0.1
    for _ in range(50):
        opt.zero_grad()
        answer_word_separation(words, [[0, 1, 2], [3, 4]], 0.2).backward()
        opt.step()
    e = torch.nn.functional.normalize(words.weight[:2], dim=-1)
    assert float((e[0] @ e[1]).detach()) < 0.3


# ------------------------------------------------------------------------------------ recall diagnostic
def _evidence_rows(nano, method, videos) -> list:
    rows = []
    engine = StreamingEngine(nano, method, EngineSettings(max_new_tokens=1, progress=False))
    for video in videos:
        engine.run_video(video, rows.append)
    return [r for r in rows if r.qtype in ("detail", "current", "motion")]


@pytest.fixture(scope="module")
def recall_videos():
    """Held-out streams of 24 frames with detail, current and motion questions spread over the stream."""
    return make_synthetic_dataset(SyntheticSpec(num_videos=2, duration_s=48, sample_fps=0.5, questions_per_video=6,
                                                seed=321, question_types=("detail", "current", "motion")))


def test_recalled_evidence_full_window_and_uniform(nano, recall_videos):
    """`evidence_recalled` is the share of a question's evidence cells in the context the method recalled:
    everything for the full cache, the needle's tokens iff its frame lies in the window or the sample."""
    from mukv.cache.uniform import UniformSampling as Uniform

    full = _evidence_rows(nano, FullCache(), recall_videos)
    assert full and all(r.evidence_recalled == 1.0 for r in full)
    window = _evidence_rows(nano, SlidingWindowCache(n_local=4 * TOKENS_PER_FRAME), recall_videos)
    for r in window:
        frames = [f for f, _ in r.meta["evidence_cells"]]
        want = sum(f >= r.frames_seen - 4 for f in frames) / len(frames)
        assert r.evidence_recalled == want, (r.qtype, frames, r.frames_seen)
    assert {r.evidence_recalled for r in window} >= {0.0, 1.0}
    uniform = _evidence_rows(nano, Uniform(num_frames=5), recall_videos)
    for r in uniform:
        sample = set(np.linspace(0, r.frames_seen - 1, 5).round().astype(int).tolist())
        frames = [f for f, _ in r.meta["evidence_cells"]]
        assert r.evidence_recalled == sum(f in sample for f in frames) / len(frames)


@pytest.mark.parametrize("patch_layout", ["raster", "quadrant"])
def test_recalled_evidence_mukv_and_rekv(nano, recall_videos, patch_layout):
    """MuKV records which video token each kept token is (raster or quadrant patch blocks): untrimmed, with
    every block recalled, all evidence is in context; trimmed, a needle counts only if its own token was
    kept. ReKV retrieving every frame recalls everything."""
    from mukv.cache import CACHE_METHODS
    from mukv.engine import evidence_recalled

    mukv = CACHE_METHODS["mukv"](top_k=[1000, 1000, 1000], keep_ratio=[1.0, 1.0, 1.0], patch_layout=patch_layout)
    rows = _evidence_rows(nano, mukv, recall_videos)
    assert rows and all(r.evidence_recalled == 1.0 for r in rows)
    for b in mukv.store.blocks:
        toks = np.array(b.meta["video_tokens"])
        frame, cell = np.divmod(toks, TOKENS_PER_FRAME)
        if len(toks) == 4:  # a patch block: 4 consecutive raster cells, or one 2x2 quadrant of a frame
            rows_, cols = np.divmod(cell, 4)
            if patch_layout == "raster":
                assert (np.diff(toks) == 1).all()
            else:
                assert len(set(frame)) == 1 and np.ptp(rows_) == 1 and np.ptp(cols) == 1
                assert set(rows_ % 2) == {0, 1} and rows_.min() % 2 == 0 and cols.min() % 2 == 0
        else:
            assert (np.diff(toks) == 1).all() and toks[0] % 4 == 0
    # published keep ratios: 0.1 of a 4-token patch block is 0 tokens, so patch blocks are kept whole (as the
    # published trimming returns them) and, every block recalled, all evidence is in context
    published = CACHE_METHODS["mukv"](top_k=[1000, 1000, 1000], patch_layout=patch_layout)
    rows = _evidence_rows(nano, published, recall_videos[:1])
    assert rows and all(r.evidence_recalled == 1.0 for r in rows)
    trimmed = CACHE_METHODS["mukv"](top_k=[1000, 1000, 1000], patch_layout=patch_layout, keep_floor="one")
    rows = _evidence_rows(nano, trimmed, recall_videos[:1])
    kept = {t for b in trimmed.store.blocks for t in b.meta["video_tokens"]}
    assert any(r.evidence_recalled < 1.0 for r in rows)
    for r in rows:  # every block is recalled: recall is exactly what trimming kept
        assert r.evidence_recalled == evidence_recalled(
            r.meta, [t for t in kept if t < r.frames_seen * TOKENS_PER_FRAME], TOKENS_PER_FRAME)
    rekv = _evidence_rows(nano, CACHE_METHODS["rekv"](retrieve_size=64), recall_videos)
    assert rekv and all(r.evidence_recalled == 1.0 for r in rekv)


def test_evidence_recalled_falls_back_to_frames():
    """A model with more visual tokens per frame than grid cells: recall is counted by frame; methods that
    recall whole frames report frames."""
    from mukv.engine import evidence_recalled

    meta = {"evidence_cells": [[2, 5], [3, 6]], "grid": 4}
    assert evidence_recalled(meta, [2 * 16 + 5], 16) == 0.5
    assert evidence_recalled(meta, [2 * 16 + 4, 3 * 16 + 6], 16) == 0.5
    assert evidence_recalled(meta, [2 * 196 + 100], 196) == 0.5
    assert evidence_recalled(meta, None, 16) is None and evidence_recalled({}, [1], 16) is None
    assert evidence_recalled(meta, None, 16, frames=[3, 9]) == 0.5  # methods that recall whole frames
    assert evidence_recalled(meta, range(2 * 16 + 5, 3 * 16 + 7), 16) == 1.0  # a window


def test_encoding_supervision_can_be_kept_to_chosen_heads():
    """`train.order_attend_heads` / `motion_attend_heads`: the encoding pattern is scored on those heads only
    (the best of them), so two patterns can be given separate heads of one layer; out-of-range or negative
    heads are refused by name."""
    from mukv.errors import ConfigError
    from mukv.models.nano import build_nano
    from mukv.models.rope import RotaryTable
    from mukv.train import EncodingTargets, _encoding_log_prob, make_motion_probe, make_order_probe

    torch.manual_seed(0)
    d, n = 16, 6
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    qe, ke = torch.randn(1, 4, n, d), torch.randn(1, 2, n, d)
    rows, keys, valid = torch.tensor([[3, 5]]), torch.tensor([[1, 2]]), torch.tensor([[True, True]])
    mass: list = []
    every = _encoding_log_prob(qe, ke, 0.25, EncodingTargets((0,), rows, keys, valid, head_mass=mass), rope)
    per_head = mass[0]  # (H,) the mean attention of each head on the pairs
    for heads in ((0,), (2, 3), (1, 3)):
        got = _encoding_log_prob(qe, ke, 0.25, EncodingTargets((0,), rows, keys, valid, heads=heads), rope)
        single = [_encoding_log_prob(qe, ke, 0.25, EncodingTargets((0,), rows, keys, valid, heads=(h,)), rope)
                  for h in heads]
        torch.testing.assert_close(got, torch.stack(single).amax(0))
        assert (got <= every + 1e-6).all()
    assert per_head.shape == (4,)
    best = int(per_head.argmax())
    others = tuple(h for h in range(4) if h != best)
    assert not torch.allclose(_encoding_log_prob(qe, ke, 0.25, EncodingTargets((0,), rows, keys, valid, heads=others),
                                                 rope), every)  # leaving out the best head changes the score
    model, tok = build_nano(seed=0)
    settings = TrainSettings(order_attend_heads=(0, 1), motion_attend_heads=(2, 3))
    assert make_order_probe(model, tok, settings).attend_heads == (0, 1)
    assert make_motion_probe(model, tok, settings).attend_heads == (2, 3)
    with pytest.raises(ConfigError, match="train.order_attend_heads"):
        TrainSettings(order_attend_heads=(-1,))


def test_streams_can_carry_a_subset_of_the_types_and_the_model_its_own_head_count():
    """`train.subset_share`: that share of all-type streams carries a random non-empty subset of the types (a
    count-only stream then shows no needle and no ball); other steps keep theirs. `train.text_heads` /
    `text_kv_heads` build the language model with those heads, and counts it cannot have are refused by name."""
    from mukv.data.synthetic import MOTION_SHAPE, SHAPES
    from mukv.errors import ConfigError
    from mukv.models.nano import build_nano
    from mukv.train import stream_types

    rng = random.Random(0)
    assert {stream_types(TrainSettings(subset_share=0.0), QUESTION_TYPES, rng) for _ in range(200)} == {QUESTION_TYPES}
    every = TrainSettings(subset_share=1.0)
    assert stream_types(every, ("detail",), rng) == ("detail",)  # the detail-only steps keep their type
    drawn = [stream_types(every, QUESTION_TYPES, rng) for _ in range(2000)]
    assert all(d and d == tuple(t for t in QUESTION_TYPES if t in d) for d in drawn)
    assert len(set(drawn)) == 2 ** len(QUESTION_TYPES) - 1  # every non-empty subset occurs
    quarter = [stream_types(TrainSettings(subset_share=0.25), QUESTION_TYPES, rng) != QUESTION_TYPES
               for _ in range(4000)]
    assert 0.2 < sum(quarter) / len(quarter) < 0.27
    for i in range(6):
        ex = make_example(TRAIN_SEED_BASE + i, 16, 0.5, 4.0, types=("count",), questions=12)
        assert {q.qtype for q in ex.questions} == {"count"} and ex.needle_tokens == ()
        assert SHAPES.index(MOTION_SHAPE) not in set(ex.cell_shape.ravel().tolist())  # no ball either
    with pytest.raises(ConfigError, match="train.subset_share"):
        TrainSettings(subset_share=1.5)

    default = build_nano(seed=0, **TrainSettings().head_dims())[0].config.text_config
    assert (default.num_attention_heads, default.num_key_value_heads) == (8, 4)  # NANO_DIMS
    settings = TrainSettings(text_heads=4, text_kv_heads=2)  # the recipes before 2026-11-28
    model, _ = build_nano(seed=0, **settings.head_dims())
    text = model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    attn = model.model.language_model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * text.hidden_size // 4
    with pytest.raises(ConfigError, match="train.text_heads"):
        TrainSettings(text_heads=5)  # 192 is not a multiple of 5
    with pytest.raises(ConfigError, match="train.text_kv_heads"):
        TrainSettings(text_heads=8, text_kv_heads=3)


def test_count_probe_reads_the_count_at_count_answers_through_the_digit_words():
    """`train.count_probe_weight`: the readout scores the hidden state at each count answer against the digit
    words' embeddings, its target is the question's count, and a few steps lower its cross-entropy."""
    from mukv.models import attention_hook
    from mukv.models.adapter import DEFAULT_INIT_PROMPT
    from mukv.models.nano import build_nano
    from mukv.models.rope import RotaryTable
    from mukv.train import AuxLosses, QuestionBatch, answer_positions, make_count_probe

    assert make_count_probe(*build_nano(seed=0), TrainSettings(count_probe_weight=0.0)) is None  # 0: off
    model, tok = build_nano(seed=0)
    model.model.language_model.config._attn_implementation = attention_hook.register()
    rope = RotaryTable(model.model.language_model.rotary_emb.inv_freq)
    init = tok(DEFAULT_INIT_PROMPT, add_special_tokens=False).input_ids
    probe = make_count_probe(model, tok, TrainSettings(count_probe_weight=1.0))
    assert tok.convert_ids_to_tokens(probe.digit_ids) == ["0", "1", "2", "3", "4"]
    examples = [make_example(TRAIN_SEED_BASE + 40 + i, 6, 0.5, 8.0, types=("count", "detail"), questions=2)
                for i in range(4)]
    qb = QuestionBatch(tok, examples)
    items, cols, questions = answer_positions(examples, qb, 100, "count")
    assert [q.qtype for q in questions] == ["count"] * 4 and items.tolist() == [0, 1, 2, 3]
    for i, c, q in zip(items.tolist(), cols.tolist(), questions, strict=True):
        j = examples[i].questions.index(q)
        assert c == 100 + j * qb.q_len + int(qb.answer_pos[i, j])
        assert int(qb.answer_tok[i, j]) == tok.convert_tokens_to_ids(q.answer)  # the token that answers it
    assert answer_positions(examples, qb, 100, "motion") is None
    aux = AuxLosses(count_probe=probe, count_probe_weight=1.0)
    ce = _aux_loss_steps(model, list(probe.parameters()), rope, tok, init, examples, aux, "count_probe", 8)
    assert ce[-1] < 0.7 * ce[0], ce
    released = TrainSettings()  # the recipe: on, and count_probe_until stops it halfway
    assert released.weight_at("count_probe", 0.49) == 1.0 and released.weight_at("count_probe", 0.5) == 0.0
