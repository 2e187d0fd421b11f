"""The training layouts of mukv_nano compute exactly the attention of the streaming methods they stand for:
the training forward's first-answer-token logits under each layout equal the engine's (or the cache's)
for the same frames and question, with the shipped nano checkpoint."""

from __future__ import annotations

import random

import pytest
import torch

from mukv.cache import FullCache, SlidingWindowCache, UniformSampling
from mukv.cache.base import AnswerContext
from mukv.data.synthetic import TRAIN_SEED_BASE, SyntheticSpec, make_synthetic_dataset
from mukv.engine import EngineSettings, StreamingEngine, decode_attention
from mukv.models.loading import load_video_llm
from mukv.models.rope import RotaryTable
from mukv_nano.examples import TOKENS_PER_FRAME, Example, make_example
from mukv_nano.forward import QuestionBatch, forward_layout, pixels_of, visual_tokens
from mukv_nano.layouts import (
    LAYOUTS,
    block_partition,
    build_layout,
    full_layout,
    mukv_layout,
    subset_layout,
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


def _train_first_logits(llm, frames, question, layout_fn):
    """First-answer-token logits of the training forward for ``question`` over ``frames``."""
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
    assert nano.geometry.tokens_per_frame == TOKENS_PER_FRAME


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


def test_build_layout_draws_each_methods_context_and_keeps_the_evidence():
    """``build_layout`` (what a training step draws): each name gives its method's encoding; the subsets of
    ``rekv`` / ``uniform`` and MuKV's trimmed blocks keep every evidence token; ``uniform`` renumbers frames."""
    n_init, n_frames = 5, 12
    examples = [make_example(TRAIN_SEED_BASE + 40 + i, n_frames, 0.5, 4.0, questions=12) for i in range(3)]
    encodings = {"full": "causal", "uniform": "causal", "window": "window", "rekv": "causal", "mukv": "blocks"}
    assert set(encodings) == set(LAYOUTS)
    for name in LAYOUTS:
        for seed in range(3):
            layout, kept = build_layout(name, examples, n_init, n_frames, random.Random(seed))
            assert layout.encoding == encodings[name] and (kept is not None) == (name == "uniform")
            assert bool(layout.ctx_valid[:, :n_init].all())  # every context keeps the init prompt (the sink)
            for i, ex in enumerate(examples):
                seen = set((layout.ctx_idx[i][layout.ctx_valid[i]] - n_init).tolist())
                if name == "uniform":
                    assert ex.evidence_frames <= set(kept[i]) and kept[i] == sorted(kept[i])
                    ex = ex.keep_frames(kept[i])
                if name != "window":  # a window keeps the last frames only
                    assert {ex.token_index(t) for t in ex.evidence_tokens} <= seen, (name, seed)
    with pytest.raises(ValueError):
        build_layout("nope", examples, n_init, n_frames, random.Random(0))
    blocks = block_partition(10, random.Random(0))  # 10 frames: 2 groups of 4 frames and one of 2
    assert sum(g for _, g in blocks) == 10 * TOKENS_PER_FRAME and [a for a, _ in blocks] == sorted(a for a, _ in blocks)
    assert all(g in (4, 16, 64) for _, g in blocks) and all(a % g == 0 for a, g in blocks)
