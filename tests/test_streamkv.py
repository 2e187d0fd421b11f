"""StreamKV: segmentation, layer-adaptive counts and the recent-block rule on planted tensors, and the streaming
method on the tiny model (everything retrieved = the full cache; the guidance prompt's scores; each layer keeps
its top frames and the summary; a question mid-segment is answered as from a fresh encoding up to it; chunks do
not matter; per-layer retrieval counts around retrieve_size)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_frames
from test_engine import stream

import mukv.cache.streamkv as streamkv
from mukv.cache import FullCache
from mukv.cache.base import video_tokens
from mukv.cache.instrumentation import count_calls
from mukv.cache.streamkv import (
    StreamKV,
    layer_counts,
    merge_most_similar,
    rescale_counts,
    select_with_recent,
)
from mukv.errors import ConfigError
from mukv.models.adapter import KVGeometry

TPF = 16


def scenes(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Frames (TPF, 8) repeating one random scene per run, each frame a slight variation."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        scene = torch.randn(TPF, 8, generator=g)
        out += [scene + 1e-3 * torch.randn(TPF, 8, generator=g) for _ in range(n)]
    return out


def segment(frames: list[torch.Tensor], **knobs) -> list[list[list[int]]]:
    """The segments (frame spans) a StreamKV cuts ``frames`` into, the open one last."""
    method = StreamKV(**knobs)
    closed: list = []
    method.encode_segment = lambda fr, spans, kept: closed.append([list(s) for s in spans])
    method.kept, method.open_frames, method.open_spans, method.open_sims, method.previous = None, [], [], [], None
    for i, f in enumerate(frames):
        method._add_frame(f, i)
    return closed + [method.open_spans]


# ------------------------------------------------------------------------------------ planted tensors
def test_segments_cut_at_scene_changes_once_long_enough():
    frames = scenes([5, 2, 6])
    spans = segment(frames, min_segment_frames=3, max_segment_frames=64)
    # cut at the first change; the 2-frame scene is too short to close a segment: its segment takes the next
    # scene's first frame (3 frames) and then the frames like that one
    assert [[s[0] for s in seg] for seg in spans] == [[0, 1, 2, 3, 4], list(range(5, 13))]
    assert segment(frames, min_segment_frames=2)[1] == [[5], [6]]  # with 2 frames it closes at the change
    uniform = segment(frames, segment_mode="uniform", max_segment_frames=4)
    assert [len(seg) for seg in uniform] == [4, 4, 4, 1]


def test_long_segments_merge_their_most_similar_neighbours():
    frames = scenes([7])
    frames[3] = frames[2].clone()  # 2 and 3 are the most similar pair
    spans = segment(frames, min_segment_frames=2, max_segment_frames=6)
    assert spans == [[[0], [1], [2, 3], [4], [5], [6]]]
    feats, spans, sims = list(scenes([4], seed=1)), [[0], [1], [2], [3]], [0.1, 0.9, 0.2]
    merged = (feats[1] + feats[2]) / 2
    merge_most_similar(feats, spans, sims)
    assert spans == [[0], [1, 2], [3]] and torch.equal(feats[1], merged) and len(sims) == 2
    assert sims[0] == pytest.approx(streamkv.frame_similarity(feats[0], merged))


def test_layer_counts_share_one_threshold():
    """A peaked layer reaches the common threshold with fewer blocks than a flat one; the total is near the
    target; every layer keeps at least one."""
    peaked, flat = torch.tensor([9.0] + [0.0] * 19), torch.linspace(0, 1, 20)
    counts = layer_counts([peaked, flat, flat], 30)
    assert counts[0] < counts[1] == counts[2] and abs(sum(counts) - 30) < streamkv.COUNT_TOLERANCE
    assert layer_counts([torch.tensor([1.0]), torch.ones(4)], 4)[0] == 1  # one block / constant scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 151])
def test_every_layers_prompt_mean_query_at_once_is_each_layers_own(dtype, tokens):
    """``question_vectors`` of the layers' prompt queries concatenated (as ``encode_segment`` does after the
    forward) equals ``question_vector`` of each layer's, on the strided views a projection leaves: to fp32
    rounding (the sum runs over another memory layout), not bit for bit."""
    from mukv.cache.retrieval import question_vector, question_vectors

    g = torch.Generator().manual_seed(tokens)
    rows = torch.randn(3, 1, 40 + tokens, 6, 16, generator=g).to(dtype).transpose(2, 3)  # (layers, 1, H, L, d)
    prompts = [r[..., 40:, :] for r in rows]
    want = torch.stack([question_vector(p) for p in prompts])
    torch.testing.assert_close(question_vectors(torch.cat(prompts)), want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(question_vectors(torch.cat(prompts[::-1])), want, atol=1e-3)


@pytest.mark.parametrize("frames", [1, 2, 5, 17, 65])
def test_layer_counts_of_stacked_scores_are_each_layers_own_rule(frames):
    """A segment's scores of every layer at once (a (layers, frames) tensor) give the table of the per-layer rule
    bit for bit (a z-score of each layer's own mean and deviation, constant scores uniform), so the counts too."""
    g = torch.Generator().manual_seed(frames)
    scores = 3 * torch.randn(24, frames, generator=g)
    scores[5] = 0.25  # a constant layer
    table = streamkv._cumulative_shares(scores, dim=1)
    for row, got in zip(scores, table, strict=True):
        z = torch.zeros_like(row)
        if frames > 1:
            spread = row.std()
            z = torch.where(spread > 0, (row - row.mean()) / spread, 0.0)
        assert torch.equal(got, z.softmax(0).sort(descending=True).values.cumsum(0))
    target = int(24 * frames * 0.6)
    assert layer_counts(scores, target) == layer_counts(list(scores), target)


def test_rescaled_counts_keep_their_total_order_and_bounds():
    counts = [13, 9, 12, 13, 12, 8, 8, 7, 9, 11, 14, 9]
    out = rescale_counts(counts, 1, 36)
    assert sum(out) == sum(counts) and min(out) >= 1 and max(out) <= 36
    assert all((a < b) <= (x <= y) for a, b, x, y in zip(counts, counts[1:], out, out[1:], strict=False))
    assert rescale_counts([5, 5], 1, 9) == [5, 5]


def test_retrieval_takes_the_recent_blocks_and_the_best_others():
    scores = torch.tensor([5.0, 0.0, 4.0, 0.0, 0.0, 9.0, 0.0])
    assert select_with_recent(scores, 4, 2) == [0, 2, 5, 6]
    assert select_with_recent(scores, 1, 2) == [6]  # fewer than the recent ones: the newest
    assert select_with_recent(scores, 3, None) == [0, 2, 5]
    assert select_with_recent(scores, 9, 2) == list(range(7))


def test_budget_and_knob_validation():
    geometry = KVGeometry(2, 4, 2, 8, 32, TPF, 4)
    assert video_tokens("streamkv", {"retrieve_size": 16}, TPF) == 24 * TPF
    assert video_tokens("streamkv", {"retrieve_size": 100}, TPF) == 128 * TPF  # the release's cap
    for knobs, field in [({"n_local": 64 * TPF}, "n_local"), ({"compression_ratio": 0}, "compression_ratio"),
                         ({"max_segment_frames": 2, "min_segment_frames": 3}, "max_segment_frames"),
                         ({"segment_mode": "shots"}, "segment_mode"), ({"retrieve_temp": -1}, "retrieve_temp")]:
        with pytest.raises(ConfigError, match=f"cache.{field}"):
            StreamKV(**knobs).validate(geometry)


# ------------------------------------------------------------------------------------ the streaming method
def test_everything_retrieved_without_compression_or_summary_is_the_full_cache(tiny_llm, monkeypatch):
    frames = random_frames(12)
    full = stream(tiny_llm, FullCache(), frames, 4).answer("q")[0]
    monkeypatch.setattr(streamkv, "layer_counts", lambda scores, target: [s.numel() for s in scores])
    method = StreamKV(use_segment_summary=False, compression_ratio=1.0, retrieve_size=100, min_segment_frames=3,
                      max_segment_frames=5)
    answer, context, _ = stream(tiny_llm, method, frames, 4).answer("q")
    assert context.detail.retrieve_counts == [12, 12] and context.recalled.frames == list(range(12))
    torch.testing.assert_close(answer.first_token_logits, full.first_token_logits, atol=1e-5, rtol=1e-5)


def test_guidance_scores_and_what_each_layer_keeps(tiny_llm):
    """Layer 0's scores are the guidance prompt's mean query (its own projections of the embeddings) against
    each frame's mean key; every layer keeps its top frames by its scores, as many as keep_counts says, and the
    summary frame."""
    method = StreamKV(max_segment_frames=6)
    method.bind(tiny_llm)
    method.start_video(tiny_llm.init_prompt_ids())
    visual = tiny_llm.encode_frames(random_frames(6))
    scores = method.encode_segment(list(visual), [[i] for i in range(6)], method.kept)
    assert len(method.kept.store) == 0 and len(method.kept.pending) == 1  # chosen at the next settle
    method.settle(method.kept)
    layer = tiny_llm.language_model.layers[0]
    attn, g = layer.self_attn, tiny_llm.geometry
    with torch.no_grad():
        prompt = layer.input_layernorm(tiny_llm.embed_ids(method.guidance_ids))[0]
        q = attn.q_proj(prompt).view(-1, g.num_heads, g.head_dim).mean(0)  # (H, d)
        k = attn.k_proj(layer.input_layernorm(visual)).view(6, TPF, g.num_kv_heads, g.head_dim).mean(1)
    k = k.repeat_interleave(g.num_heads // g.num_kv_heads, dim=1)  # (frames, H, d)
    torch.testing.assert_close(scores[0], (k * q).sum((1, 2)), atol=1e-4, rtol=1e-4)
    keep = method.keep_counts(scores, 6)
    assert sum(keep) >= 2 and all(1 <= c <= 6 for c in keep)
    kept = method.kept
    assert len(kept.store) == kept.reprs.shape[0] == sum(keep) + len(keep)
    for idx in range(g.num_layers):
        top = sorted(scores[idx].topk(keep[idx]).indices.tolist())
        assert kept.frames[idx] == [[f] for f in top] + [[]]  # the summary last, covering no single frame
        assert kept.held()[idx] == keep[idx] + 1
    # layer 0's blocks (in one store with every layer's) hold its keys of their frames (the summary's: of the
    # frames' mean), and each block's representative is their mean, heads expanded
    with torch.no_grad():
        parts = torch.cat((visual, visual.mean(0, keepdim=True)))
        k0 = attn.k_proj(layer.input_layernorm(parts)).view(7, TPF, g.num_kv_heads, g.head_dim)
    top = sorted(scores[0].topk(keep[0]).indices.tolist())
    for block, f in zip(kept.ids[0], top + [6], strict=True):
        bk, _ = kept.store.layer_kv([block], 0, "cpu")
        torch.testing.assert_close(bk[0].transpose(0, 1), k0[f], atol=1e-5, rtol=1e-5)
        mean = k0[f].mean(0).repeat_interleave(g.num_heads // g.num_kv_heads, dim=0).reshape(-1)
        torch.testing.assert_close(kept.reprs[block], mean, atol=1e-5, rtol=1e-5)


def test_tied_frames_keep_the_earliest_and_a_chunk_decides_its_segments_in_one_read(tiny_llm):
    """Frames of equal score are kept earliest first (a stable order: topk leaves ties to the kernel); the
    segments a chunk closes are chosen together after it, in one host read."""
    method = StreamKV(min_segment_frames=3, max_segment_frames=3, segment_mode="uniform")
    method.bind(tiny_llm)
    method.start_video(tiny_llm.init_prompt_ids())
    frame = tiny_llm.encode_frames(random_frames(1))[0]
    # two segments of one frame repeated: every score ties
    counted = count_calls(lambda: method.ingest(frame.expand(6, *frame.shape), 0))
    assert method.segments == 2 and not method.kept.pending
    assert counted.host_reads == 1, counted.sites  # uniform segments: no similarities read
    # layer 0's keys are its projections of the embeddings: equal for equal frames (deeper layers' are not)
    frames = [f[0] for f in method.kept.frames[0] if f]
    assert frames == [0, 3] or frames == [0, 1, 3, 4], method.kept.frames  # each segment's first frames


def test_a_question_mid_segment_is_answered_as_from_a_fresh_encoding(tiny_llm):
    """The open segment is encoded for the question and discarded: a later question sees what a fresh stream
    to its time sees, and the segments do not depend on when questions came."""
    frames = random_frames(14)
    knobs = dict(min_segment_frames=3, max_segment_frames=6, retrieve_size=4, retrieve_local_size=2)
    method = StreamKV(**knobs)
    engine = stream(tiny_llm, method, frames[:8], 3)
    held = method.kept.held()
    first = engine.answer("what is red?")[2]
    assert method.kept.held() == held and first >= 0  # nothing kept of it
    from test_hermes import engine_sample
    engine.encode_until(engine_sample(frames), 8, 14, None)
    later = engine.answer("q")[0].first_token_logits
    for chunk in (1, 14):
        fresh = stream(tiny_llm, StreamKV(**knobs), frames, chunk).answer("q")[0].first_token_logits
        torch.testing.assert_close(later, fresh, atol=1e-5, rtol=1e-5)


def test_retrieval_counts_differ_by_layer_around_retrieve_size(tiny_llm):
    method = StreamKV(min_segment_frames=2, max_segment_frames=4, compression_ratio=0.6, retrieve_size=6,
                      retrieve_local_size=2)
    _, context, _ = stream(tiny_llm, method, random_frames(30), 10).answer("q")
    counts = context.detail.retrieve_counts
    assert all(3 <= c <= 9 for c in counts)
    lengths = [int(k.shape[-2]) for k in context.keys]
    n_init = len(tiny_llm.init_prompt_ids())
    assert lengths == [n_init + c * TPF for c in counts] and context.layer_positions == lengths
    assert context.online_tokens == max(lengths) <= n_init + video_tokens("streamkv", {"retrieve_size": 6}, TPF)
    assert method.stats().kv_bytes > 0 and context.detail.segments >= 5
