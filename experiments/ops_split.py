"""Where a method's operator calls per steady chunk go, per layer-forward, against the plain forward's.

    python experiments/ops_split.py streamkv rekv             # tiny model with the 0.5B's 24 layers: seconds
    python experiments/ops_split.py streamkv --model 0.5b     # the 0.5B layout itself (narrow widths): minutes

``mukv.bench --ops`` counts a steady chunk as a whole (BENCHMARKS section 5f); this splits the same count into
what runs inside the method's attention (the per-layer function it hands the model: window, sinks, rotations,
appends), in the layers around it (transformers' own norms, projections and MLP, the plain forward's too) and
outside the language-model forwards (scoring, selection, the block store), each divided by the layer-forwards
the chunk ran. With the plain forward's calls per layer it gives what issue #30's 1.2x leaves for a layer's
attention: ``1.2 x plain - around - outside``. Counted as ``mukv.bench`` counts (aten operators, nested ones
included, one thread, the block stores on their device path); per-layer counts do not depend on widths or on
tokens, so the tiny model with 24 layers stands for the 0.5B layout.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mukv.bench import MethodSpec, build_bench_method, narrow_llava_ov, steady_state  # noqa: E402
from mukv.cache.instrumentation import OpCounter, plain_forward_calls  # noqa: E402
from mukv.engine import EngineSettings, StreamingEngine  # noqa: E402
from mukv.models.loading import build_tiny  # noqa: E402

ATTENTION, FORWARD = "ops_split:attention", "ops_split:forward"
TARGET = 1.2  # issue #30: a steady chunk's calls within 1.2x of the plain forward of the same tokens


def region_of(event) -> str:
    """The innermost split region an operator ran in: attention, around (a forward, outside its attention) or
    outside (no forward)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == ATTENTION:
            return "attention"
        if parent.name == FORWARD:
            return "around"
        parent = parent.cpu_parent
    return "outside"


def split_row(llm, name: str, chunk: int, overrides: list[str]) -> dict:
    """One steady chunk of ``name`` profiled with the three regions; calls per layer-forward."""
    g = llm.geometry
    method = build_bench_method(MethodSpec(name), g.tokens_per_frame, overrides)
    StreamingEngine(llm, method, EngineSettings(encode_chunk_size=chunk, progress=False))  # binds it to the model
    forward = llm.forward

    def forward_in_regions(embeds, attention, num_layers=None):
        def attention_in_region(*args, **kwargs):
            with record_function(ATTENTION):
                return attention(*args, **kwargs)

        with record_function(FORWARD):
            return forward(embeds, attention_in_region, num_layers)

    with steady_state(llm, method, chunk) as (x, first, _):  # as mukv.bench.ops_row counts
        OpCounter.forwards = []
        llm.forward = forward_in_regions
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                method.ingest(x, first)
        finally:
            del llm.forward  # the instance attribute: the class's forward again
        forwards = list(OpCounter.forwards)
        counts = Counter(region_of(e) for e in prof.events() if e.name not in (ATTENTION, FORWARD))
        lm = llm.model.model.language_model
        plain = plain_forward_calls(lm, forwards, g.hidden_size, llm.dtype, llm.device) if forwards else 0
    layer_forwards = len(forwards) * g.num_layers
    row = {"method": name, "forwards": forwards, "chunk_ops": sum(counts.values()), "plain_ops": plain}
    if layer_forwards:
        per = {k: counts[k] / layer_forwards for k in ("attention", "around", "outside")}
        plain_per = plain / layer_forwards
        row.update({f"{k}_per_layer": v for k, v in per.items()}, plain_per_layer=plain_per,
                   ratio=row["chunk_ops"] / plain,
                   attention_budget=TARGET * plain_per - per["around"] - per["outside"])
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+", help="conf/cache options")
    ap.add_argument("--model", default="tiny", choices=["tiny", "0.5b"],
                    help="tiny (with --layers) or the LLaVA-OV-0.5B layout at narrow widths")
    ap.add_argument("--layers", type=int, default=24, help="the tiny model's layers (24: the 0.5B's)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="frames per chunk (default: 8 on the tiny model, as tests/test_ops.py; 16 on the 0.5B, as "
                         "bench --ops)")
    ap.add_argument("--budget-frames", type=int, default=None,
                    help="budget_frames= (default: 16 on the tiny model, as tests/test_ops.py; the published "
                         "budgets on the 0.5B, as bench --ops)")
    args = ap.parse_args(argv)
    tiny = args.model == "tiny"
    chunk = args.chunk or (8 if tiny else 16)
    budget = args.budget_frames or (16 if tiny else None)
    llm = build_tiny(0, torch.device("cpu"), torch.float32, text_layers=args.layers) if tiny else \
        narrow_llava_ov("0.5b")
    overrides = [f"budget_frames={budget}"] if budget else []
    rows = [split_row(llm, name, chunk, overrides) for name in args.methods]
    print(f"calls per layer-forward ({llm.name}, {llm.geometry.num_layers} layers, {chunk}-frame chunks)\n")
    print("| method | forwards (batch x tokens) | attention | around it | outside the forwards | plain layer | "
          f"ratio | attention budget at {TARGET}x |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "ratio" not in r:
            print(f"| {r['method']} | none | - | - | {r['chunk_ops']} calls | - | - | - |")
            continue
        seen = Counter(r["forwards"])  # (batch, tokens) of each forward, in first-run order, with its count
        forwards = ", ".join(f"{n} x ({b}x{t})" if n > 1 else f"{b}x{t}" for (b, t), n in seen.items())
        print(f"| {r['method']} | {forwards} | {r['attention_per_layer']:.1f} | {r['around_per_layer']:.1f} | "
              f"{r['outside_per_layer']:.1f} | {r['plain_per_layer']:.1f} | {r['ratio']:.2f}x | "
              f"{r['attention_budget']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
