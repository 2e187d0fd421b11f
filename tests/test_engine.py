"""The streaming engine and the first cache methods against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ArrayFrames, random_frames

from mukv.cache import FullCache, SlidingWindowCache, UniformSampling
from mukv.cache.attention import SinkWindowKV
from mukv.data.types import Question, VideoSample
from mukv.engine import EngineSettings, StreamingEngine
from mukv.models.rope import RotaryTable


def stream(llm, method, frames, chunk: int):
    engine = StreamingEngine(llm, method, EngineSettings(encode_chunk_size=chunk, max_new_tokens=4, progress=False))
    method.start_video(llm.init_prompt_ids())
    engine._peak_kv = 0
    engine.encode_until(VideoSample("v", len(frames), [], ArrayFrames(frames)), 0, len(frames), None)
    return engine


def offline_logits(llm, frames, question: str) -> torch.Tensor:
    """One stock transformers forward over init + all frames + prompt (contiguous positions)."""
    vis = llm.encode_frames(frames).reshape(1, -1, llm.geometry.hidden_size)
    emb = torch.cat([llm.embed_ids(llm.init_prompt_ids()), vis, llm.embed_ids(llm.question_prompt_ids(question))], 1)
    with torch.no_grad():
        hidden = llm.language_model(inputs_embeds=emb).last_hidden_state
    return llm.logits(hidden[:, -1])[0]


@pytest.mark.parametrize("chunk,query_block", [(3, 7), (64, 4096), (1, 16)])
def test_full_streaming_equals_offline_forward(tiny_llm, chunk, query_block):
    frames = random_frames(10)
    engine = stream(tiny_llm, FullCache(query_block=query_block), frames, chunk)
    answer, context, _ = engine.answer("what colour was the star?")
    ref = offline_logits(tiny_llm, frames, "what colour was the star?")
    torch.testing.assert_close(answer.first_token_logits, ref, atol=1e-5, rtol=1e-5)
    assert context.online_tokens == len(tiny_llm.init_prompt_ids()) + 10 * tiny_llm.geometry.tokens_per_frame


def test_full_streaming_can_fail_when_a_frame_changes(tiny_llm):
    """The exactness comparison is sensitive: one changed frame changes the logits."""
    frames = random_frames(6)
    engine = stream(tiny_llm, FullCache(), frames, 2)
    answer, _, _ = engine.answer("q")
    other = frames.copy()
    other[2] = 255 - other[2]
    assert (answer.first_token_logits - offline_logits(tiny_llm, other, "q")).abs().max() > 1e-4


# ----------------------------------------------------------------------------- sliding window
def reference_sink_window(q, k, v, n_local: int, n_init: int, rope: RotaryTable, scaling: float,
                          sink_distance: int | None = None, block: int = 1):
    """Attention of every token by definition, one query at a time in float64: keys j with
    0 <= i-j < n_local at distance i-j, and as sinks, at distance ``sink_distance`` (default n_local), the
    init keys j < min(n_init, end - n_local), where ``end`` closes the ``block``-token block of i counted
    from n_init (i + 1 for init queries). ``block=1`` sinks exactly the init keys that left i's window (the
    ``exact`` handover); with ``block`` = tokens per frame and ``sink_distance = n_local - 1`` it is ReKV's
    published encoding, where a query can see an init key twice (window and sink)."""
    q, k, v = q.double(), k.double(), v.double()
    rope64 = RotaryTable(rope.inv_freq.double())
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    n = q.shape[-2]
    out = torch.zeros_like(q)
    sink_at = n_local if sink_distance is None else sink_distance
    for i in range(n):
        end = i + 1 if i < n_init else n_init + ((i - n_init) // block + 1) * block
        seen = [(j, i - j) for j in range(i + 1) if i - j < n_local]
        seen += [(j, sink_at) for j in range(min(n_init, max(0, end - n_local)))]
        scores, values = [], []
        for j, dist in seen:
            qi = rope64.rotate(q[..., i:i + 1, :], torch.tensor([dist]))
            scores.append((qi * k[..., j:j + 1, :]).sum(-1) * scaling)
            values.append(v[..., j:j + 1, :])
        w = torch.cat(scores, -1).softmax(-1)
        out[..., i, :] = (w[..., None] * torch.cat(values, -2)).sum(-2)
    return out


FRAME = 4  # tokens per frame (the handover block) of the layer-level tests


def sink_layer(n_local: int | None, query_block: int, published: bool) -> SinkWindowKV:
    """A layer with the published sinks (the defaults: ReKV's distance n_local - 1, per-frame handover) or
    with the exact handover at distance n_local (the options that keep the project's earlier encoding)."""
    if published:
        return SinkWindowKV(n_local, query_block, block_tokens=FRAME)
    return SinkWindowKV(n_local, query_block, sink_distance="n_local", sink_handover="exact")


def sink_reference(q, k, v, n_local: int | None, n_init: int, rope: RotaryTable, published: bool):
    """``reference_sink_window`` for ``sink_layer``'s two settings (no window: ``n_local=None``)."""
    if n_local is None:
        return reference_sink_window(q, k, v, 10**9, n_init, rope, 0.25)
    if published:
        return reference_sink_window(q, k, v, n_local, n_init, rope, 0.25, sink_distance=n_local - 1, block=FRAME)
    return reference_sink_window(q, k, v, n_local, n_init, rope, 0.25)


def spy_on_fused_parts(monkeypatch, sizes: list[int], band: bool = True) -> None:
    """Record how many parts each fused-parts call of ``SinkWindowKV`` made (one entry per call); ``band``
    False: as on a device with no sliding-window kernel (the window split into unmasked parts)."""
    from mukv.cache import kernels

    parts = SinkWindowKV._fused_parts
    if not band:
        monkeypatch.setattr(kernels, "band_kernel", lambda *a: None)

    def spy(self, *args):
        out = parts(self, *args)
        sizes.append(len(out))
        return out

    monkeypatch.setattr(SinkWindowKV, "_fused_parts", spy)


def stream_layer(layer: SinkWindowKV, q, k, v, n_init: int, chunks: list[int], rope: RotaryTable) -> list:
    """Feed the init tokens (they become the sinks; none with ``n_init`` 0) then ``chunks`` to ``layer``;
    the outputs in order."""
    outs = []
    if n_init:
        outs.append(layer.attend_and_append(q[..., :n_init, :], k[..., :n_init, :], v[..., :n_init, :], 0.25, rope))
        layer.set_init(layer.k, layer.v)
    start = n_init
    for c in chunks:
        outs.append(layer.attend_and_append(q[..., start:start + c, :], k[..., start:start + c, :],
                                            v[..., start:start + c, :], 0.25, rope))
        start += c
    return outs


@pytest.mark.parametrize("published", [True, False], ids=["published", "exact"])
@pytest.mark.parametrize("n_local,chunks,query_block", [(5, [3, 4, 6, 2], 3), (8, [20], 4), (100, [7, 9], 5)])
def test_sink_window_matches_direct_masked_attention(n_local, chunks, query_block, published):
    torch.manual_seed(0)
    n_init, hq, hk, d = 3, 4, 2, 16
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    total = n_init + sum(chunks)
    q, k, v = torch.randn(1, hq, total, d), torch.randn(1, hk, total, d), torch.randn(1, hk, total, d)
    layer = sink_layer(n_local, query_block, published)
    outs = stream_layer(layer, q, k, v, n_init, chunks, rope)
    ref = sink_reference(q, k, v, n_local, n_init, rope, published)
    torch.testing.assert_close(torch.cat(outs, -2).double(), ref, atol=1e-5, rtol=1e-5)
    assert layer.k.shape[-2] == min(n_local, total)


@pytest.mark.parametrize("band", [True, False], ids=["band", "no-band-kernel"])
@pytest.mark.parametrize("published", [True, False], ids=["published", "exact"])
@pytest.mark.parametrize("n_local", [None, 16])
def test_window_attention_runs_as_fused_parts_once_the_window_is_full(n_local, published, band, monkeypatch):
    """Once the window (and the sinks' distance) is full, queries are attended as fused-kernel parts merged
    by log-sum-exp, a whole chunk at once where it is shorter than the window, and still equal attention by
    definition; before that the masked path runs, block by block. The parts: the window in one sliding-window
    call and the sinks; on a device with no sliding-window kernel, the window as unmasked parts (own keys, the
    keys all queries see, the reversed triangle)."""

    sizes = []
    spy_on_fused_parts(monkeypatch, sizes, band)
    torch.manual_seed(1)
    n_init, hq, hk, d, chunks = 3, 4, 2, 16, [40, 33, 50]
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    total = n_init + sum(chunks)
    q, k, v = torch.randn(1, hq, total, d), torch.randn(1, hk, total, d), torch.randn(1, hk, total, d)
    layer = sink_layer(n_local, 7, published)
    outs = stream_layer(layer, q, k, v, n_init, chunks, rope)
    ref = sink_reference(q, k, v, n_local, n_init, rope, published)
    torch.testing.assert_close(torch.cat(outs, -2).double(), ref, atol=1e-5, rtol=1e-5)
    # the window (one call, or 2 parts with no window and 3 with one) and, with a window, the sinks
    assert sizes and max(sizes) == (1 if band else 2 if n_local is None else 3) + (n_local is not None)
    if n_local is None:  # fused parts need no query blocks: one call per chunk
        assert len(sizes) == 1 + len(chunks)
    else:  # chunks longer than the window go block by block; the first blocks take the masked path
        assert 0 < len(sizes) < 1 + sum((c + 6) // 7 for c in chunks)


@pytest.mark.parametrize("published", [True, False], ids=["published", "exact"])
def test_sliding_window_model_matches_reference_forward(tiny_llm, published):
    """The whole model under sliding_window equals one offline forward whose attention is the
    direct masked reference above, and the answer attends to init + the window re-rotated. By default the
    sinks are ReKV's published ones (distance n_local - 1, handed over per frame); the options
    ``sink_distance=n_local``, ``sink_handover=exact`` give the exact complement at distance n_local."""
    frames = random_frames(6)
    t = tiny_llm.geometry.tokens_per_frame
    n_local = 3 * t + 5
    options = {} if published else {"sink_distance": "n_local", "sink_handover": "exact"}
    sinks = {"sink_distance": n_local - 1, "block": t} if published else {}
    method = SlidingWindowCache(n_local=n_local, query_block=11, **options)
    stream(tiny_llm, method, frames, 2)
    n_init = len(tiny_llm.init_prompt_ids())
    vis = tiny_llm.encode_frames(frames).reshape(1, -1, tiny_llm.geometry.hidden_size)
    emb = torch.cat([tiny_llm.embed_ids(tiny_llm.init_prompt_ids()), vis], 1)
    captured = {}

    def reference(idx, q, k, v, scaling):
        captured[idx] = (k, v)
        return reference_sink_window(q, k, v, n_local, n_init, tiny_llm.rope, scaling, **sinks).to(q.dtype)

    tiny_llm.forward(emb, reference)
    for idx, layer in enumerate(method.layers):
        k_ref, v_ref = captured[idx]
        torch.testing.assert_close(layer.k, k_ref[..., -n_local:, :], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.init_k, k_ref[..., :n_init, :], atol=1e-4, rtol=1e-4)
    context = method.recall("q")
    assert context.online_tokens == n_init + n_local
    k0, _ = captured[0]
    expected = tiny_llm.rope.rotate_range(torch.cat([k0[..., :n_init, :], k0[..., -n_local:, :]], -2), 0)
    torch.testing.assert_close(context.keys[0], expected, atol=1e-4, rtol=1e-4)
    assert method.stats().kv_tokens == n_init + n_local


def test_sliding_window_with_everything_in_window_equals_full(tiny_llm):
    frames = random_frames(5)
    full = stream(tiny_llm, FullCache(), frames, 2).answer("q")[0]
    sw = stream(tiny_llm, SlidingWindowCache(n_local=10_000), frames, 2).answer("q")[0]
    torch.testing.assert_close(sw.first_token_logits, full.first_token_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- uniform
def test_uniform_sampling_equals_offline_forward_on_sampled_frames(tiny_llm):
    frames = random_frames(9)
    method = UniformSampling(num_frames=4)
    engine = stream(tiny_llm, method, frames, 4)
    assert method.sampled_frames() == [0, 3, 5, 8] or method.sampled_frames() == [0, 3, 4, 8]
    answer, context, _ = engine.answer("q")
    picked = context.recalled.frames
    torch.testing.assert_close(answer.first_token_logits, offline_logits(tiny_llm, frames[picked], "q"),
                               atol=1e-5, rtol=1e-5)
    assert method.stats().kv_bytes == 0 and method.stats().aux_bytes > 0


# ---------------------------------------------------------------------------------- protocol
def test_run_video_answers_in_time_order_and_encodes_up_to_end_time(tiny_llm):
    frames = random_frames(8)
    qs = [Question("b", "later?", "x", 0, 6.0), Question("a", "early?", "y", 0, 2.5), Question("c", "end?", "z", 0, 8)]
    sample = VideoSample("vid", 8, qs, ArrayFrames(frames, sample_fps=1.0))
    rows = []
    engine = StreamingEngine(tiny_llm, FullCache(), EngineSettings(encode_chunk_size=3, max_new_tokens=3,
                                                                   progress=False))
    record = engine.run_video(sample, rows.append)
    assert [r.qid for r in rows] == ["a", "b", "c"]
    assert [r.frames_seen for r in rows] == [2, 6, 8]
    n_init = len(tiny_llm.init_prompt_ids())
    assert [r.online_tokens for r in rows] == [n_init + 16 * f for f in (2, 6, 8)]
    assert all(r.new_tokens <= 3 and r.latency_s >= r.ttft_s > 0 for r in rows)
    assert record.frames_encoded == 8 and record.kv_bytes == (n_init + 128) * tiny_llm.geometry.kv_bytes_per_token
    # The question's KV is not kept: the cache holds exactly the stream.
    assert record.kv_tokens == n_init + 8 * 16
    assert math.isclose(record.encode_fps, 8 / record.encode_s)


def test_evidence_recalled_is_the_share_of_the_evidence_in_the_recalled_context(tiny_llm):
    """The engine passes what the method recalled (``AnswerContext.recalled``) and the question's meta to
    ``mukv.report.evidence``: every cell for the full cache, the window's frames only for a sliding window
    (its tokens, one per cell of the tiny model's 4 x 4 grid), the sampled frames for uniform sampling, and
    None for a question that names no evidence."""
    meta = {"evidence_cells": [[1, 5], [6, 2]], "grid": 4}
    qs = [Question("a", "where?", "x", 0, 8.0, "detail", meta), Question("b", "what?", "y", 0, 8.0)]
    sample = VideoSample("vid", 8, qs, ArrayFrames(random_frames(8), sample_fps=1.0))

    def evidence(method):
        rows = []
        StreamingEngine(tiny_llm, method, EngineSettings(encode_chunk_size=4, max_new_tokens=1,
                                                         progress=False)).run_video(sample, rows.append)
        return [r.evidence_recalled for r in rows]

    assert evidence(FullCache()) == [1.0, None]
    assert evidence(SlidingWindowCache(n_local=3 * 16)) == [0.5, None]  # frames 5..7 in the window
    assert evidence(UniformSampling(num_frames=2)) == [0.0, None]  # frames 0 and 7
    assert evidence(UniformSampling(num_frames=8)) == [1.0, None]


def test_knobs_are_validated_once(tiny_llm, monkeypatch):
    """The pipeline validates before any weights load and ``bind`` does not check again; a method built by hand
    is validated by ``bind``, and so is one whose knobs changed since it was validated."""
    from mukv.errors import ConfigError

    calls = []
    check = SlidingWindowCache.check_knobs
    monkeypatch.setattr(SlidingWindowCache, "check_knobs", lambda self, g: calls.append(g) or check(self, g))
    settings = EngineSettings(progress=False)
    method = SlidingWindowCache(n_local=64)
    method.validate(tiny_llm.geometry)
    StreamingEngine(tiny_llm, method, settings)
    assert calls == [tiny_llm.geometry]
    by_hand = SlidingWindowCache(n_local=64)
    StreamingEngine(tiny_llm, by_hand, settings)
    assert len(calls) == 2
    by_hand.n_local = 0
    with pytest.raises(ConfigError, match="cache.n_local"):
        StreamingEngine(tiny_llm, by_hand, settings)


def test_skipped_questions_keep_the_chunk_boundaries_of_an_uninterrupted_run(tiny_llm):
    """Resuming (answered questions skipped) encodes the same chunks and gives the same answers."""
    frames = random_frames(9)
    qs = [Question("a", "one?", "x", 0, 2), Question("b", "two?", "y", 0, 5), Question("c", "three?", "z", 0, 9)]
    chunks = []

    class Recording(FullCache):
        def ingest(self, visual, first_frame):
            chunks.append((first_frame, visual.shape[0]))
            super().ingest(visual, first_frame)

    def run(skip):
        chunks.clear()
        rows = []
        engine = StreamingEngine(tiny_llm, Recording(), EngineSettings(encode_chunk_size=2, max_new_tokens=3,
                                                                       progress=False))
        engine.run_video(VideoSample("v", 9, qs, ArrayFrames(frames)), rows.append, skip=skip)
        return rows, list(chunks)

    full_rows, full_chunks = run(())
    resumed_rows, resumed_chunks = run({"a", "b"})
    assert resumed_chunks == full_chunks == [(0, 2), (2, 2), (4, 1), (5, 2), (7, 2)]
    assert [r.qid for r in resumed_rows] == ["c"]
    assert resumed_rows[0].prediction == full_rows[2].prediction
    assert resumed_rows[0].online_tokens == full_rows[2].online_tokens
    # Nothing left to answer (killed after the video's last answer, before its memory row): the video is
    # streamed to its last question all the same, so that its memory row is the uninterrupted run's.
    assert run({"a", "b", "c"}) == ([], full_chunks)


@pytest.mark.parametrize("method_cls", [SlidingWindowCache, "rekv"])
def test_attention_cost_per_token_does_not_grow_with_the_stream(tiny_llm, method_cls):
    """Keys in view per query block stay bounded by n_local + query block + sink, however long the
    stream, and the window holds n_local tokens (a count of operations, not seconds)."""
    from mukv.cache import ReKVCache

    t = tiny_llm.geometry.tokens_per_frame
    n_init = len(tiny_llm.init_prompt_ids())
    bound = None
    for frames in (8, 40):
        method = (ReKVCache if method_cls == "rekv" else method_cls)(n_local=4 * t, query_block=t)
        stream(tiny_llm, method, random_frames(frames, seed=frames), 4)
        seen = max(layer.max_keys_in_view for layer in method.layers)
        assert seen <= 4 * t + t + n_init
        assert all(layer.k.shape[-2] == 4 * t for layer in method.layers)
        bound = seen if bound is None else bound
        assert seen == bound  # 5x the stream, the same cost per query block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sink_window_attention_equals_one_softmax(dtype):
    """The window part in a fused kernel merged with the sink part by log-sum-exp equals one softmax over
    the concatenated scores, including query rows that see no sink key (grouped KV heads)."""
    from mukv.cache import kernels

    g = torch.Generator().manual_seed(0)
    hq, hk, d, lq, lw, ns = 6, 2, 16, 40, 120, 5

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    qa, ka, va, qb, kb, vb = r(1, hq, lq, d), r(1, hk, lw, d), r(1, hk, lw, d), r(1, hq, lq, d), r(1, hk, ns, d), r(1, hk, ns, d)
    qi, kj = torch.arange(lw - lq, lw)[:, None], torch.arange(lw)[None, :]
    band = (kj <= qi) & ((qi - kj) < 64)
    sink = (qi - torch.arange(ns)[None, :]) >= 100  # the first rows have the sink still in their window
    assert (~sink).all(-1).any() and sink.all(-1).any()
    ref = kernels.two_part_attention_reference(qa, ka, va, band, qb, kb, vb, sink, d**-0.5)
    out = kernels.two_part_attention(qa, ka, va, band, qb, kb, vb, sink, d**-0.5)
    # this torch has a mask-taking fused kernel that agrees: the test exercises it
    assert kernels.lse_kernel(torch.device("cpu"), dtype, d, True) is not None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)


def test_a_fused_kernel_is_used_only_where_it_agrees_with_one_softmax(monkeypatch):
    """``lse_kernel`` checks each candidate against the one-softmax reference once, and a kernel for masked
    parts also with a mask: one that is right unmasked but ignores masks serves unmasked parts only."""
    from mukv.cache import kernels

    cpu = torch.device("cpu")

    def wrong_lse(q, k, v, causal, scaling, mask=None):
        out, lse = kernels._cpu_flash(q, k, v, causal, scaling, mask)
        return out, lse + 1.0

    def ignores_mask(q, k, v, causal, scaling, mask=None):
        return kernels._cpu_flash(q, k, v, causal, scaling)

    for kernel, unmasked, masked in ((wrong_lse, None, None), (ignores_mask, ignores_mask, None),
                                     (kernels._cpu_flash, kernels._cpu_flash, kernels._cpu_flash)):
        monkeypatch.setattr(kernels, "_CANDIDATES", {"cpu": [kernel]})
        monkeypatch.setattr(kernels, "_TAKES_MASK", (kernel,))
        monkeypatch.setattr(kernels, "_LSE_KERNELS", {})
        assert kernels.lse_kernel(cpu, torch.float32, 16) is unmasked
        assert kernels.lse_kernel(cpu, torch.float32, 16, True) is masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk,window", [(9, 9, None), (7, 20, None), (30, 79, 50), (30, 60, 8), (12, 12, 5)])
def test_the_sliding_window_kernel_is_the_band_of_one_softmax(dtype, lq, lk, window, monkeypatch):
    """``band_kernel`` (the CPU's here): the queries are the last lq keys, each sees its own and the window - 1
    keys before it (every earlier one with no window); output and log-sum-exp are one softmax's over exactly
    those keys, with grouped KV heads and a batch; a key just outside a query's band does not move it. With no
    window no mask is made (its bias would grow with the context)."""
    from mukv.cache import kernels

    band = kernels.band_kernel(torch.device("cpu"), dtype, 16)
    assert band is not None  # this torch has the CPU flash kernel: the test exercises it
    monkeypatch.setattr(kernels, "_MASKS", {})  # (after the start-up check, which makes masks of its own)
    g = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(3, 6, lq, 16, generator=g).to(dtype)
    k, v = (torch.randn(3, 2, lk, 16, generator=g).to(dtype) for _ in range(2))
    i, j = torch.arange(lk - lq, lk)[:, None], torch.arange(lk)[None, :]
    allowed = (j <= i) & ((j > i - window) if window is not None else True)
    s = (q.float() @ k.float().repeat_interleave(3, dim=1).mT * 0.25).masked_fill(~allowed, float("-inf"))
    out, lse = band(q, k, v, window, 0.25)
    assert not kernels._MASKS if window is None else list(kernels._MASKS)[0][:3] == (lq, lk, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(lse, s.logsumexp(-1), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), s.softmax(-1) @ v.float().repeat_interleave(3, dim=1), atol=tol, rtol=tol)
    if window is not None and lk - lq - window >= 0:  # the key just before the first query's band
        k2 = k.clone()
        k2[..., lk - lq - window, :] += 5.0
        moved = (band(q, k2, v, window, 0.25)[0] - out).float().abs().amax(dim=(0, 1, 3))
        assert moved.max() == 0


def test_the_window_kernel_timing_script_compares_equal_attentions():
    """experiments/window_kernel_cpu.py (BENCHMARKS 5f's CPU wall times) times the one sliding-window call
    against the three parts on the same inputs, and they agree: a row at a small size."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "window_kernel_cpu.py"
    spec = importlib.util.spec_from_file_location("window_kernel_cpu", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cells = [c.strip() for c in script.row(torch.float32, 24, 60, 1).strip("|").split("|")]
    assert cells[:3] == ["float32", "24", "60"] and float(cells[6]) < 1e-5 and cells[5].endswith("x")


def test_a_sliding_window_kernel_is_used_only_where_it_agrees(monkeypatch):
    """``band_kernel`` checks its candidates on bands against one softmax: one that ignores the window (the
    whole suffix instead) or gets the log-sum-exp wrong is not used, and the window then runs as parts."""
    from mukv.cache import kernels

    cpu = torch.device("cpu")

    def ignores_window(q, k, v, window, scaling):
        return kernels._cpu_flash_band(q, k, v, None, scaling)

    def wrong_lse(q, k, v, window, scaling):
        out, lse = kernels._cpu_flash_band(q, k, v, window, scaling)
        return out, lse * 1.01

    for kernel, want in ((ignores_window, None), (wrong_lse, None), (kernels._cpu_flash_band, kernels._cpu_flash_band)):
        monkeypatch.setattr(kernels, "_BAND_CANDIDATES", {"cpu": [kernel]})
        monkeypatch.setattr(kernels, "_BAND_KERNELS", {})
        assert kernels.band_kernel(cpu, torch.float32, 16) is want


@pytest.mark.parametrize("band", [True, False], ids=["band", "no-band-kernel"])
@pytest.mark.parametrize("published", [True, False], ids=["published", "exact"])
def test_a_chunk_shorter_than_the_full_window_is_one_fused_call_per_layer(monkeypatch, published, band):
    """A 30-token chunk into a full 50-token window with 3 sinks: one set of fused parts (no per-block loop),
    the window and the sinks (four with no sliding-window kernel), equal to attention by definition."""

    sizes = []
    spy_on_fused_parts(monkeypatch, sizes, band)
    torch.manual_seed(2)
    n_init, hq, hk, d, chunks = 3, 4, 2, 16, [30, 30, 30, 30]
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    total = n_init + sum(chunks)
    q, k, v = torch.randn(1, hq, total, d), torch.randn(1, hk, total, d), torch.randn(1, hk, total, d)
    layer = sink_layer(50, 8, published)
    outs = stream_layer(layer, q, k, v, n_init, chunks[:-1], rope)
    before = len(sizes)
    outs += stream_layer(layer, q[..., total - chunks[-1]:, :], k[..., total - chunks[-1]:, :],
                         v[..., total - chunks[-1]:, :], 0, chunks[-1:], rope)
    assert sizes[before:] == [2 if band else 4]  # the last chunk: one call of fused parts
    ref = sink_reference(q, k, v, 50, n_init, rope, published)
    torch.testing.assert_close(torch.cat(outs, -2).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("published", [True, False], ids=["published", "exact"])
@pytest.mark.parametrize("n_local", [None, 10])
def test_streaming_attention_gradients_equal_attention_by_definition(n_local, published):
    """Training differentiates through the streaming attention (the nano layouts): queries', keys' and
    values' gradients equal those of the definition. The fused kernels give no gradient through their
    log-sum-exp, so a merge by it (the no-grad fast paths) would get the queries' and keys' wrong."""
    torch.manual_seed(3)
    n_init, hq, hk, d, chunks = 3, 4, 2, 16, [12, 9, 15]
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    total = n_init + sum(chunks)
    leaves = [torch.randn(1, h, total, d, dtype=torch.float64, requires_grad=True) for h in (hq, hk, hk)]
    q, k, v = (x.float() for x in leaves)
    out = torch.cat(stream_layer(sink_layer(n_local, 1 << 20, published), q, k, v, n_init, chunks, rope), -2)
    got = torch.autograd.grad(out.square().sum(), leaves)
    ref = sink_reference(*leaves, n_local, n_init, rope, published)
    want = torch.autograd.grad(ref.square().sum(), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk", [(7, 20), (9, 9), (1, 12), (33, 40)])
def test_causal_suffix_attention_equals_the_masked_call(dtype, lq, lk, monkeypatch):
    """A prefill after a context (queries = the last lq keys) as one sliding-window call with no window, or
    where the device has none, as two unmasked fused parts (the CUDA routes), equals the masked call, with
    grouped KV heads and a batch; with more than one query it does run so, and on the CPU, where the masked
    call is the faster, only there."""
    from mukv.cache import kernels

    calls = []
    monkeypatch.setattr(kernels, "SUFFIX_PARTS_DEVICES", {"cuda", "cpu"})  # the CUDA route, run on the CPU
    band = kernels.band_kernel(torch.device("cpu"), dtype, 16)
    monkeypatch.setattr(kernels, "band_kernel", lambda *a: None)  # a CUDA with no sliding-window kernel
    kernel = kernels.lse_kernel(torch.device("cpu"), dtype, 16)
    assert kernel is not None  # this torch has the CPU kernel: the test exercises the parts
    monkeypatch.setattr(kernels, "lse_kernel", lambda *a: lambda *b: calls.append(b[3]) or kernel(*b))
    g = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(3, 6, lq, 16, generator=g).to(dtype)
    k, v = (torch.randn(3, 2, lk, 16, generator=g).to(dtype) for _ in range(2))
    got = kernels.causal_suffix_attention(q, k, v, 0.25)
    want = kernels.grouped_sdpa(q, k, v, 0.25, kernels.prefix_causal_mask(lq, lk, q.device))
    assert calls == ([] if lq == 1 else [True] + ([False] if lk > lq else []))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    k2 = k.clone()
    k2[..., -1, :] += 1.0  # the last key only matters to the last query: a changed key shows there alone
    moved = (kernels.causal_suffix_attention(q, k2, v, 0.25) - got).float().abs().amax(dim=(0, 1, 3))
    assert moved[-1] > 1e-3 and (lq == 1 or moved[:-1].max() == 0)
    monkeypatch.setattr(kernels, "band_kernel", lambda *a: lambda *b: calls.append(b[3]) or band(*b))
    calls.clear()
    got = kernels.causal_suffix_attention(q, k, v, 0.25)  # with one: a single call with no window
    assert calls == ([] if lq == 1 else [None])
    assert got.dtype == dtype and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    monkeypatch.setattr(kernels, "SUFFIX_PARTS_DEVICES", {"cuda"})
    calls.clear()
    kernels.causal_suffix_attention(q, k, v, 0.25)
    assert calls == []


def test_rotate_range_reuses_cos_sin_and_equals_rotate():
    """A contiguous range's cos / sin are computed once for every layer's rotation (bounded memo) and
    rotate exactly as the positions tensor does; what is kept under inference mode never reaches autograd."""
    d = 16
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    x = torch.randn(2, 3, 9, d)
    computed = []
    tables = rope.tables
    rope.tables = lambda p, dt: computed.append(p) or tables(p, dt)
    for _ in range(24):
        out = rope.rotate_range(x, 5)
    assert len(computed) == 1
    assert torch.equal(out, RotaryTable(rope.inv_freq).rotate(x, torch.arange(5, 14)))
    # bit for bit transformers' own rotation (Qwen2's apply_rotary_pos_emb), fp32 and bf16, strided input too
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    positions = torch.tensor([[3, 0, 7, 1000, 5, 5, 2, 9, 40000]])
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.randn(1, 9, 3, d).to(dtype).transpose(1, 2)  # (1, heads, L, d), not contiguous
        cos, sin = rope.cos_sin(positions, dtype)
        expected, _ = apply_rotary_pos_emb(y, y, cos, sin)
        assert torch.equal(rope.rotate(y, positions[0]), expected)
    for start in range(40):  # many ranges: the memo stays bounded
        rope.rotate_range(x, start)
    assert len(rope._memo) <= RotaryTable.MEMO_RANGES
    with torch.inference_mode():
        rope.rotate_range(x, 100)
    leaf = torch.randn(2, 3, 9, d, requires_grad=True)
    rope.rotate_range(leaf, 100).sum().backward()  # would fail on an inference-mode cos / sin
    assert leaf.grad is not None


def test_stream_forward_builds_no_transformers_mask(tiny_llm, monkeypatch):
    """The stream forward's handler owns the masking, so transformers builds no causal mask and runs no
    packed-sequence check (a host-device wait per decoded token on a GPU), with the same hidden states as a
    plain causal forward."""
    from transformers import masking_utils

    from mukv.cache.attention import ContextKV

    def refuse(*a, **k):
        raise AssertionError("transformers built a mask for a handled forward")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", refuse)
    layers = [ContextKV(torch.zeros(1, tiny_llm.geometry.num_kv_heads, 0, tiny_llm.geometry.head_dim),
                        torch.zeros(1, tiny_llm.geometry.num_kv_heads, 0, tiny_llm.geometry.head_dim), 0)
              for _ in range(tiny_llm.geometry.num_layers)]
    ids = tiny_llm.init_prompt_ids()
    hidden = tiny_llm.forward(tiny_llm.embed_ids(ids),
                              lambda i, q, k, v, s: layers[i].attend_and_append(q, k, v, s, tiny_llm.rope))
    with torch.no_grad():
        want = tiny_llm.language_model(inputs_embeds=tiny_llm.embed_ids(ids).to(tiny_llm.dtype),
                                       attention_mask=torch.ones(1, len(ids), dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(hidden, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(AssertionError, match="built a mask"):  # the same forward without the 4-D mask
        tiny_llm.language_model(inputs_embeds=tiny_llm.embed_ids(ids).to(tiny_llm.dtype), use_cache=False,
                                position_ids=torch.zeros(1, len(ids), dtype=torch.long),
                                mukv_attention=lambda i, q, k, v, s: layers[i].attend_and_append(q, k, v, s, tiny_llm.rope))


# ---------------------------------------------------------------------------------- answer text
def test_answer_text_follows_the_published_code_of_the_method(tiny_llm):
    """MuKV's release keeps newlines, ReKV's removes them, both with the tokenizer's clean-up of spaces
    before punctuation (applied explicitly: transformers 5 ignores the flag for BPE tokenizers); ``spaces``
    is the unpublished newline-to-space-and-strip."""
    from mukv.cache import ReKVCache
    from mukv.cache.mukv import MuKVCache
    from mukv.engine import answer_text

    ids = tiny_llm.tokenize(" It was red , not blue .\nIt isn't \n")
    assert answer_text(tiny_llm, ids, "keep_newlines") == " It was red, not blue.\nIt isn't \n"
    assert answer_text(tiny_llm, ids, "remove_newlines") == " It was red, not blue.It isn't "
    assert answer_text(tiny_llm, ids, "spaces") == "It was red , not blue . It isn't"
    assert MuKVCache.published_answer_text == "keep_newlines" and ReKVCache.published_answer_text == "remove_newlines"
    frames = random_frames(4)
    for method, style in ((FullCache(), "keep_newlines"), (ReKVCache(retrieve_size=2), "remove_newlines")):
        engine = stream(tiny_llm, method, frames, 4)
        answer, _, _ = engine.answer("what colour was the star?")
        assert answer.text == answer_text(tiny_llm, answer.token_ids, style)
        engine.settings.answer_text = "spaces"
        answer, _, _ = engine.answer("what colour was the star?")
        assert answer.text == answer_text(tiny_llm, answer.token_ids, "spaces")


def _stock_attention(llm):
    """Put the language model's attention modules back to their stock classes (undo ``skip_identity_rotation``)."""
    for m in llm.language_model.modules():
        if type(m).__name__.startswith("Unrotated"):
            m.__class__ = type(m).__mro__[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_identity_rotation_is_skipped_bit_for_bit(dtype):
    """LLaVA-OV's layers run at position 0, where their own rotary step is the identity: skipped while a handler
    owns the attention (34 operator calls per layer), with the same hidden states bit for bit in fp32 and bf16;
    plain forwards (no handler: training, references) keep the stock forward and its rotation."""
    from mukv.cache.instrumentation import count_calls
    from mukv.models import attention_hook
    from mukv.models.loading import build_tiny

    llm = build_tiny(0, torch.device("cpu"), dtype, text_layers=3)
    lm = llm.language_model
    assert all(type(layer.self_attn).__name__ == "UnrotatedQwen2Attention" for layer in lm.layers)

    def handler(idx, q, k, v, scaling):  # the handler rotates, at positions of its own
        q, k = llm.rope.rotate_range(q, 5), llm.rope.rotate_range(k, 5)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                enable_gqa=True)

    x = torch.randn(1, 23, llm.geometry.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    positions = torch.arange(5, 28)[None]
    with torch.inference_mode():
        skipped, skipped_calls = llm.forward(x, handler), count_calls(lambda: llm.forward(x, handler)).ops
        plain = lm(inputs_embeds=x, position_ids=positions).last_hidden_state
        _stock_attention(llm)
        stock, stock_calls = llm.forward(x, handler), count_calls(lambda: llm.forward(x, handler)).ops
        plain_stock = lm(inputs_embeds=x, position_ids=positions).last_hidden_state
    assert torch.equal(skipped, stock) and torch.equal(plain, plain_stock)
    assert torch.allclose(skipped.float(), plain.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert stock_calls - skipped_calls >= 30 * len(lm.layers), (stock_calls, skipped_calls)
    assert attention_hook.skip_identity_rotation(lm) == len(lm.layers)


def test_no_rotation_is_skipped_where_it_is_not_the_identity():
    """A rotary embedding that scales q and k (``attention_scaling`` not 1) is not the identity at position 0: its
    step stays; Qwen-VL adapters hand the model real in-frame positions: their layers keep the stock forward."""
    from mukv.models import attention_hook
    from mukv.models.loading import build_tiny
    from mukv.models.qwen_vl import build_qwen_tiny

    llm = build_tiny(0, torch.device("cpu"), torch.float32, text_layers=2)
    _stock_attention(llm)
    llm.language_model.rotary_emb.attention_scaling = 0.5
    assert attention_hook.skip_identity_rotation(llm.language_model) == 0
    assert all(not type(m).__name__.startswith("Unrotated") for m in llm.language_model.modules())
    qwen = build_qwen_tiny("qwen3_vl", (128, 128), 0, torch.device("cpu"), torch.float32)
    assert not qwen.positions_at_zero
    assert all(not type(m).__name__.startswith("Unrotated") for m in qwen.language_model.modules())


def test_parts_fold_into_one_softmax_over_their_union():
    """``merge_parts`` folds any number of parts (lerp by log-sum-exp, one at a time) into the softmax attention
    over the union of their keys; a part no query sees (log-sum-exp -inf) weighs nothing."""
    from mukv.cache import kernels

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 7, 16, generator=g)
    k, v = torch.randn(1, 4, 30, 16, generator=g), torch.randn(1, 4, 30, 16, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)

    def part(a, b):
        s = (q @ k[..., a:b, :].mT) * 0.25
        return s.softmax(-1) @ v[..., a:b, :], s.logsumexp(-1)

    for cuts in ([0, 30], [0, 11, 30], [0, 3, 17, 30], [0, 1, 2, 9, 20, 30]):
        parts = [part(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        assert torch.allclose(kernels.merge_parts(parts, q.dtype), want, atol=1e-5), cuts
    empty = (torch.zeros_like(q), torch.full(q.shape[:-1], float("-inf")))
    got = kernels.merge_parts([part(0, 11), empty, part(11, 30)], q.dtype)
    assert torch.allclose(got, want, atol=1e-5)


def test_mask_memos_keep_the_newest_and_stay_within_their_bytes(monkeypatch):
    """Every layer of a forward asks for the same mask and bias (built once per forward); a context that grows
    asks for a new shape every forward, so the memos drop the oldest past ``MEMO_BYTES`` (the newest is kept)."""
    from mukv.cache import kernels

    monkeypatch.setattr(kernels, "MEMO_BYTES", 3 * 64 * 100 * 4)  # three fp32 biases of 64 x 100
    monkeypatch.setattr(kernels, "_MASKS", {})
    monkeypatch.setattr(kernels, "_BIASES", [])
    for lk in range(100, 400, 20):
        mask = kernels.memo_mask(64, lk, torch.device("cpu"))
        bias = kernels.mask_bias(mask, torch.float32)
        assert kernels.memo_mask(64, lk, torch.device("cpu")) is mask  # the next layer's ask
        assert kernels.mask_bias(mask, torch.float32) is bias
        assert torch.equal(bias == 0, mask) and bool(torch.isneginf(bias[~mask]).all())
        assert sum(b.numel() * 4 for _, _, b in kernels._BIASES) <= kernels.MEMO_BYTES or len(kernels._BIASES) == 1
        assert sum(m.numel() for m in kernels._MASKS.values()) <= kernels.MEMO_BYTES or len(kernels._MASKS) == 1
    assert len(kernels._BIASES) < 4  # the byte bound, not the count, dropped them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_weights_are_the_softmax_of_each_query_heads_logits(dtype):
    """``attention_weights`` meets each KV head's query group in one product (no keys repeated per head): the
    softmax of each query head's logits against its KV head's keys, masked where the mask says, in fp32; a
    query block that is a strided view (queries as the projection leaves them) too."""
    from mukv.cache import kernels

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 9, 6, 16, generator=g).transpose(1, 2).to(dtype)  # (2, 6 heads, 9 queries, 16), strided
    k = torch.randn(2, 2, 20, 16, generator=g).to(dtype)  # 2 KV heads: groups of 3
    mask = kernels.memo_mask(9, 20, torch.device("cpu"))
    want = (q.float() @ k.float().repeat_interleave(3, dim=1).mT * 0.25).masked_fill(~mask, float("-inf"))
    unmasked = q.float() @ k.float().repeat_interleave(3, dim=1).mT * 0.25
    for m, logits in ((None, unmasked), (mask, want)):
        got = kernels.attention_weights(q, k, 0.25, m)
        assert got.dtype == torch.float32 and got.shape == (2, 6, 9, 20)
        torch.testing.assert_close(got, logits.softmax(-1), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(kernels.attention_weights(q, k.flip(1), 0.25, mask), want.softmax(-1))


def test_token_range_is_the_slice_in_one_view_call():
    """``token_range`` is ``x[..., a:b, :]``: the same values, a view of the same storage, one operator call
    (slicing makes two); under autograd a plain slice, gradients as the slice's."""
    from mukv.cache import kernels
    from mukv.cache.instrumentation import count_calls

    x = torch.randn(2, 3, 40, 8).transpose(0, 1)[:, :, 5:]  # strided, with a storage offset
    for a, b in ((0, 35), (3, 20), (34, 35), (7, None)):
        got = kernels.token_range(x, a, b)
        assert torch.equal(got, x[..., a:b, :]) and got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert count_calls(lambda: kernels.token_range(x, 3, 20)).ops == 1
    w = torch.randn(1, 2, 10, 4, requires_grad=True)
    kernels.token_range(w, 2, 6).sum().backward()
    assert torch.equal(w.grad[..., 2:6, :], torch.ones(1, 2, 4, 4)) and float(w.grad.sum()) == 32


def test_scalar_constants_serve_inference_and_autograd_alike(monkeypatch):
    """``kernels.scalar`` memoizes 0-d constants: one made under inference mode (a stream) must still be usable
    where autograd saves it (training after an evaluation)."""
    from mukv.cache import kernels

    monkeypatch.setattr(kernels, "_SCALARS", {})
    with torch.inference_mode():
        first = kernels.scalar(0.375)
        assert torch.equal(torch.ones(3).mul_(first), torch.full((3,), 0.375))
    x = torch.ones(3, requires_grad=True)
    (x * kernels.scalar(0.375)).sum().backward()
    assert kernels.scalar(0.375) is first and torch.equal(x.grad, torch.full((3,), 0.375))
