"""Per-frame work does not grow with the stream for the streaming methods (counted, not timed).

``mukv.bench --growth`` plots these curves for long streams; here the same ``growth_curve`` runs a short
stream of the tiny model with small windows so that every method reaches its steady state, and the counts
(query-key pairs scored by attention, tokens run through the LLM, device KV) are compared chunk by chunk.
"""

from __future__ import annotations

import pytest

from mukv.bench import growth_curve
from mukv.cache import FullCache, SlidingWindowCache
from mukv.cache.instrumentation import OpCounter
from mukv.cache.mukv import MuKVCache
from mukv.cache.rekv import ReKVCache

FRAMES, CHUNK = 48, 4
TOKENS = 16  # tiny model: 16 visual tokens per frame


def methods():
    return {
        "full": FullCache(),
        "sliding_window": SlidingWindowCache(n_local=4 * TOKENS),
        "rekv": ReKVCache(n_local=4 * TOKENS, retrieve_size=2),
        "mukv": MuKVCache(top_k=[3, 2, 1], keep_ratio=[0.5, 0.25, 0.8]),
    }


@pytest.fixture(scope="module")
def curves(tiny_llm):
    return {name: growth_curve(tiny_llm, m, FRAMES, CHUNK, answer_every=FRAMES // 2, progress=False)
            for name, m in methods().items()}


def _steady(rows: list[dict], key: str) -> list[float]:
    """Values after the first two chunks (the window and the init sink fill up there)."""
    return [r[key] for r in rows[2:]]


@pytest.mark.parametrize("name", ["sliding_window", "rekv", "mukv"])
def test_streaming_methods_do_constant_work_per_frame(curves, name):
    rows = curves[name]
    pairs = _steady(rows, "attention_pairs_per_frame")
    assert pairs[0] > 0
    assert max(pairs) == min(pairs), f"{name}: attention pairs per frame grow along the stream: {pairs}"
    tokens = _steady(rows, "llm_tokens_per_frame")
    assert max(tokens) == min(tokens) > 0
    # device memory: the window (flat) plus, for the retrieval methods, one representative key per block
    # (ReKV's and MuKV's published designs keep these on the accelerator): small and linear
    device = [r["device_kv_bytes"] - r["aux_bytes"] for r in rows[2:]]
    assert max(device) == min(device), f"{name}: device KV grows along the stream: {device}"
    aux = [b["aux_bytes"] - a["aux_bytes"] for a, b in zip(rows[2:], rows[3:], strict=False)]
    stored = [b["kv_bytes"] - a["kv_bytes"] for a, b in zip(rows[2:], rows[3:], strict=False)]
    assert all(0 <= a <= s / 8 for a, s in zip(aux, stored, strict=True)), (aux, stored)


def test_full_attention_work_grows_with_the_stream(curves):
    """The counter measures what it claims: without a window, each chunk attends to everything before it."""
    pairs = [r["attention_pairs_per_frame"] for r in curves["full"]]
    steps = [b - a for a, b in zip(pairs, pairs[1:], strict=False)]
    assert min(steps) == max(steps) > 0, f"full: per-frame attention work should grow linearly: {pairs}"
    assert pairs[-1] > 4 * pairs[1]


@pytest.mark.parametrize("name", ["rekv", "mukv"])
def test_store_grows_linearly_and_answers_stay_bounded(curves, name):
    rows = curves[name]
    per_chunk = [b["kv_bytes"] - a["kv_bytes"] for a, b in zip(rows, rows[1:], strict=False)]
    assert min(per_chunk) == max(per_chunk) > 0, f"{name}: stored bytes per chunk vary: {per_chunk}"
    answers = [r for r in rows if "answer_attention_pairs" in r]
    assert len(answers) == 2 and answers[0]["frames_seen"] < answers[1]["frames_seen"]
    # the recalled context (and so the answer's attention work) does not depend on how long the stream was
    assert answers[0]["online_tokens"] == answers[1]["online_tokens"]
    assert answers[0]["answer_attention_pairs"] == answers[1]["answer_attention_pairs"]


def test_counter_resets():
    OpCounter.attention_pairs, OpCounter.llm_tokens = 5, 7
    OpCounter.reset()
    assert OpCounter.attention_pairs == OpCounter.llm_tokens == 0


def test_bf16_is_chosen_only_where_the_cpu_runs_it_natively():
    """`--dtype auto` and `train.bf16` (null) follow the CPU's flags: emulated bf16 runs ~100x slower than fp32."""
    from pathlib import Path

    from mukv.models.loading import fast_bf16

    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")
    assert fast_bf16("cpu") == ("avx512_bf16" in flags or "amx_tile" in flags)
    assert fast_bf16("meta") is False


def test_bench_targets_keep_their_own_defaults():
    """`make bench` and `make bench-growth` share BENCH_ARGS for extra arguments only: the growth curve stays
    on the nano model for two hours of stream unless asked otherwise."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def dry(*args):  # the recipe's command line (not make's own messages: under `make test` it says more)
        out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=root, capture_output=True,
                             text=True, check=True).stdout
        return " ".join(line for line in out.splitlines() if "mukv.bench" in line or line.startswith("\t"))

    growth = dry("bench-growth")
    assert "--model nano" in growth and "--frames 3600" in growth and "0.5b" not in growth
    assert "--model 0.5b --dtype auto" in dry("bench")
    assert dry("bench", "BENCH_ARGS=--frames 16").rstrip().endswith("--frames 16")
    assert "--ops --model 0.5b" in dry("bench-ops")
