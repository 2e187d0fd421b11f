"""On a GPU: which fused log-sum-exp and sliding-window kernels the streaming attention picked, and how far
its fused paths (the window in one sliding-window call; the window as unmasked parts) are from the masked
one on a 0.5B-shaped layer (bf16, 14 query / 2 KV heads, window 15,000, 4 sinks), and the same for the prefill after a context (``causal_suffix_attention``) at MuKV's block-batch shapes.
Run by experiments/gpu_check.sh; prints one line per case."""

import time

import torch

from mukv.cache import kernels as attention  # the fused kernels' choice (lse_kernel) lives in mukv.cache.kernels
from mukv.cache.attention import SinkWindowKV
from mukv.cache.kernels import causal_suffix_attention, grouped_sdpa, lse_kernel, prefix_causal_mask
from mukv.models.rope import RotaryTable


def stream(n_local, chunks, mode: str, seed=0):
    """One layer streamed over ``chunks``; ``mode``: band (as run), parts (no sliding-window kernel), masked
    (no fused kernel at all)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    hq, hk, d, n_init = 14, 2, 64, 4
    rope = RotaryTable((1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))).cuda())
    layer = SinkWindowKV(n_local, 1024, block_tokens=196)  # ReKV's sinks: handed over per 196-token frame
    saved = attention.lse_kernel, attention.band_kernel
    if mode != "band":
        attention.band_kernel = lambda *a: None
    if mode == "masked":
        attention.lse_kernel = lambda *a: None
    try:
        def rnd(h, n):
            return torch.randn(1, h, n, d, generator=g, device="cuda", dtype=torch.bfloat16)
        layer.attend_and_append(rnd(hq, n_init), rnd(hk, n_init), rnd(hk, n_init), 0.125, rope)
        layer.set_init(layer.k, layer.v)
        outs, times = [], []
        for c in chunks:
            q, k, v = rnd(hq, c), rnd(hk, c), rnd(hk, c)
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs.append(layer.attend_and_append(q, k, v, 0.125, rope))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return torch.cat(outs, -2).float(), times
    finally:
        attention.lse_kernel, attention.band_kernel = saved


def prefill_case(bsz: int, lq: int, lk: int) -> str:
    """causal_suffix_attention against the masked call it replaced: largest difference and time of each."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(bsz, 14, lq, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(bsz, 2, lk, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    timing = {}
    for name, fn in (("fused", lambda: causal_suffix_attention(q, k, v, 0.125)),
                     ("masked", lambda: grouped_sdpa(q, k, v, 0.125, prefix_causal_mask(lq, lk, q.device)))):
        out = fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        timing[name] = ((time.perf_counter() - t) / 10, out.float())
    err = (timing["fused"][1] - timing["masked"][1]).abs().max().item()
    return (f"prefill after a context, {bsz} x {lq} queries over {lk} keys: max |fused - masked| = {err:.2e} "
            f"(bf16); {timing['fused'][0] * 1e3:.2f} ms vs {timing['masked'][0] * 1e3:.2f} ms masked")


if __name__ == "__main__":
    kernel = lse_kernel(torch.device("cuda"), torch.bfloat16, 64)
    band = attention.band_kernel(torch.device("cuda"), torch.bfloat16, 64)
    print("lse kernel:", getattr(kernel, "__name__", None), "| sliding-window kernel:", getattr(band, "__name__", None),
          flush=True)
    for n_local in (15000, None):
        chunks = [3136] * 8
        ref, tr = stream(n_local, chunks, "masked")
        for mode in ("band", "parts"):
            fast, tf = stream(n_local, chunks, mode)
            err = (fast - ref).abs().max().item()
            print(f"n_local={n_local}, {mode}: max |fused - masked| = {err:.2e} (bf16); last chunk "
                  f"{tf[-1] * 1e3:.2f} ms vs {tr[-1] * 1e3:.2f} ms masked (one layer, 3,136 queries)", flush=True)

    for bsz, lq, lk in ((64, 49, 63), (64, 196, 210), (16, 784, 798), (1, 30, 12000)):  # blocks; a question
        print(prefill_case(bsz, lq, lk), flush=True)
