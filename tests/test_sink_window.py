"""The sinks of the sink + sliding-window encoding against ReKV's published encoding, written out here.

ReKV's code (``model/attention/kv_cache_manager.py``, ``ContextManager.append`` / ``_append`` /
``get_global_hidden_and_mask``, and ``rope.py``) encodes each call's tokens in blocks of ``exc_block_size``
= tokens per frame. Before a block attends, the init tokens that have left the window of the block's last
query move into the sink (``append_init_len = min(n_init - len(init_k), remainder_len - n_local)``); the
block then attends its window (``0 <= i - j < n_local``, true distances) plus the whole sink unmasked, the
queries rotated by the one-angle helper at index ``n_local`` (which reads ``cos[n_local - 1]``) against
un-rotated sink keys. ``published_encoding`` below replays those steps (stateful, block by block, one
softmax over both parts) on planted tensors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_frames
from test_engine import reference_sink_window, spy_on_fused_parts, stream, stream_layer

from mukv.cache import ReKVCache, SlidingWindowCache
from mukv.cache.attention import SinkWindowKV
from mukv.errors import ConfigError
from mukv.models.adapter import KVGeometry
from mukv.models.rope import RotaryTable

N_INIT, FRAME, N_LOCAL, HQ, HK, D = 3, 4, 10, 4, 2, 16
FRAMES = 8
TOTAL = N_INIT + FRAMES * FRAME


def planted(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, D, 2).double() / D)))
    q, k, v = (torch.randn(1, h, TOTAL, D, generator=g, dtype=torch.float64) for h in (HQ, HK, HK))
    return q, k, v, rope


def published_encoding(q, k, v, rope: RotaryTable, chunk_frames: list[int], n_local: int = N_LOCAL):
    """ReKV's encoding of init + ``chunk_frames`` frames, replayed step by step (float64)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.zeros_like(q)
    # the init prompt: plain causal attention (it fits in the window)
    pos = torch.arange(N_INIT)
    s = rope.rotate(q[..., :N_INIT, :], pos) @ rope.rotate(k[..., :N_INIT, :], pos).transpose(-1, -2) * 0.25
    s = s.masked_fill(~torch.ones(N_INIT, N_INIT, dtype=torch.bool).tril(), float("-inf"))
    out[..., :N_INIT, :] = s.softmax(-1) @ v[..., :N_INIT, :]
    moved = 0  # init tokens already in the sink (init_k)
    call_start = N_INIT
    for frames in chunk_frames:
        length = frames * FRAME
        for st in range(0, length, FRAME):  # exc_block_size = tokens per frame, from the call's start
            a, b = call_start + st, call_start + min(st + FRAME, length)
            # get_global_hidden_and_mask: the remainder holds tokens [moved, b)
            if moved < N_INIT and b - moved > n_local:
                moved += min(N_INIT - moved, b - moved - n_local)
            # window part: keys [a - n_local, b) at positions 0.., queries at their own positions
            lo = max(0, a - n_local)
            q_loc = rope.rotate(q[..., a:b, :], torch.arange(a - lo, b - lo))
            k_loc = rope.rotate(k[..., lo:b, :], torch.arange(0, b - lo))
            dist = torch.arange(a, b)[:, None] - torch.arange(lo, b)[None, :]
            s_loc = (q_loc @ k_loc.transpose(-1, -2) * 0.25).masked_fill(~((dist >= 0) & (dist < n_local)),
                                                                           float("-inf"))
            # sink part: one angle, cos[index - 1] with index = n_local; keys un-rotated; no mask
            q_one = rope.rotate(q[..., a:b, :], torch.full((b - a,), n_local - 1))
            s_init = q_one @ k[..., :moved, :].transpose(-1, -2) * 0.25
            p = torch.cat((s_loc, s_init), -1).softmax(-1)
            out[..., a:b, :] = p @ torch.cat((v[..., lo:b, :], v[..., :moved, :]), -2)
        call_start += length
    return out


def run_layer(layer: SinkWindowKV, q, k, v, rope, chunk_tokens: list[int]) -> torch.Tensor:
    return torch.cat(stream_layer(layer, q, k, v, N_INIT, chunk_tokens, rope), -2)


def test_published_sink_distance_is_n_local_minus_one():
    """(a) Once every init token has left the window, the default layer sees the sinks at n_local - 1,
    as ReKV's one-angle RoPE helper does; the earlier rule (distance n_local) is measurably different."""
    q, k, v, rope = planted(0)
    ref = published_encoding(q, k, v, rope, [2, 3, 1, 2])
    got = run_layer(SinkWindowKV(N_LOCAL, 1024, block_tokens=FRAME), q, k, v, rope, [8, 12, 4, 8])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    settled = slice(N_INIT + N_LOCAL + FRAME, TOTAL)  # all init tokens are sinks only, for every query
    at_n_local = reference_sink_window(q, k, v, N_LOCAL, N_INIT, rope, 0.25)
    assert (at_n_local[..., settled, :] - ref[..., settled, :]).abs().amax() > 1e-3  # the distance matters
    moved = reference_sink_window(q, k, v, N_LOCAL, N_INIT, rope, 0.25, sink_distance=N_LOCAL - 1)
    torch.testing.assert_close(got[..., settled, :], moved[..., settled, :], atol=1e-6, rtol=1e-6)


def test_per_block_handover_sees_init_tokens_twice_and_exact_keeps_the_earlier_values():
    """(b) While the window fills, the init tokens join the sink per frame block, decided by its last
    query, and the whole block sees them as sinks: queries whose window still holds them see them twice.
    Here (3 init tokens, 4-token frames, window 10) the block [7, 11) gets init token 0 as a sink although
    queries 7-9 still hold it in their window, and the block [11, 15) gets all three while query 11 still
    holds token 2; exactly those rows differ from the exact complement. ``sink_handover=exact`` with
    ``sink_distance=n_local`` is the project's earlier encoding."""
    q, k, v, rope = planted(1)
    ref = published_encoding(q, k, v, rope, [2, 3, 1, 2])
    got = run_layer(SinkWindowKV(N_LOCAL, 3, block_tokens=FRAME), q, k, v, rope, [8, 12, 4, 8])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    exact_complement = reference_sink_window(q, k, v, N_LOCAL, N_INIT, rope, 0.25, sink_distance=N_LOCAL - 1)
    differs = (exact_complement - ref).abs().amax(dim=(0, 1, 3)) > 1e-6
    assert differs.nonzero().flatten().tolist() == [7, 8, 9, 11]
    layer = SinkWindowKV(N_LOCAL, 1024, sink_handover="exact", block_tokens=FRAME)
    torch.testing.assert_close(run_layer(layer, q, k, v, rope, [8, 12, 4, 8]), exact_complement,
                               atol=1e-6, rtol=1e-6)
    earlier = SinkWindowKV(N_LOCAL, 3, sink_distance="n_local", sink_handover="exact")  # needs no block size
    torch.testing.assert_close(run_layer(earlier, q, k, v, rope, [8, 12, 4, 8]),
                               reference_sink_window(q, k, v, N_LOCAL, N_INIT, rope, 0.25), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_frames", [[8], [1] * 8, [2, 3, 1, 2], [3, 5]])
@pytest.mark.parametrize("query_block", [1, 3, 7, 1 << 20])
def test_published_encoding_does_not_depend_on_chunks_or_query_blocks(chunk_frames, query_block, monkeypatch):
    """(c) Any cut of the stream into whole-frame chunks (the engine's ``encode_chunk_size``) and any query
    tiling give ReKV's values, on the masked and the fused paths alike."""
    sizes = []
    spy_on_fused_parts(monkeypatch, sizes)
    q, k, v, rope = planted(2)
    ref = published_encoding(q, k, v, rope, chunk_frames)
    torch.testing.assert_close(ref, published_encoding(q, k, v, rope, [8]), atol=1e-12, rtol=1e-12)
    layer = SinkWindowKV(N_LOCAL, query_block, block_tokens=FRAME)
    got = run_layer(layer, q, k, v, rope, [f * FRAME for f in chunk_frames])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    if query_block < N_LOCAL or max(chunk_frames) * FRAME < N_LOCAL:
        assert sizes  # some query block ran as fused parts (the sinks full, init still in its window)


def test_handover_blocks_count_from_the_sink_not_from_the_call():
    """Calls that cut frames give the same values as whole frames: the handover blocks are the frames
    after the init prompt, whatever the calls were."""
    q, k, v, rope = planted(3)
    ref = published_encoding(q, k, v, rope, [8])
    for cut in ([5, 6, 9, 12], [1] * 32, [13, 19]):
        got = run_layer(SinkWindowKV(N_LOCAL, 5, block_tokens=FRAME), q, k, v, rope, cut)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_per_block_handover_needs_a_block_size_and_options_are_checked():
    with pytest.raises(ValueError, match="block_tokens"):
        SinkWindowKV(N_LOCAL)
    SinkWindowKV(None)  # no window (the init prompt, full): no sinks, no block size needed
    with pytest.raises(ValueError, match="sink_distance"):
        SinkWindowKV(N_LOCAL, sink_distance="n_local-1", block_tokens=FRAME)
    with pytest.raises(ValueError, match="sink_handover"):
        SinkWindowKV(N_LOCAL, sink_handover="per_query", block_tokens=FRAME)
    geometry = KVGeometry(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, hidden_size=16,
                          tokens_per_frame=4, dtype_bytes=4)
    for method, name in ((ReKVCache(sink_distance="far"), "cache.sink_distance"),
                         (SlidingWindowCache(sink_handover="never"), "cache.sink_handover")):
        with pytest.raises(ConfigError, match=name):
            method.validate(geometry)
    assert (ReKVCache().sink_distance, ReKVCache().sink_handover) == ("published", "per_block")
    assert (SlidingWindowCache().sink_distance, SlidingWindowCache().sink_handover) == ("published", "per_block")


@pytest.mark.parametrize("method_cls", [ReKVCache, SlidingWindowCache])
def test_methods_encode_with_frame_blocks_whatever_the_engine_chunks(tiny_llm, method_cls):
    """ReKV and sliding_window hand the sinks over per frame of the model (tokens_per_frame): the window's KV
    and the answer are the same for any ``encode_chunk_size`` and ``query_block``, and differ from the
    ``exact`` option's (so the handover is in effect)."""
    t = tiny_llm.geometry.tokens_per_frame
    n_init = len(tiny_llm.init_prompt_ids())
    n_local = 2 * t + n_init - 1  # the first frames still hold init tokens when a block hands them over
    frames = random_frames(6, seed=4)
    runs = []
    for chunk, query_block in ((1, 5), (4, 1024), (6, 7)):
        method = method_cls(n_local=n_local, query_block=query_block)
        answer = stream(tiny_llm, method, frames, chunk).answer("q")[0]
        runs.append((answer.first_token_logits, [L.k for L in method.layers]))
    for logits, keys in runs[1:]:
        torch.testing.assert_close(logits, runs[0][0], atol=1e-5, rtol=1e-5)
        for a, b in zip(keys, runs[0][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    exact = method_cls(n_local=n_local, sink_handover="exact")
    answer = stream(tiny_llm, exact, frames, 2).answer("q")[0]
    assert (answer.first_token_logits - runs[0][0]).abs().max() > 1e-4
