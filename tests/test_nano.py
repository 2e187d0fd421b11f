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
    # the shipped tokenizer is this one
    shipped = load_video_llm("nano", None, "cpu", "float32").tokenizer
    assert shipped.get_vocab() == tok.get_vocab()


def test_shipped_checkpoint_answers_held_out_streams(nano):
    """cache=full within the training length, held-out seeds: the issue's target of >= 90% on detail questions,
    and counting well above chance.

    Measured on 1,000 held-out questions (BENCHMARKS.md section 1): detail 100%, count 83%. Here 40 of
    each: a checkpoint at 90% on detail passes with p ~ 0.6, one at the previous 80% fails with p > 0.9; count
    must reach 50% (2.5x chance).
    """
    spec = SyntheticSpec(num_videos=16, duration_s=48, sample_fps=0.5, questions_per_video=5, seed=500,
                         question_types=("detail", "count"))
    engine = StreamingEngine(nano, FullCache(), EngineSettings(max_new_tokens=2, progress=False))
    judge = ExactMatchJudge()
    right: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}

    def on_answer(rec):
        right[rec.qtype].append(judge.judge(rec.question, rec.answer, rec.prediction).correct)

    for video in make_synthetic_dataset(spec):
        engine.run_video(video, on_answer)
    assert len(right["detail"]) >= 30 and len(right["count"]) >= 30
    assert np.mean(right["detail"]) >= 0.9, right["detail"]
    assert np.mean(right["count"]) >= 0.5 > 2 * CHANCE["count"], right["count"]


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
    words. A few steps of that loss alone give every shape word an embedding that picks out its own tokens
    (the trap it guards against: answer words the model cannot yet tell apart drifting to cosine 0.99)."""
    from mukv.data.synthetic import COLOUR_NAMES, SHAPES
    from mukv.models.nano import build_nano
    from mukv.train import TrainSettings, make_probe, pixels_of, visual_tokens

    model, tokenizer = build_nano(seed=0)
    torch.manual_seed(0)
    examples = [make_example(TRAIN_SEED_BASE + i, 3, 0.5, 8.0) for i in range(6)]
    pixels = pixels_of(np.concatenate([ex.frames for ex in examples]))
    probe = make_probe(model, tokenizer, TrainSettings(probe_words=True, probe_cells=True))
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
