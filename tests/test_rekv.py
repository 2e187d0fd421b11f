"""ReKV against the published behaviour and against direct computations."""

from __future__ import annotations

import torch
from conftest import random_frames
from test_engine import stream
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from mukv.cache import FullCache, ReKVCache
from mukv.cache import rekv as rekv_module
from mukv.cache.block_store import BlockStore
from mukv.cache.kernels import grouped_sdpa
from mukv.cache.retrieval import score_blocks, select_top_blocks
from mukv.models.adapter import KVGeometry
from mukv.models.loading import llava_ov_config


def test_rekv_with_everything_in_window_and_retrieved_answers_exactly_as_full(tiny_llm):
    frames = random_frames(8)
    full = stream(tiny_llm, FullCache(), frames, 3).answer("what colour was the star?")[0]
    method = ReKVCache(n_local=100_000, retrieve_size=64)
    rekv, context, _ = stream(tiny_llm, method, frames, 3).answer("what colour was the star?")
    torch.testing.assert_close(rekv.first_token_logits, full.first_token_logits, atol=1e-5, rtol=1e-5)
    assert rekv.token_ids == full.token_ids
    assert context.detail.blocks == list(range(8)) and len(method.store) == 8


def test_window_and_budget_bound_the_answer_context(tiny_llm):
    method = ReKVCache(n_local=40, retrieve_size=3)
    _, context, _ = stream(tiny_llm, method, random_frames(8), 3).answer("q")
    n_init, t = len(tiny_llm.init_prompt_ids()), tiny_llm.geometry.tokens_per_frame
    assert context.online_tokens == n_init + 3 * t and context.next_position == n_init + 3 * t
    assert context.detail.blocks == sorted(context.detail.blocks) and len(context.detail.blocks) == 3


def test_select_top_blocks_keeps_time_order_and_chunks():
    scores = torch.tensor([0.1, 5.0, 0.2, 4.0, 0.0, 3.0, 9.0])
    assert select_top_blocks(scores, 3) == [1, 3, 6]
    assert select_top_blocks(scores, 10) == list(range(7))
    # chunks of 2: means [2.55, 2.1, 1.5, 9.0] -> top 2 chunks: 0 and 3 (the remainder chunk, cut at 7)
    assert select_top_blocks(scores, 4, chunk=2) == [0, 1, 6]


def test_dot_and_cosine_scoring_differ_when_norms_differ():
    query = torch.tensor([1.0, 0.0])
    reprs = torch.tensor([[10.0, 10.0], [0.5, 0.0]])  # long but off-axis vs short and aligned
    assert select_top_blocks(score_blocks(reprs, query, "dot"), 1) == [0]
    assert select_top_blocks(score_blocks(reprs, query, "cosine"), 1) == [1]


def _question_vectors(monkeypatch, method, question):
    """The per-layer question vectors ReKV scores with (spied on a first recall)."""
    seen = []
    original = rekv_module.question_vector

    def spy(q):
        vec = original(q)
        seen.append(vec)
        return vec

    monkeypatch.setattr(rekv_module, "question_vector", spy)
    method.recall(question)
    monkeypatch.setattr(rekv_module, "question_vector", original)
    return seen


def test_a_planted_block_is_retrieved_in_time_order(tiny_llm, monkeypatch):
    method = ReKVCache(n_local=40, retrieve_size=3)
    engine = stream(tiny_llm, method, random_frames(10), 4)
    vectors = _question_vectors(monkeypatch, method, "where is the star?")
    method.video.reprs[0, 7] = 50 * vectors[0]  # layer 0's queries do not depend on what was retrieved
    _, context, _ = engine.answer("where is the star?")
    assert 7 in context.detail.blocks and context.detail.blocks == sorted(context.detail.blocks)
    shared = ReKVCache(n_local=40, retrieve_size=3, per_layer=False, scoring="cosine")
    engine = stream(tiny_llm, shared, random_frames(10), 4)
    vectors = _question_vectors(monkeypatch, shared, "where is the star?")
    shared.video.reprs[-1, 2] = vectors[-1]
    _, context, _ = engine.answer("where is the star?")
    assert 2 in context.detail.blocks and not context.detail.layers_differ


def test_shared_retrieval_uses_one_block_set_in_every_layer(tiny_llm):
    method = ReKVCache(n_local=40, retrieve_size=2, per_layer=False)
    engine = stream(tiny_llm, method, random_frames(6), 3)
    context = method.recall("q")
    blocks = context.detail.blocks
    n_init = len(tiny_llm.init_prompt_ids())
    for layer, keys in enumerate(context.keys):
        k, _ = method.store.layer_kv(blocks, layer, "cpu")
        expected = tiny_llm.rope.rotate_range(torch.cat((method.layers[layer].init_k, k), -2), 0)
        torch.testing.assert_close(keys, expected)
        assert keys.shape[-2] == n_init + 2 * tiny_llm.geometry.tokens_per_frame
    assert engine.answer("q")[1].detail.blocks == blocks


def test_rerotation_equals_keys_encoded_at_those_positions(tiny_llm):
    """Un-rotated stored keys re-rotated to positions p give the same attention as keys rotated by
    transformers' own RoPE at p."""
    torch.manual_seed(0)
    lm = tiny_llm.language_model
    d, hq, hk = tiny_llm.geometry.head_dim, tiny_llm.geometry.num_heads, tiny_llm.geometry.num_kv_heads
    q, k, v = torch.randn(1, hq, 5, d), torch.randn(1, hk, 30, d), torch.randn(1, hk, 30, d)
    positions = torch.cat((torch.arange(0, 10), torch.arange(10, 30)))  # contiguous after retrieval
    q_pos = torch.arange(30, 35)
    cos, sin = lm.rotary_emb(k, torch.cat((positions, q_pos))[None])
    q_hf, _ = apply_rotary_pos_emb(q, q, cos[:, 30:], sin[:, 30:])
    k_hf, _ = apply_rotary_pos_emb(k, k, cos[:, :30], sin[:, :30])
    ours_k = tiny_llm.rope.rotate_range(k, 0)
    ours_q = tiny_llm.rope.rotate_range(q, 30)
    torch.testing.assert_close(ours_k, k_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped_sdpa(ours_q, ours_k, v, 0.25, None), grouped_sdpa(q_hf, k_hf, v, 0.25, None),
                               atol=1e-5, rtol=1e-5)


def test_offloaded_bytes_match_the_formula_for_tiny_and_for_llava_ov_05b(tiny_llm):
    g = tiny_llm.geometry
    method = ReKVCache(n_local=40, retrieve_size=3)
    stream(tiny_llm, method, random_frames(5), 2)
    assert method.store.nbytes == 5 * g.tokens_per_frame * 2 * g.num_layers * g.num_kv_heads * g.head_dim * 4
    real = KVGeometry.from_config(llava_ov_config("0.5b"), torch.float16)
    assert real.kv_bytes_per_token == 12 * 1024 and real.tokens_per_frame == 196
    store = BlockStore()
    shape = (real.num_layers, real.num_kv_heads, real.tokens_per_frame, real.head_dim)
    store.add(torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16))
    assert store.nbytes == 196 * real.kv_bytes_per_token == 2_408_448  # 2.3 MiB per frame
    assert abs(store.nbytes * 0.5 * 3600 / 2**30 - 4.04) < 0.01  # ~4.0 GiB per hour at 0.5 fps


def test_disk_spill_gives_the_same_answers_as_ram(tiny_llm, tmp_path):
    frames = random_frames(8)
    ram = ReKVCache(n_local=40, retrieve_size=3)
    ram_answer = stream(tiny_llm, ram, frames, 3).answer("q")[0]
    disk = ReKVCache(n_local=40, retrieve_size=3, ram_budget_gb=0.0, spill_dir=str(tmp_path / "spill"))
    disk_answer = stream(tiny_llm, disk, frames, 3).answer("q")[0]
    torch.testing.assert_close(disk_answer.first_token_logits, ram_answer.first_token_logits)
    assert disk_answer.token_ids == ram_answer.token_ids
    assert disk.store.ram_bytes == 0 and disk.store.disk_bytes == ram.store.nbytes
    files = [f for f in disk.store.spill_dir.iterdir() if f.name != "owner.json"]  # owner: stale-folder cleanup
    assert len(files) == 16  # a K and a V file per block
    assert (disk.store.spill_dir / "owner.json").is_file()
    spill = disk.store.spill_dir
    disk.store.clear()
    assert not spill.exists()


def test_block_store_round_trips_bf16_through_disk(tmp_path):
    k = torch.randn(2, 2, 5, 8).to(torch.bfloat16)
    store = BlockStore(ram_budget_bytes=0, spill_dir=tmp_path)
    store.add(k, -k, positions=torch.arange(3, 8), first_frame=1.5, num_frames=0.25)
    got_k, got_v = store.layer_kv([0], 1, "cpu")
    assert got_k.dtype == torch.bfloat16 and torch.equal(got_k[0], k[1]) and torch.equal(got_v[0], -k[1])
    assert store.positions([0]).tolist() == [3, 4, 5, 6, 7] and store.blocks[0].on_disk
