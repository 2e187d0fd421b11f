"""The nano model on the synthetic benchmark: every cache method across budget and stream length, one table.

    python experiments/nano_benchmark.py --preset quick      # `make run`: a couple of minutes
    python experiments/nano_benchmark.py --preset table      # the BENCHMARKS.md table (tens of minutes)
    python experiments/nano_benchmark.py --preset in_range   # cache=full within the training length
    python experiments/nano_benchmark.py --preset quant      # rekv / mukv with an int8 / int4 block store
    python experiments/nano_benchmark.py --preset each_type  # cache=full on streams that ask one type each

Everything runs in one process: the model loads once, and each (method, budget, length) streams the same
held-out videos (evaluation seeds, never trained on) through the same ``StreamingEngine`` as
``python -m mukv.run``, scored by exact match. Methods that are registered (``full``, ``sliding_window``,
``uniform``, and ``rekv`` / ``mukv`` once they exist) are run; budgets are given in frames (16 tokens each)
and mapped onto each method's knobs (``knobs_for``; ``--set rekv.n_local=512`` overrides any knob).
Writes ``results.csv``, ``results.md`` and one ``predictions_<run>.csv`` per run into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mukv.cache import CACHE_METHODS  # noqa: E402
from mukv.data.synthetic import CHANCE, QUESTION_TYPES, SyntheticSpec, make_synthetic_dataset  # noqa: E402
from mukv.engine import EngineSettings, StreamingEngine  # noqa: E402
from mukv.judge.exact import ExactMatchJudge  # noqa: E402
from mukv.models.loading import load_video_llm  # noqa: E402
from mukv.report.metrics import wilson_interval  # noqa: E402

TOKENS_PER_FRAME = 16
METHOD_ORDER = ("full", "sliding_window", "uniform", "rekv", "mukv")
PRESETS = {
    # `make run`: 5x the training length, one budget, two videos (one question of each type each)
    "quick": dict(lengths=[300.0], videos=2, budgets=[16], seed=0),
    # BENCHMARKS.md: within the training length and 10x / 20x beyond it, two budgets
    "table": dict(lengths=[60.0, 640.0, 1280.0], videos=12, budgets=[8, 16], seed=1000),
    # the accuracy target of cache=full within the training length
    "in_range": dict(lengths=[60.0], videos=60, budgets=[16], seed=2000, methods=["full"]),
    # the accuracy cost of a quantized block store (10x the training length)
    "quant": dict(lengths=[640.0], videos=12, budgets=[16], seed=1000, methods=["rekv", "mukv"],
                  kv_quant=["none", "int8", "int4"]),
    # each type on streams of its own (a count-only stream shows rings but no needles or balls), within range
    "each_type": dict(lengths=[60.0], videos=40, budgets=[16], seed=700, methods=["full"],
                      types=[[t] for t in QUESTION_TYPES]),
}
STORE_METHODS = ("rekv", "mukv")  # methods with a block store (kv_quant applies)


def knobs_for(method: str, budget_frames: int) -> dict:
    """Knobs giving ``method`` a context of about ``budget_frames`` frames (nano: 16 tokens per frame);
    only knobs the method's dataclass has are set, so methods written later pick up what fits."""
    names = {f.name for f in dataclasses.fields(CACHE_METHODS[method])}
    b = budget_frames
    wanted: dict = {}
    if method == "sliding_window":
        wanted = {"n_local": b * TOKENS_PER_FRAME}
    elif method == "uniform":
        wanted = {"num_frames": b}
    elif method == "rekv":
        # retrieved frame blocks; the encoding window stays within the nano model's trained span (32 frames)
        wanted = {"retrieve_size": b, "n_local": 32 * TOKENS_PER_FRAME, "block_size": TOKENS_PER_FRAME}
    elif method == "mukv":
        # granularities are in frames (0.25 / 1 / 4 = 4 / 16 / 64 nano tokens); the published top-k 20/32/12
        # (for ReKV's 64 frames) scaled to a budget of b frames
        scale = b / 64
        wanted = {"top_k": [max(1, round(20 * scale)), max(1, round(32 * scale)), max(1, round(12 * scale))]}
    return {k: v for k, v in wanted.items() if k in names}


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``method.knob=value`` overrides; a value that is JSON (numbers, lists, true / false, null) is parsed,
    anything else (``time_ordered``, ``mean_query``) stays a string."""
    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, knob = key.partition(".")
        if not (eq and dot and method and knob):
            raise SystemExit(f"--set {item!r}: expected method.knob=value, for example mukv.rerank=false")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[knob] = parsed
    return out


def run_one(llm, method_name: str, knobs: dict, videos, engine_settings: EngineSettings, judge) -> tuple[list, list]:
    method = CACHE_METHODS[method_name](**knobs)
    engine = StreamingEngine(llm, method, engine_settings)
    rows, mem = [], []
    for video in videos:
        def on_answer(rec, rows=rows):
            row = rec.row()
            row["judge_correct"] = judge.judge(rec.question, rec.answer, rec.prediction).correct
            rows.append(row)

        mem.append(engine.run_video(video, on_answer).__dict__)
    return rows, mem


def summarise(rows: list[dict], mem: list[dict]) -> dict:
    df = pd.DataFrame(rows)
    out = {"questions": len(df), "accuracy": float(df.judge_correct.mean())}
    out["accuracy_lo"], out["accuracy_hi"] = wilson_interval(int(df.judge_correct.sum()), len(df))
    for t in QUESTION_TYPES:
        sub = df[df.qtype == t]
        out[t] = float(sub.judge_correct.mean()) if len(sub) else float("nan")
    # recall diagnostic: share of the detail needles the recalled context holds (methods that report it)
    rec = df[df.qtype == "detail"].evidence_recalled.dropna() if "evidence_recalled" in df else pd.Series(dtype=float)
    out["detail_recall"] = float(rec.mean()) if len(rec) else float("nan")
    out.update(online_tokens=float(df.online_tokens.mean()), kv_mib=float(pd.DataFrame(mem).peak_kv_bytes.mean()) / 2**20,
               latency_ms=1000 * float(df.latency_s.mean()), mean_age_s=float(df.end_time.sub(df.start_time).mean()))
    return out


def markdown(results: pd.DataFrame) -> str:
    cols = ["length_s", "frames", "streams", "method", "budget", "kv_quant", "questions", "accuracy", *QUESTION_TYPES,
            "detail_recall", "online_tokens", "kv_mib", "latency_ms"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    lines = []
    for _, r in results.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if c == "accuracy" and "accuracy_lo" in r and not pd.isna(v):  # with its 95% Wilson interval
                cells.append(f"{100 * v:.0f} ({100 * r['accuracy_lo']:.0f}-{100 * r['accuracy_hi']:.0f})")
            elif c in ("accuracy", "detail_recall", *QUESTION_TYPES):
                cells.append("-" if pd.isna(v) else f"{100 * v:.0f}")
            elif isinstance(v, float):
                cells.append(f"{v:.3g}" if c != "length_s" else f"{v:g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    chance = ", ".join(f"{t} {100 * c:.0f}%" for t, c in CHANCE.items())
    return head + "\n".join(lines) + (f"\n\nChance per type: {chance}. Accuracy columns in %; accuracy with its 95% "
                                       "Wilson interval. detail_recall: % of detail needles in the recalled "
                                       "context (methods that report it).\n")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--lengths", type=float, nargs="+", help="stream lengths in seconds")
    ap.add_argument("--videos", type=int)
    ap.add_argument("--budgets", type=int, nargs="+", help="context budgets in frames")
    ap.add_argument("--methods", nargs="+", help=f"default: every registered one of {METHOD_ORDER}")
    ap.add_argument("--seed", type=int, help="evaluation dataset seed (held out: < 1,000,000)")
    ap.add_argument("--model-path", default=None, help="a nano checkpoint folder (default: the shipped one)")
    ap.add_argument("--sample-fps", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--set", nargs="*", default=[], help="method.knob=value overrides")
    ap.add_argument("--kv-quant", nargs="+", choices=["none", "int8", "int4"],
                    help="block-store quantization modes to compare (rekv, mukv)")
    ap.add_argument("--needle-depth", type=float, default=None,
                    help="detail needles at this fraction of the frames shown (default: random)")
    ap.add_argument("--types", nargs="+", choices=QUESTION_TYPES,
                    help="ask only these question types (the streams then show only their evidence)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    lengths = args.lengths or p["lengths"]
    n_videos = args.videos or p["videos"]
    budgets = args.budgets or p["budgets"]
    seed = p["seed"] if args.seed is None else args.seed
    quant_modes = args.kv_quant or p.get("kv_quant") or ["none"]
    type_sets = [args.types] if args.types else p.get("types") or [list(QUESTION_TYPES)]
    methods = args.methods or p.get("methods") or [m for m in METHOD_ORDER if m in CACHE_METHODS]
    missing = [m for m in methods if m not in CACHE_METHODS]
    if missing:
        ap.error(f"unknown methods {missing}; registered: {sorted(CACHE_METHODS)}")
    overrides = parse_sets(args.set)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out or ROOT / "outputs" / "nano_benchmark" / f"{stamp}_{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    llm = load_video_llm("nano", args.model_path, device="cpu", dtype="float32")
    settings = EngineSettings(encode_chunk_size=64, max_new_tokens=args.max_new_tokens, progress=False)
    judge = ExactMatchJudge()
    results = []
    t_all = time.time()
    for length, types in itertools.product(lengths, type_sets):
        videos = make_synthetic_dataset(SyntheticSpec(num_videos=n_videos, duration_s=length,
                                                      sample_fps=args.sample_fps, questions_per_video=5, seed=seed,
                                                      needle_depth=args.needle_depth, question_types=tuple(types)))
        streams = "all" if set(types) == set(QUESTION_TYPES) else "+".join(types)
        runs = [(m, b, q) for m in methods for b in ([None] if m == "full" else budgets)
                for q in (quant_modes if m in STORE_METHODS else ["none"])]
        for m, budget, quant in runs:
            knobs = {**(knobs_for(m, budget) if budget else {}), **overrides.get(m, {})}
            if quant != "none":
                knobs["kv_quant"] = quant
                # the default group (64 values) must divide the head dimension: nano's is 24 -> groups of 8
                knobs.setdefault("kv_quant_group_size", math.gcd(64, llm.geometry.head_dim))
            t0 = time.time()
            rows, mem = run_one(llm, m, knobs, videos, settings, judge)
            tag = (f"{m}_{'b' + str(budget) if budget else 'all'}_L{int(length)}" + ("" if quant == "none" else f"_{quant}")
                   + ("" if streams == "all" else f"_{streams}"))
            pd.DataFrame(rows).to_csv(out / f"predictions_{tag}.csv", index=False)
            res = {"length_s": length, "frames": int(length * args.sample_fps), "streams": streams, "method": m,
                   "budget": budget or "all", "kv_quant": knobs.get("kv_quant", "none"), "knobs": json.dumps(knobs),
                   **summarise(rows, mem), "wall_s": time.time() - t0}
            results.append(res)
            print(f"  {tag:<28} acc {100 * res['accuracy']:5.1f}% (95% CI {100 * res['accuracy_lo']:.0f}-"
                  f"{100 * res['accuracy_hi']:.0f}%, n={res['questions']})  online {res['online_tokens']:7.0f}  "
                  f"({res['wall_s']:.0f}s)", flush=True)
    df = pd.DataFrame(results)
    df.to_csv(out / "results.csv", index=False)
    md = markdown(df)
    info = (f"Command: `python experiments/nano_benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f"  \nMachine: {platform.node()} ({platform.machine()}, {torch.get_num_threads()} torch threads), "
            f"date {dt.date.today()}, total {time.time() - t_all:.0f} s  \nHeld-out videos: "
            f"SyntheticSpec(seed={seed}, num_videos={n_videos}, questions_per_video=5, sample_fps={args.sample_fps})"
            f", lengths {lengths} s\n\n")
    (out / "results.md").write_text(info + md)
    print("\n" + md + f"\n-> {out}")
    return df


if __name__ == "__main__":
    main()
