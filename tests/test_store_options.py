"""Block-store options the optimisations rely on: quantized blocks (error bounds, bytes), prefetching and
pinned memory (same answers either way), validated knobs."""

from __future__ import annotations

import pytest
import torch
from conftest import random_frames
from test_engine import stream

from mukv.cache import MuKVCache, ReKVCache
from mukv.cache.block_store import BlockStore
from mukv.cache.quant import bytes_per_value, dequantize, quantize
from mukv.errors import ConfigError
from mukv.models.adapter import KVGeometry
from mukv.models.loading import llava_ov_config

QUESTION = "what colour was the star?"
MUKV_SMALL = dict(top_k=[3, 2, 1], keep_ratio=[0.5, 0.25, 0.8])


def kv_like(shape, seed: int = 0) -> torch.Tensor:
    """Values with the spread of real KV: per-channel scales over four decades, outliers, an all-zero group."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])
    x[..., 3] *= 40.0
    x[0, 0, 0] = 0.0
    return x


@pytest.mark.parametrize("mode,qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantized_round_trip_error_is_at_most_half_a_step(mode, qmax, group, dtype):
    x = kv_like((3, 2, 7, 64)).to(dtype)
    q = quantize(x, mode, group)
    back = dequantize(q)
    assert back.dtype == dtype and back.shape == x.shape == q.shape
    xg = x.float().reshape(3, 2, 7, 64 // group, group)
    scale = q.scales.float()[..., None]
    assert (scale * qmax >= xg.abs().amax(-1, keepdim=True)).all()  # every value in range
    assert (scale <= xg.abs().amax(-1, keepdim=True) / qmax * (1 + 2**-9) + 1e-30).all()  # and no coarser
    err = (back.float().reshape_as(xg) - xg).abs()
    out_round = back.float().abs().reshape_as(xg) * 2**-7 if dtype != torch.float32 else 0  # output rounding
    assert (err <= scale / 2 * (1 + 1e-6) + out_round + 1e-30).all()
    assert back.reshape(-1)[0] == 0  # a zero group stays zero
    assert q.nbytes == pytest.approx(x.numel() * bytes_per_value(mode, group))


def test_int4_codes_use_every_level_and_pack_two_per_byte():
    x = torch.linspace(-7, 7, 15).repeat(1, 1, 1, 2)[..., :16]  # one group: the 15 levels and -7 again
    q = quantize(x, "int4", 16)
    assert q.codes.dtype == torch.uint8 and q.codes.shape[-1] == 8
    torch.testing.assert_close(dequantize(q), x)


def test_store_bytes_and_dequantized_blocks(tmp_path):
    k, v = kv_like((4, 2, 5, 64), 1), kv_like((4, 2, 5, 64), 2)
    exact = BlockStore()
    exact.add(k, v)
    for mode in ("int8", "int4"):
        ram = BlockStore(quant=mode, group_size=32)
        disk = BlockStore(ram_budget_bytes=0, spill_dir=tmp_path / mode, quant=mode, group_size=32)
        for store in (ram, disk):
            store.add(k, v)
            store.add(2 * k, v)
        assert ram.nbytes == disk.disk_bytes == 2 * 2 * k.numel() * bytes_per_value(mode, 32)
        assert ram.nbytes < exact.nbytes * (0.27 if mode == "int8" else 0.15) * 2
        for layer in range(4):
            rk, rv = ram.layer_kv([1, 0], layer, "cpu")
            dk, dv = disk.layer_kv([1, 0], layer, "cpu")
            assert torch.equal(rk, dk) and torch.equal(rv, dv)  # spilled codes read back bit for bit
            want = torch.cat((2 * k[layer], k[layer]), dim=1)[None]
            tol = want.abs().amax() / (254 if mode == "int8" else 14) * 1.01
            assert (rk - want).abs().max() <= tol


def test_published_0_5b_store_per_hour_of_video():
    """LLaVA-OV-0.5B, 196 tokens per frame at 0.5 fps: 4.3 GB/h in bf16, 2.2 GB/h int8, <= 1.2 GB/h int4."""
    geo = KVGeometry.from_config(llava_ov_config("0.5b"), torch.bfloat16)
    shape = (geo.num_layers, geo.num_kv_heads, geo.tokens_per_frame, geo.head_dim)
    per_hour = {}
    for mode in ("none", "int8", "int4"):
        store = BlockStore(quant=mode, group_size=64)
        store.add(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
        per_hour[mode] = store.nbytes * 0.5 * 3600
    assert per_hour["none"] == pytest.approx(4.335e9, rel=1e-3)
    assert per_hour["int8"] == pytest.approx(2.235e9, rel=1e-3)
    assert per_hour["int4"] <= 1.2e9


def contexts_equal(a, b) -> None:
    assert a.detail.blocks == b.detail.blocks and a.next_position == b.next_position
    for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("make", [
    lambda **kw: MuKVCache(**MUKV_SMALL, **kw),
    lambda **kw: ReKVCache(n_local=40, retrieve_size=3, per_layer=False, **kw),
    lambda **kw: ReKVCache(n_local=40, retrieve_size=3, **kw),
], ids=["mukv", "rekv_shared", "rekv"])
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_same_answers_with_and_without_prefetching_and_pinned_memory(tiny_llm, make, quant):
    """Prefetching and pinning change when bytes move, never which bytes: identical contexts and answers.
    (Pinning only takes effect on CUDA; on CPU this pins that the flag is harmless.)"""
    frames = random_frames(8, seed=3)
    runs = []
    for prefetch, pin in ((False, False), (True, False), (True, True), (False, True)):
        engine = stream(tiny_llm, make(prefetch=prefetch, pin_memory=pin, kv_quant=quant, kv_quant_group_size=8),
                        frames, 3)
        answer, context, _ = engine.answer(QUESTION)
        runs.append((answer, context))
    for answer, context in runs[1:]:
        contexts_equal(runs[0][1], context)
        assert answer.token_ids == runs[0][0].token_ids
        assert torch.equal(answer.first_token_logits, runs[0][0].first_token_logits)


@pytest.mark.parametrize("quant,spill", [("none", False), ("int8", False), ("none", True)])
def test_staged_blocks_leave_in_one_flush_with_the_same_bytes(tmp_path, monkeypatch, quant, spill):
    """Blocks added from a device wait on it until ``flush`` (one copy per dtype for all of them, the GPU's
    encoding path; forced here on host tensors). The flushed store equals one that copied each block at
    ``add``: keys, values, positions, tensor-valued meta (as lists), bytes and spill; the caller's tensors
    may be written again after ``add`` (unstaged) or after the flush (staged)."""
    stores = {}
    for staged in (False, True):
        monkeypatch.setattr(BlockStore, "stage_host_blocks", staged)
        written = []
        store = BlockStore(quant=quant, group_size=32, ram_budget_bytes=0 if spill else None,
                           spill_dir=tmp_path / str(staged))
        for i in range(3):
            k, v = kv_like((4, 2, 5 + i, 64), 2 * i), kv_like((4, 2, 5 + i, 64), 2 * i + 1)
            store.add(k, v, torch.arange(5 + i) + 10 * i, first_frame=i, meta={"video_tokens": torch.arange(i + 1)})
            written.append(k)
            if not staged:
                k.fill_(7.0)  # the caller reuses its buffers
        assert len(store._staged) == (3 if staged else 0) and len(store) == 3
        store.flush()
        for k in written:
            k.fill_(7.0)
        stores[staged] = store
    a, b = stores[False], stores[True]
    assert a.nbytes == b.nbytes and a.disk_bytes == b.disk_bytes
    assert [x.meta for x in a.blocks] == [x.meta for x in b.blocks] == [{"video_tokens": list(range(i + 1))}
                                                                        for i in range(3)]
    assert not b._staged and all(x.on_disk == spill for x in b.blocks)
    assert torch.equal(a.positions([2, 0]), b.positions([2, 0]))
    for layer in range(4):
        ka, va = a.layer_kv([2, 0, 1], layer, "cpu")
        kb, vb = b.layer_kv([2, 0, 1], layer, "cpu")
        assert torch.equal(ka, kb) and torch.equal(va, vb) and not (ka == 7.0).all()


@pytest.mark.parametrize("make", [lambda **kw: MuKVCache(**MUKV_SMALL, **kw),
                                  lambda **kw: ReKVCache(n_local=40, retrieve_size=3, **kw)], ids=["mukv", "rekv"])
def test_same_answers_with_staged_offload(tiny_llm, make, monkeypatch):
    """The methods' answers do not depend on whether blocks leave the device one by one or per chunk."""
    frames = random_frames(8, seed=3)
    runs = []
    for staged in (False, True):
        monkeypatch.setattr(BlockStore, "stage_host_blocks", staged)
        engine = stream(tiny_llm, make(), frames, 3)
        answer, context, _ = engine.answer(QUESTION)
        assert not engine.method.store._staged  # every ingest flushed
        runs.append((answer, context))
    contexts_equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][0].first_token_logits, runs[1][0].first_token_logits)


@pytest.mark.parametrize("make", [lambda **kw: MuKVCache(**MUKV_SMALL, **kw),
                                  lambda **kw: ReKVCache(n_local=40, retrieve_size=3, **kw)], ids=["mukv", "rekv"])
def test_quantized_store_keeps_the_recalled_context_close(tiny_llm, make):
    frames = random_frames(8, seed=4)
    exact = stream(tiny_llm, make(), frames, 3)
    ctx = exact.method.recall(QUESTION)
    for mode, step in (("int8", 1 / 254), ("int4", 1 / 14)):
        quant = stream(tiny_llm, make(kv_quant=mode, kv_quant_group_size=16), frames, 3)
        qctx = quant.method.recall(QUESTION)
        assert quant.method.stats().kv_bytes < exact.method.stats().kv_bytes
        if ctx.detail.blocks != qctx.detail.blocks:  # retrieval runs on full-precision representatives
            pytest.fail("quantization changed which blocks were recalled")
        for x, y in zip(ctx.values, qctx.values, strict=True):
            assert (x - y).abs().max() <= x.abs().amax() * step * 1.01


@pytest.mark.parametrize("knobs,field", [
    (dict(kv_quant="int3"), "cache.kv_quant"),
    (dict(kv_quant="int8", kv_quant_group_size=5), "cache.kv_quant_group_size"),
    (dict(kv_quant="int4", kv_quant_group_size=256), "cache.kv_quant_group_size"),  # > head_dim
    (dict(ram_budget_gb=-1.0), "cache.ram_budget_gb"),
])
@pytest.mark.parametrize("cls", [MuKVCache, ReKVCache])
def test_bad_store_knobs_name_their_field(tiny_llm, cls, knobs, field):
    with pytest.raises(ConfigError) as err:
        cls(**knobs).validate(tiny_llm.geometry)
    assert err.value.field == field


def test_prefetching_loader_prepares_the_next_layer_on_a_worker(monkeypatch):
    import threading

    store = BlockStore(prefetch=True, quant="int8", group_size=32)
    for seed in range(3):
        store.add(kv_like((4, 2, 5, 64), seed), kv_like((4, 2, 5, 64), seed + 10))
    threads: list[str] = []
    original = BlockStore.layer_kv

    def spy(self, ids, layer, device, dtype=None):
        threads.append(threading.current_thread().name)
        return original(self, ids, layer, device, dtype)

    monkeypatch.setattr(BlockStore, "layer_kv", spy)
    loaded = list(store.layers_kv([2, 0], 4, "cpu"))
    assert all(name.startswith("mukv-prefetch") for name in threads) and len(threads) == 4
    store.prefetch = False
    for (k, v), (k2, v2) in zip(loaded, store.layers_kv([2, 0], 4, "cpu"), strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert threads[4:] == ["MainThread"] * 4
