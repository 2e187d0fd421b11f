"""Wall time of one layer's steady-state window attention on this CPU: the window in one sliding-window call
(``kernels.band_kernel``, what the streaming attention runs) against the three unmasked parts merged by
log-sum-exp (``SinkWindowKV._window_parts``, what runs where no sliding-window kernel agrees), at the 0.5B's
heads (14 query, 2 KV, 64 wide) and a few window and chunk sizes. BENCHMARKS.md section 5f.

    python experiments/window_kernel_cpu.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from mukv.cache import kernels
from mukv.cache.attention import SinkWindowKV

SIZES = ((392, 1500), (1568, 7500), (3136, 15000))  # (queries: 2, 8, 16 frames of 196 tokens; window tokens)


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # once untimed: lazy set-up (masks, biases) is not the steady state
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def row(dtype: torch.dtype, lq: int, n_local: int, repeats: int) -> str:
    """One table row: a full window of ``n_local`` keys before ``lq`` new queries (ReKV's steady state)."""
    g = torch.Generator().manual_seed(0)
    lk = lq + n_local - 1
    q = torch.randn(1, 14, lq, 64, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, lk, 64, generator=g).to(dtype) for _ in range(2))
    layer = SinkWindowKV(n_local, 1 << 20, sink_handover="exact")
    band = kernels.band_kernel(q.device, dtype, 64)
    with torch.inference_mode():
        t_band, a = timed(lambda: band(q, k, v, n_local, 0.125)[0], repeats)
        t_parts, b = timed(lambda: kernels.merge_parts(layer._window_parts(q, k, v, 0.125), dtype), repeats)
    diff = (a.float() - b.float()).abs().max().item()
    return (f"| {str(dtype).removeprefix('torch.')} | {lq} | {n_local} | {t_band:.3f} | {t_parts:.3f} | "
            f"{t_band / t_parts:.2f}x | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| dtype | queries | window | one sliding-window call (s) | three parts (s) | ratio | max abs difference |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for lq, n_local in SIZES:
            print(row(dtype, lq, n_local, args.repeats), flush=True)


if __name__ == "__main__":
    main()
