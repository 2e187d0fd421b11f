"""Operator calls and host reads per steady chunk and per answer token, pinned per method (issue #30).

On a GPU these set the pace when kernels are small: every operator call is host time (dispatch and a launch)
and every host read of a tensor value waits for the device. Both are counted on the CPU (torch's profiler sees
the same operators; ``mukv.cache.instrumentation.count_calls``), here on the tiny model with 4 layers, by the
same ``mukv.bench.ops_row`` that ``python -m mukv.bench --ops`` runs on the 0.5B layout (BENCHMARKS.md 5f).

``CEILINGS`` are the counts measured when they were last cut, with a small margin: a change that adds calls to
a method's chunk or answer fails here, and whoever cuts calls lowers its line. The ratio is against the stock
transformers forward over the same (batch, tokens) as the method's own forwards, and the answer token against
transformers' decode step over a ``DynamicCache`` as long as the answer's context.
"""

from __future__ import annotations

import pytest
import torch

from mukv.bench import MethodSpec, build_bench_method, narrow_llava_ov, ops_row
from mukv.cache import ordered_methods
from mukv.cache.instrumentation import count_calls, mark_host
from mukv.models.loading import build_tiny

CHUNK, BUDGET_FRAMES = 8, 16
# method: (operator calls per chunk / plain forward of the same tokens, host reads per chunk,
#          operator calls per answer token / plain decode step); measured 2026-12-03 (the window in one sliding-window call), about +3%
CEILINGS = {
    "full": (1.15, 0, 1.0),
    "sliding_window": (1.11, 0, 1.0),
    "uniform": (None, 0, 0.98),
    "rekv": (1.21, 0, 1.0),
    "mukv": (1.48, 0, 1.0),
    "streamkv": (1.68, 2, 1.07),  # segments are cut on the host: the chunk's frame similarities, then what every
    # layer keeps of the segments the chunk closed (one read for all of them)
    "infinipot_v": (1.24, 0, 1.0),
    "hermes": (1.13, 0, 1.05),  # its pseudo-questions run up to the last layer they are read in
    "knorm": (1.19, 0, 1.0),
    "streaming_llm": (1.17, 0, 1.0),
    "tova": (1.27, 0, 1.0),
    "snapkv": (1.24, 0, 1.0),
    "expected_attention": (1.50, 0, 1.0),
}


@pytest.fixture(scope="module")
def llm4():
    return build_tiny(0, torch.device("cpu"), torch.float32, text_layers=4)


def method_row(llm, name: str) -> dict:
    method = build_bench_method(MethodSpec(name), llm.geometry.tokens_per_frame, [f"budget_frames={BUDGET_FRAMES}"])
    return ops_row(llm, method, CHUNK)


def test_every_registered_method_has_a_ceiling():
    missing = sorted(set(ordered_methods()) - set(CEILINGS))
    assert not missing, (f"pin the operator calls of {', '.join(missing)}: run tests/test_ops.py's method_row on it "
                         f"and add its line to CEILINGS")


@pytest.mark.parametrize("name", ordered_methods())
def test_operator_calls_and_host_reads_are_pinned(llm4, name):
    ratio_max, reads_max, decode_max = CEILINGS[name]
    row = method_row(llm4, name)
    table = {k: row[k] for k in ("chunk_ops", "plain_ops", "ratio", "host_reads", "host_read_sites", "decode_ops",
                                 "plain_decode_ops", "decode_ratio", "forwards")}
    if ratio_max is None:  # uniform sampling runs no forward while the stream plays (it encodes at the question)
        assert row["forwards"] == [] and row["chunk_ops"] < 100, table
    else:
        assert row["ratio"] <= ratio_max, f"{name}: more operator calls per chunk than pinned: {table}"
    assert row["host_reads"] <= reads_max, f"{name}: more host reads per chunk than pinned: {table}"
    assert row["decode_ratio"] <= decode_max, f"{name}: more operator calls per answer token than pinned: {table}"
    assert row["decode_host_reads"] == 0, table  # the engine reads each token once, outside the counted step


def test_counts_do_not_depend_on_widths():
    """``--ops`` counts the 0.5B layout at 8-wide heads: the calls are those of any width (counted on one thread,
    ``count_calls``)."""
    for name in ("rekv", "mukv"):
        rows = [method_row(tiny_at_width(head_dim), name) for head_dim in (8, 32)]
        for key in ("chunk_ops", "decode_ops"):
            assert rows[0][key] == rows[1][key], (name, key, rows[0][key], rows[1][key])


def tiny_at_width(head_dim: int):
    """The tiny model at two widths (4 layers, 16 tokens per frame)."""
    return build_tiny(0, torch.device("cpu"), torch.float32, text_layers=4, hidden=4 * head_dim, heads=4)


def test_narrow_layout_is_the_real_one():
    llm = narrow_llava_ov("0.5b")
    t = llm.config.text_config
    assert (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (24, 14, 2)
    assert llm.geometry.tokens_per_frame == 196 and llm.geometry.head_dim == 8


def test_the_counter_sees_planted_calls_and_reads(llm4):
    """A test that can fail: extra operators and a host read planted in a method's chunk are counted."""
    x = torch.arange(12.0)
    host = torch.arange(4.0)
    mark_host(host)

    def clean():
        return x * 2

    def planted():
        y = x * 2 + 1
        int(y.max())  # a read
        y[y > 3].sum()  # boolean indexing: a read
        host.tolist()  # host memory by design: not a read
        return y

    a, b = count_calls(clean), count_calls(planted)
    assert b.ops > a.ops and a.host_reads == 0 and b.host_reads == 2, (a, b)
    assert sum(b.sites.values()) == 2

    method = build_bench_method(MethodSpec("full"), llm4.geometry.tokens_per_frame)
    ingest = method.ingest

    def leaky(visual, first_frame):
        ingest(visual, first_frame)
        float(visual.sum())

    method.ingest = leaky
    row = ops_row(llm4, method, CHUNK)
    assert row["host_reads"] == 1 and "test_ops.py" in next(iter(row["host_read_sites"]))


def test_the_split_divides_the_benchs_count_of_a_chunk(llm4):
    """``experiments/ops_split.py`` (where a chunk's calls go: the method's attention, the layers around it, outside
    the forwards) counts what ``ops_row`` counts, every call in one of its three parts."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "ops_split.py"
    spec = importlib.util.spec_from_file_location("ops_split", path)
    split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split)
    row = split.split_row(llm4, "streamkv", CHUNK, [f"budget_frames={BUDGET_FRAMES}"])  # two forwards a chunk
    ref = method_row(llm4, "streamkv")
    assert (row["chunk_ops"], row["plain_ops"], row["forwards"]) == \
        (ref["chunk_ops"], ref["plain_ops"], ref["forwards"]), (row, ref)
    layer_forwards = len(row["forwards"]) * llm4.geometry.num_layers
    parts = [row[f"{k}_per_layer"] * layer_forwards for k in ("attention", "around", "outside")]
    assert round(sum(parts)) == row["chunk_ops"] and min(parts) > 0, parts
    # the layers around the attention are transformers' own: the plain layer's calls less its attention's
    assert row["around_per_layer"] < row["plain_per_layer"] < row["around_per_layer"] + row["attention_per_layer"]
