"""MuKV: budgets, block prefill, trimming, retrieval and assembly against direct computations."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ArrayFrames, random_frames

from mukv.cache import signals
from mukv.cache.mukv import MuKVCache, mukv_budget
from mukv.data.types import VideoSample
from mukv.engine import EngineSettings, StreamingEngine
from mukv.errors import ConfigError
from mukv.models.adapter import KVGeometry
from mukv.models.loading import llava_ov_config

QUESTION = "what colour was the star?"
# Fits the tiny model (16 tokens per frame -> 4 / 16 / 64-token blocks) with every block keeping >= 1 token.
SMALL = dict(top_k=[3, 2, 1], keep_ratio=[0.5, 0.25, 0.8])


@pytest.fixture(scope="module")
def llm():
    from mukv.models.loading import load_video_llm

    return load_video_llm("tiny", None, device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="module")
def frames():
    return random_frames(8, seed=11)


def stream(llm, method, frames, chunk: int = 4) -> StreamingEngine:
    engine = StreamingEngine(llm, method, EngineSettings(encode_chunk_size=chunk, max_new_tokens=2, progress=False))
    method.start_video(llm.init_prompt_ids())
    engine._peak_kv = 0
    engine.encode_until(VideoSample("v", len(frames), [], ArrayFrames(frames)), 0, len(frames), None)
    return engine


def geometry_0_5b() -> KVGeometry:
    """LLaVA-OV-0.5B's geometry from its config alone (SigLIP 384 px / patch 14, Qwen2-0.5B), no weights."""
    return KVGeometry.from_config(llava_ov_config("0.5b"), torch.float16)


# ------------------------------------------------------------------------------------------ budgets
def test_published_budget_on_the_0_5b_geometry():
    geo = geometry_0_5b()
    assert geo.tokens_per_frame == 196 and geo.kv_bytes_per_token == 12 * 1024
    method = MuKVCache()
    method.validate(geo)
    budget = mukv_budget(geo, method)
    assert budget.block_sizes == [49, 196, 784]
    assert budget.kept_per_block == [4, 19, 627]
    assert budget.retrieved_tokens == 20 * 4 + 32 * 19 + 12 * 627 == 8212
    assert budget.online_tokens(n_init=13, n_prompt=20) == 13 + 8212 + 20
    four_frames = 4 * geo.tokens_per_frame
    assert budget.stored_tokens(four_frames) == 64 + 76 + 627 == 767
    assert four_frames == 784  # ReKV stores every token: 767 / 784 = 0.98x the offline memory


@pytest.mark.parametrize("knobs", [SMALL, dict(top_k=[2, 2, 1])])  # the second: published keep ratios, clamped to 1
def test_online_tokens_of_a_real_recall_equal_the_formula(llm, frames, knobs):
    method = MuKVCache(**knobs)
    engine = stream(llm, method, frames)
    n_init = len(llm.init_prompt_ids())
    answer, context, _ = engine.answer(QUESTION)
    n_prompt = len(llm.question_prompt_ids(QUESTION))
    budget = method.budget()
    assert context.online_tokens + n_prompt == budget.online_tokens(n_init, n_prompt)
    assert context.next_position == context.online_tokens  # published: the prompt follows at cache length
    per_gran = context.detail.online_tokens_per_granularity
    assert list(per_gran.values()) == [k * n for k, n in zip(budget.top_k, budget.kept_per_block, strict=True)]
    stats = method.stats()
    assert stats.kv_tokens == n_init + 2 * budget.stored_tokens(4 * 16)  # two chunks of 4 frames
    assert stats.kv_bytes == stats.kv_tokens * llm.geometry.kv_bytes_per_token
    assert answer.token_ids  # decoding runs over the assembled context


# ----------------------------------------------------------------------------- prefill and trimming
def reference_block_kv(llm, block: torch.Tensor):
    """A stock transformers forward (its own SDPA attention, its own RoPE) over init prompt + one block:
    its cached (rotated) keys and values of the block's tokens, per layer."""
    emb = torch.cat([llm.embed_ids(llm.init_prompt_ids()), block[None]], dim=1)
    with torch.no_grad():
        cache = llm.language_model(inputs_embeds=emb, use_cache=True).past_key_values
    n0 = len(llm.init_prompt_ids())
    return [(layer.keys[..., n0:, :], layer.values[..., n0:, :]) for layer in cache.layers]


def test_batched_block_prefill_equals_one_at_a_time_and_a_stock_forward(llm, frames):
    method = MuKVCache(**SMALL)
    method.bind(llm)
    method.start_video(llm.init_prompt_ids())
    visual = llm.encode_frames(frames[:3]).reshape(3, 16, -1)  # three frame blocks
    batched = method.prefill_blocks(visual)
    n0 = method.video.n_init
    pos = torch.arange(n0, n0 + 16)
    for b in range(3):
        single = method.prefill_blocks(visual[b:b + 1])
        for name in ("keys", "values", "last_keys_rot"):
            torch.testing.assert_close(getattr(batched, name)[b], getattr(single, name)[0], atol=1e-5, rtol=1e-5)
        for (rb, wb), (rs, ws) in zip(batched.received, single.received, strict=True):
            assert wb == ws
            torch.testing.assert_close(rb[b], rs[0], atol=1e-5, rtol=1e-5)
        ref = reference_block_kv(llm, visual[b])
        for layer, (k_ref, v_ref) in enumerate(ref):
            torch.testing.assert_close(llm.rope.rotate(batched.keys[b, layer], pos), k_ref[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batched.values[b, layer], v_ref[0], atol=1e-4, rtol=1e-4)
    # the blocks differ, so a mix-up between them would show
    assert (batched.keys[0] - batched.keys[1]).abs().max() > 1e-3


def test_kept_tokens_are_the_top_scores_sorted_and_the_same_in_every_layer(llm, frames):
    method = MuKVCache(**SMALL)
    stream(llm, method, frames[:4])
    visual = llm.encode_frames(frames[:4]).reshape(-1, llm.geometry.hidden_size)
    n0 = method.video.n_init
    for gi, g in enumerate(method.plan.sizes):
        assert len(method.video.block_ids[gi]) == 64 // g
        for b in range(64 // g):
            block = method.block(gi, b)
            full = method.prefill_blocks(visual[b * g:(b + 1) * g][None])
            keys_mean = full.last_keys_rot.float().mean(dim=1)
            scores = signals.token_scores(full.received, keys_mean, method.alpha[gi], method.scoring_method,
                                          method.frequency)[0]
            expected = sorted(scores.topk(method.plan.kept[gi]).indices.tolist())
            idx = (block.positions - n0).tolist()
            assert idx == expected and idx == sorted(set(idx))
            for layer in range(llm.geometry.num_layers):
                torch.testing.assert_close(block.k[layer], full.keys[0, layer][:, idx])
                torch.testing.assert_close(block.v[layer], full.values[0, layer][:, idx])
            # representative: mean of the kept tokens' last-layer keys (with RoPE), heads concatenated
            rep = full.last_keys_rot[0][:, idx].mean(dim=1).reshape(-1)
            torch.testing.assert_close(method.representatives(gi)[b], rep)


# -------------------------------------------------------------------------------------- assembly
def test_published_assembly_is_score_order_at_encoding_positions(llm, frames):
    method = MuKVCache(**SMALL)
    engine = stream(llm, method, frames)
    ctx = method.recall(QUESTION)
    n0 = method.video.n_init
    blocks = list(ctx.detail.blocks.values())
    off = n0
    for layer in range(llm.geometry.num_layers):
        torch.testing.assert_close(ctx.keys[layer][..., :n0, :], llm.rope.rotate_range(method.video.init_k[layer], 0))
    for gi, chosen in enumerate(blocks):
        for b in chosen:
            block = method.block(gi, b)
            n = block.tokens
            assert int(block.positions.max()) < n0 + method.plan.sizes[gi]  # every block starts again at n0
            for layer in range(llm.geometry.num_layers):
                expected = llm.rope.rotate(block.k[layer], block.positions)
                torch.testing.assert_close(ctx.keys[layer][0, :, off:off + n], expected)
                torch.testing.assert_close(ctx.values[layer][0, :, off:off + n], block.v[layer])
            off += n
    assert off == ctx.online_tokens == ctx.next_position
    # the rerank reorders frame blocks by score, which is not time order here
    scores = list(ctx.detail.block_scores.values())
    assert all(s == sorted(s, reverse=True) for s in scores)
    del engine


def test_time_ordered_assembly_is_stream_order_with_contiguous_positions(llm, frames):
    method = MuKVCache(assembly="time_ordered", **SMALL)
    stream(llm, method, frames)
    ctx = method.recall(QUESTION)
    picks = [(gi, b) for gi, chosen in enumerate(ctx.detail.blocks.values()) for b in chosen]
    picks.sort(key=lambda p: (method.block(*p).first_frame, p[0]))
    assert len({method.block(*p).first_frame for p in picks}) > 1
    k = torch.cat([method.video.init_k[0]] + [method.block(gi, b).k[0][None] for gi, b in picks], dim=-2)
    torch.testing.assert_close(ctx.keys[0], llm.rope.rotate_range(k, 0))
    assert ctx.next_position == ctx.online_tokens


def test_quadrant_layout_cuts_patch_blocks_from_grid_quadrants(llm):
    method = MuKVCache(patch_layout="quadrant", **SMALL)
    method.bind(llm)
    ids = torch.arange(2 * 16).view(2, 16, 1)  # two frames of a 4x4 grid, raster order
    patches = method._layout(ids, 4).view(-1, 4)
    assert patches[:4].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert patches[4].tolist() == [16, 17, 20, 21]
    assert method._layout(ids, 16).view(-1).tolist() == list(range(32))  # frame blocks stay raster
    raster = MuKVCache(**SMALL)
    raster.bind(llm)
    assert raster._layout(ids, 4).view(-1, 4)[0].tolist() == [0, 1, 2, 3]


def test_shared_context_blocks_carry_the_stream_kv(llm, frames):
    """block_context=shared with nothing trimmed stores exactly the KV of one causal stream encoding."""
    from mukv.cache import FullCache

    method = MuKVCache(granularities=[1.0], top_k=[2], keep_ratio=[1.0], alpha=[0.7], rerank=False,
                       block_context="shared", n_local=None)
    stream(llm, method, frames)
    full = FullCache()
    stream(llm, full, frames)
    n0 = method.video.n_init
    for b in range(8):
        for layer in range(llm.geometry.num_layers):
            torch.testing.assert_close(method.block(0, b).k[layer],
                                       full.layers[layer].k[0, :, n0 + 16 * b:n0 + 16 * (b + 1)], atol=1e-5, rtol=1e-5)
        assert method.block(0, b).positions.tolist() == list(range(n0 + 16 * b, n0 + 16 * (b + 1)))


@pytest.mark.parametrize("layout, tokens_per_4_frames", [("raster", 64 + 48 + 48), ("quadrant", 64 + 48 + 64)])
def test_shared_prefixes_store_the_same_blocks_with_fewer_forwards(llm, frames, layout, tokens_per_4_frames):
    """A finer block that starts where a coarser one starts is cut from the coarser prefill: every stored
    block (kept tokens, positions, KV) and the recalled context are those of separate prefills, and the
    language model runs fewer tokens (raster: one in four patch and frame blocks shared; quadrant: patch
    blocks are quadrants, not prefixes of a frame, so only frame blocks are shared)."""
    from mukv.cache.instrumentation import OpCounter

    methods = {}
    for share in (False, True):
        OpCounter.reset()
        methods[share] = stream(llm, MuKVCache(share_prefixes=share, patch_layout=layout, **SMALL), frames).method
        methods[share].tokens = OpCounter.llm_tokens - methods[share].video.n_init  # the init prompt runs once
    alone, shared = methods[False], methods[True]
    # the signal of a prefix cut from a coarse prefill is the prefix's own (its queries only)
    visual = llm.encode_frames(frames[:4]).reshape(1, 64, -1)
    coarse = alone.prefill_blocks(visual, prefix_lengths=[4, 16])
    for n in (4, 16):
        own = alone.prefill_blocks(visual[:, :n])
        assert len(own.received) == len(coarse.received_prefix[n]) > 0
        for (r_own, w_own), (r_cut, w_cut) in zip(own.received, coarse.received_prefix[n], strict=True):
            assert w_own == w_cut
            torch.testing.assert_close(r_cut, r_own, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(coarse.keys[..., :n, :], own.keys, atol=1e-5, rtol=1e-5)
    assert alone.tokens == 3 * 16 * len(frames)  # 4 + 16 + 64-token blocks each cover every token once
    assert shared.tokens == tokens_per_4_frames * len(frames) // 4
    for gi in range(3):
        assert len(alone.video.block_ids[gi]) == len(shared.video.block_ids[gi]) > 0
        for b in range(len(alone.video.block_ids[gi])):
            x, y = alone.block(gi, b), shared.block(gi, b)
            assert x.positions.tolist() == y.positions.tolist() and x.first_frame == y.first_frame
            torch.testing.assert_close(x.k, y.k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.v, y.v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.representatives(gi), shared.representatives(gi), atol=1e-5, rtol=1e-5)
    a, b = alone.recall(QUESTION), shared.recall(QUESTION)
    assert a.detail.blocks == b.detail.blocks


def test_blocks_spilled_to_disk_give_the_same_context(llm, frames, tmp_path):
    in_ram = MuKVCache(**SMALL)
    stream(llm, in_ram, frames)
    spilled = MuKVCache(ram_budget_gb=1e-6, spill_dir=str(tmp_path), **SMALL)
    stream(llm, spilled, frames)
    assert spilled.store.disk_bytes > 0 and any(tmp_path.iterdir())
    a, b = in_ram.recall(QUESTION), spilled.recall(QUESTION)
    assert a.detail.blocks == b.detail.blocks
    for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True):
        torch.testing.assert_close(x, y)
    assert spilled.stats().kv_bytes == in_ram.stats().kv_bytes


# ------------------------------------------------------------------------------------ validation
def test_granularities_that_do_not_fit_the_model_are_rejected(llm):
    geo = dataclasses.replace(llm.geometry, tokens_per_frame=10)
    with pytest.raises(ConfigError) as err:
        MuKVCache().validate(geo)
    assert err.value.field == "cache.granularities" and "2.5 tokens" in str(err.value)
    MuKVCache(granularities=[0.5, 1.0, 4.0]).validate(geo)  # 5 / 10 / 40 tokens fit


@pytest.mark.parametrize("knobs,field", [
    (dict(top_k=[20, 32]), "cache.top_k"),
    (dict(keep_ratio=[0.1, 0.0, 0.8]), "cache.keep_ratio"),
    (dict(alpha=[0.5, 1.5, 0.8]), "cache.alpha"),
    (dict(top_k=[20, 0, 12]), "cache.top_k"),
    (dict(granularities=[1.0, 0.25, 4.0]), "cache.granularities"),
    (dict(assembly="by_score"), "cache.assembly"),
    (dict(frequency="wavelet"), "cache.frequency"),
    (dict(query_vector="mean_key"), "cache.query_vector"),
    (dict(patch_layout="quadrant", granularities=[0.5, 1.0, 4.0]), "cache.patch_layout"),
    (dict(keep_floor="zero"), "cache.keep_floor"),
    (dict(rerank_reverse=True, granularities=[1.0, 4.0], top_k=[2, 1], keep_ratio=[0.5, 0.5], alpha=[0.5, 0.5]),
     "cache.rerank_reverse"),
])
def test_invalid_knobs_name_their_field(llm, knobs, field):
    with pytest.raises(ConfigError) as err:
        MuKVCache(**knobs).validate(llm.geometry)
    assert err.value.field == field


# ------------------------------------------------------------------------------- degenerate vs ReKV
DEGENERATE = dict(granularities=[1.0], keep_ratio=[1.0], alpha=[0.7], rerank=False, assembly="time_ordered",
                  query_vector="mean_query", retrieval_keys="unrotated")


@pytest.mark.parametrize("n_local_frames", [3, 100])  # the encoding window slides / holds everything
def test_degenerate_mukv_retrieves_the_same_blocks_as_rekv(llm, frames, n_local_frames):
    """One granularity of one frame, nothing trimmed (keep 1.0), no rerank, time-ordered contiguous
    assembly: MuKV is ReKV with shared (not per-layer) cosine retrieval, given the knobs that make its
    query, representatives and block KV ReKV's:

    * ``query_vector=mean_query``: ReKV averages the question's queries over tokens, heads concatenated
      (MuKV then expands its representatives over the GQA groups, as ReKV does); ``last_key`` is a key;
    * ``retrieval_keys=unrotated``: ReKV's representatives are mean un-rotated keys (with keep 1.0 a MuKV
      representative is that mean too); MuKV's published code reads RoPE'd keys;
    * ``block_context=shared`` with ReKV's ``n_local``: ReKV's blocks are frames of its sink + sliding-window
      stream encoding; independent blocks (the published MuKV) have other KV from the second layer on;
    * what already coincides: both read the last layer, and ReKV's shared retrieval runs the raw question
      after the init prompt only, as MuKV's query prefill does.
    Then the chosen blocks and the whole answer context (every layer) must be equal.
    """
    from mukv.cache import ReKVCache

    t = llm.geometry.tokens_per_frame
    n_local = n_local_frames * t + 5
    k = 3
    rekv = ReKVCache(n_local=n_local, retrieve_size=k, scoring="cosine", per_layer=False)
    stream(llm, rekv, frames)
    contexts = {}
    for block_context in ("shared", "independent"):
        mukv = MuKVCache(top_k=[k], block_context=block_context, n_local=n_local, **DEGENERATE)
        stream(llm, mukv, frames)
        contexts[block_context] = [mukv.recall(q) for q in (QUESTION, "x", "zzzz qqq 123 !!")]
    picked = set()
    for i, question in enumerate((QUESTION, "x", "zzzz qqq 123 !!")):
        ref, got = rekv.recall(question), contexts["shared"][i]
        assert sorted(got.detail.blocks["g1.0"]) == ref.detail.blocks
        picked.add(tuple(ref.detail.blocks))
        assert got.online_tokens == ref.online_tokens == len(llm.init_prompt_ids()) + k * t
        assert got.next_position == ref.next_position
        for x, y in zip(got.keys + got.values, ref.keys + ref.values, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        # the published independent blocks: other KV in the second layer (so the comparison can fail)
        other = contexts["independent"][i]
        assert not torch.allclose(other.values[1], ref.values[1], atol=1e-3) or \
            other.detail.blocks != got.detail.blocks
    assert len(picked) > 1  # different questions retrieve different blocks


def test_degenerate_mukv_equals_a_direct_rekv_style_retrieval(llm, frames):
    """The degenerate configuration against ReKV's retrieval written out from its definition (no ReKV code):
    blocks = frames of a full causal stream encoding; representative = mean un-rotated key of the block,
    GQA heads expanded, concatenated; query = the raw question's un-rotated queries averaged over tokens,
    heads concatenated (here read at the last layer, with the question after the init prompt, as MuKV
    does); cosine; top-k sorted into time order; context = init + blocks re-rotated to 0..L-1."""
    from mukv.cache import FullCache

    k, t = 3, llm.geometry.tokens_per_frame
    mukv = MuKVCache(top_k=[k], block_context="shared", n_local=None, **DEGENERATE)
    stream(llm, mukv, frames)
    full = FullCache()
    stream(llm, full, frames)
    n0, last = mukv.video.n_init, llm.geometry.num_layers - 1
    groups = llm.geometry.num_heads // llm.geometry.num_kv_heads
    ids = llm.tokenize(QUESTION)
    captured = {}
    init_layers = [(L.k[..., :n0, :], L.v[..., :n0, :]) for L in full.layers]

    def attend(idx, q, kk, v, scaling):  # the question after the init prompt, plain causal attention
        captured[idx] = q
        pos = torch.arange(n0, n0 + len(ids))
        keys = torch.cat([llm.rope.rotate_range(init_layers[idx][0], 0), llm.rope.rotate(kk, pos)], -2)
        vals = torch.cat([init_layers[idx][1], v], -2)
        return torch.nn.functional.scaled_dot_product_attention(
            llm.rope.rotate(q, pos), keys.repeat_interleave(groups, 1), vals.repeat_interleave(groups, 1),
            attn_mask=torch.ones(len(ids), n0 + len(ids), dtype=torch.bool).tril(n0), scale=scaling)

    llm.forward(llm.embed_ids(ids), attend)
    query = captured[last][0].mean(dim=1).reshape(-1)
    stream_k = full.layers[last].k[0, :, n0:]  # (H_kv, 8 t, d) un-rotated
    reprs = torch.stack([stream_k[:, b * t:(b + 1) * t].mean(dim=1).repeat_interleave(groups, 0).reshape(-1)
                         for b in range(8)])
    sims = torch.nn.functional.cosine_similarity(query[None], reprs, dim=-1)
    chosen = sorted(sims.topk(k).indices.tolist())
    ctx = mukv.recall(QUESTION)
    assert sorted(ctx.detail.blocks["g1.0"]) == chosen
    for layer, L in enumerate(full.layers):
        kv = torch.cat([L.k[..., :n0, :]] + [L.k[..., n0 + b * t:n0 + (b + 1) * t, :] for b in chosen], -2)
        torch.testing.assert_close(ctx.keys[layer], llm.rope.rotate_range(kv, 0), atol=1e-5, rtol=1e-5)
    # the rotated-key retrieval of the published code reads different vectors (so this check can fail)
    rotated = MuKVCache(top_k=[k], block_context="shared", n_local=None,
                        **{**DEGENERATE, "retrieval_keys": "rotated"})
    stream(llm, rotated, frames)
    assert rotated.query(QUESTION).shape == mukv.query(QUESTION).shape
    assert not torch.allclose(rotated.query(QUESTION), mukv.query(QUESTION))


# ------------------------------------------------------------------ fidelity to the published code
def test_a_keep_count_below_one_keeps_the_whole_block_as_published(llm, frames):
    """Published trimming returns a block untouched where ``int(g * keep_ratio)`` is 0: the tiny model's
    4-token patch blocks at the published keep 0.1 keep all 4 tokens; ``keep_floor=one`` keeps one."""
    published = MuKVCache(top_k=[2, 2, 1])  # published keep ratios 0.1 / 0.1 / 0.8
    published.validate(llm.geometry)
    assert published.budget(llm.geometry).kept_per_block == [4, 1, 51]
    stream(llm, published, frames[:4])
    n0 = published.video.n_init
    for b in range(len(published.video.block_ids[0])):
        block = published.block(0, b)
        assert (block.positions - n0).tolist() == [0, 1, 2, 3]  # every token, in order, untouched
    one = MuKVCache(top_k=[2, 2, 1], keep_floor="one")
    assert one.budget(llm.geometry).kept_per_block == [1, 1, 51]
    stream(llm, one, frames[:4])
    assert all(one.block(0, b).tokens == 1 for b in range(len(one.video.block_ids[0])))
    assert published.stats().kv_tokens - one.stats().kv_tokens == 3 * len(one.video.block_ids[0])


def test_tied_scores_keep_the_published_candidates(llm, frames):
    """``fft_only`` + ``spectral_entropy`` ties every score; the published code keeps
    ``topk(int(1.2 k))[:k]``, which among ties is not ``topk(k)``."""
    method = MuKVCache(top_k=[2, 2, 1], keep_ratio=[0.5, 0.5, 0.5], scoring_method="fft_only",
                       frequency="spectral_entropy")
    stream(llm, method, frames[:4])
    n0 = method.video.n_init
    block = method.block(2, 0)  # one 64-token segment block, 32 kept
    tied = torch.zeros(64)
    published = sorted(tied.topk(int(32 * 1.2)).indices[:32].tolist())
    assert (block.positions - n0).tolist() == published
    assert published != sorted(tied.topk(32).indices.tolist())  # so this test tells the two rules apart


def stock_keys(llm, ids: list[int], prefix: torch.Tensor | None = None):
    """Rotated keys per layer from a stock transformers forward over init prompt + ``ids`` (or + ``prefix``
    embeddings): each layer's (1, H_kv, L, d), the init prompt dropped."""
    init = llm.init_prompt_ids()
    emb = llm.embed_ids(init + ids) if prefix is None else torch.cat([llm.embed_ids(init), prefix[None]], dim=1)
    with torch.no_grad():
        cache = llm.language_model(inputs_embeds=emb, use_cache=True).past_key_values
    return [layer.keys[..., len(init):, :] for layer in cache.layers]


def test_unified_layer_takes_frequency_keys_and_query_key_at_the_attention_layer(llm, frames):
    """``use_unified_layer`` (published, off by default): the frequency signal's keys and the query key come
    from the attention strategy's layer; representatives stay on the last layer."""
    n_layers = llm.geometry.num_layers
    assert n_layers >= 2
    knobs = dict(top_k=[2, 2, 1], keep_ratio=[0.5, 0.5, 0.5], scoring_method="fft_only", frequency="diff",
                 attention_layer="second_last")
    unified = MuKVCache(use_unified_layer=True, **knobs)
    stream(llm, unified, frames[:4])
    layer = n_layers - 2
    assert unified.plan.signal_layer == layer
    visual = llm.encode_frames(frames[:4]).reshape(-1, llm.geometry.hidden_size)
    keys = stock_keys(llm, [], prefix=visual[:16])  # the first frame block
    expected = signals.select_top(signals.frequency_signal(keys[layer][0].float().mean(dim=0), "diff"), 8)
    block = unified.block(1, 0)
    assert (block.positions - unified.video.n_init).tolist() == expected.tolist()
    plain_expected = signals.select_top(signals.frequency_signal(keys[-1][0].float().mean(dim=0), "diff"), 8)
    assert expected.tolist() != plain_expected.tolist()  # the layer choice shows here
    rep = keys[-1][0][:, expected].float().mean(dim=1).reshape(-1)
    torch.testing.assert_close(unified.representatives(1)[0], rep, atol=1e-4, rtol=1e-4)
    q_keys = stock_keys(llm, llm.tokenize(QUESTION))
    torch.testing.assert_close(unified.query(QUESTION), q_keys[layer][0, :, -1].float().reshape(-1), atol=1e-4, rtol=1e-4)
    plain = MuKVCache(**knobs)
    stream(llm, plain, frames[:4])
    torch.testing.assert_close(plain.query(QUESTION), q_keys[-1][0, :, -1].float().reshape(-1), atol=1e-4, rtol=1e-4)


def test_rerank_reverse_keeps_the_lowest_reranked_candidates(llm, frames):
    method = MuKVCache(rerank_reverse=True, **SMALL)
    stream(llm, method, frames)
    ctx = method.recall(QUESTION)
    forward = MuKVCache(**SMALL)
    stream(llm, forward, frames)
    ref = forward.recall(QUESTION)
    assert ctx.detail.blocks != ref.detail.blocks
    for scores in ctx.detail.block_scores.values():
        assert scores == sorted(scores)  # worst first, as the reversed published list
    with pytest.raises(ConfigError, match="cache.rerank_reverse"):
        MuKVCache(rerank_reverse=True, rerank=False, **SMALL).validate(llm.geometry)
