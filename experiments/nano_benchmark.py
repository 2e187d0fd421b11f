"""The nano model on the synthetic benchmark: every cache method across budget and stream length, one table.

    python experiments/nano_benchmark.py --preset quick      # `make run`: seconds
    python experiments/nano_benchmark.py --preset table      # the BENCHMARKS.md table (tens of minutes)
    python experiments/nano_benchmark.py --preset in_range   # cache=full within the training length
    python experiments/nano_benchmark.py --preset quant      # methods with a block store, int8 / int4
    python experiments/nano_benchmark.py --preset each_type  # cache=full on streams that ask one type each
    python experiments/nano_benchmark.py --preset table --methods mukv -- cache.rerank=false

Every point is one run of the entry point: a config composed with Hydra's compose API (``model=nano
dataset=synthetic cache=<method> budget_frames=<b> judge=exact`` plus the stream's ``dataset.synthetic.*``)
and run by ``mukv.train_eval.train_eval`` into ``<out>/runs/<point>/``, exactly as ``python -m mukv.run``
would; the table is read back from each run folder (``predictions.csv``, ``memory_stats.csv``). Every
point streams the same held-out videos (evaluation seeds, never trained on) and is scored by exact match.

Methods are the registry's (``mukv.cache.ordered_methods``: every method with a ``conf/cache/<name>.yaml``,
so a new method is benchmarked by existing); ``--methods`` takes ``conf/cache`` options, each optionally
followed by Hydra overrides for it alone (``--methods mukv mukv cache.rerank=false``: two rows, as
``mukv.bench``). Budgets are in frames and reach each method through ``budget_frames=`` (the method's
``budget_knobs``); a method without a budget runs once (budget ``all``). Hydra overrides after ``--`` (or
after the options when ``--methods`` is not given) apply to every run. Writes ``results.csv``,
``results.md`` and one ``predictions_<point>.csv`` per run into ``--out``, one run folder per row in
``--out/runs/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mukv.bench import MethodSpec, compose_config, parse_method_specs, registered_name  # noqa: E402
from mukv.cache import budget_knobs, ordered_methods  # noqa: E402
from mukv.data.synthetic import CHANCE, QUESTION_TYPES  # noqa: E402
from mukv.report.metrics import wilson_interval  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # `make run`: 5x the training length, one budget, two videos (one question of each type each)
    "quick": dict(lengths=[300.0], videos=2, budgets=[16], seed=0),
    # BENCHMARKS.md: within the training length and 10x / 20x beyond it, two budgets
    "table": dict(lengths=[60.0, 640.0, 1280.0], videos=12, budgets=[8, 16], seed=1000),
    # the accuracy target of cache=full within the training length
    "in_range": dict(lengths=[60.0], videos=60, budgets=[16], seed=2000, methods=["full"]),
    # the accuracy cost of a quantized block store (10x the training length): the methods with a block store
    "quant": dict(lengths=[640.0], videos=12, budgets=[16], seed=1000, methods=["rekv", "mukv"],
                  kv_quant=["none", "int8", "int4"]),
    # each type on streams of its own (a count-only stream shows rings but no needles or balls), within range
    "each_type": dict(lengths=[60.0], videos=40, budgets=[16], seed=700, methods=["full"],
                      types=[[t] for t in QUESTION_TYPES]),
}
# The one nano-specific setting of every preset, as Hydra overrides per registered method: ReKV's encoding
# window stays within the nano model's trained span of 32 frames (32 x 16 = 512 tokens; the published 15,000
# tokens would hold a whole 300 s stream). Its budget is retrieve_size (budget_frames), not this window.
METHOD_OVERRIDES: dict[str, list[str]] = {"rekv": ["cache.n_local=512"]}
# A quantized store's group must divide the head dimension: the default 64 does not divide nano's 24.
QUANT_GROUP_SIZE = 8


def has_budget(method: str) -> bool:
    """Whether ``budget_frames`` changes the method (``budget_knobs`` not empty); ``full`` keeps everything."""
    return bool(budget_knobs(method, 1, 1))


def summarise(rows: pd.DataFrame, mem: pd.DataFrame) -> dict[str, Any]:
    """The table's numbers of one run, from its predictions and memory rows."""
    df = rows
    out: dict[str, Any] = {"questions": len(df), "accuracy": float(df.judge_correct.mean())}
    out["accuracy_lo"], out["accuracy_hi"] = wilson_interval(int(df.judge_correct.sum()), len(df))
    for t in QUESTION_TYPES:
        sub = df[df.qtype == t]
        out[t] = float(sub.judge_correct.mean()) if len(sub) else float("nan")
    # recall diagnostic: share of the detail needles the recalled context holds (methods that report it)
    rec = df[df.qtype == "detail"].evidence_recalled.dropna() if "evidence_recalled" in df else pd.Series(dtype=float)
    out["detail_recall"] = float(rec.mean()) if len(rec) else float("nan")
    out.update(online_tokens=float(df.online_tokens.mean()), kv_mib=float(mem.peak_kv_bytes.mean()) / 2**20,
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


def changed_knobs(default: dict[str, Any], used: dict[str, Any]) -> dict[str, Any]:
    """The cache knobs a run set away from its config's defaults (budget, preset and user overrides)."""
    return {k: v for k, v in used.items() if k != "_target_" and default.get(k) != v}


def run_point(cfg: DictConfig, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One run of the entry point into ``folder``; its predictions, memory rows and resolved cache config."""
    from mukv.train_eval import train_eval

    cfg.paths.root_dir = str(ROOT)  # set outside a Hydra job (there the launch folder and the job folder)
    cfg.paths.output_dir = str(folder)
    result = train_eval(cfg, folder)
    if not result.ok:
        raise SystemExit(f"error: the run in {folder} failed: {'; '.join(result.failures)}")
    resolved = yaml.safe_load((folder / "resolved_config.yaml").read_text())
    return pd.read_csv(folder / "predictions.csv"), pd.read_csv(folder / "memory_stats.csv"), resolved["cache"]


def stream_overrides(length: float, types: list[str], n_videos: int, seed: int, args) -> list[str]:
    """The held-out synthetic streams and the answer settings every point shares."""
    out = ["model=nano", "dataset=synthetic", "judge=exact", "logger=none",
           f"dataset.sample_fps={args.sample_fps}", f"dataset.synthetic.num_videos={n_videos}",
           f"dataset.synthetic.duration_s={length}", "dataset.synthetic.questions_per_video=5",
           f"dataset.synthetic.seed={seed}",
           f"dataset.synthetic.needle_depth={'null' if args.needle_depth is None else args.needle_depth}",
           f"dataset.synthetic.question_types=[{','.join(types)}]",
           "engine.encode_chunk_size=64", f"engine.max_new_tokens={args.max_new_tokens}", "engine.progress=false"]
    if args.model_path:
        out.append(f"model.path={args.model_path}")
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--lengths", type=float, nargs="+", help="stream lengths in seconds")
    ap.add_argument("--videos", type=int)
    ap.add_argument("--budgets", type=int, nargs="+", help="context budgets in frames (budget_frames=)")
    ap.add_argument("--methods", nargs="+", help="conf/cache options, each optionally followed by Hydra overrides for "
                                                 "it alone (default: every method of the registry)")
    ap.add_argument("--seed", type=int, help="evaluation dataset seed (held out: < 1,000,000)")
    ap.add_argument("--model-path", default=None, help="a nano checkpoint folder (default: the shipped one)")
    ap.add_argument("--sample-fps", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--kv-quant", nargs="+", choices=["none", "int8", "int4"],
                    help="block-store quantization modes to compare (methods with a kv_quant knob)")
    ap.add_argument("--needle-depth", type=float, default=None,
                    help="detail needles at this fraction of the frames shown (default: random)")
    ap.add_argument("--types", nargs="+", choices=QUESTION_TYPES,
                    help="ask only these question types (the streams then show only their evidence)")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. cache.rerank=false")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    lengths = args.lengths or p["lengths"]
    n_videos = args.videos or p["videos"]
    budgets = args.budgets or p["budgets"]
    seed = p["seed"] if args.seed is None else args.seed
    quant_modes = args.kv_quant or p.get("kv_quant") or ["none"]
    type_sets = [args.types] if args.types else p.get("types") or [list(QUESTION_TYPES)]
    try:
        specs = parse_method_specs(args.methods or p.get("methods") or ordered_methods())
    except ValueError as err:
        ap.error(str(err))
    user = list(args.overrides)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(args.out or ROOT / "outputs" / "nano_benchmark" / f"{stamp}_{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    # per method: its registered name (from the composed config) and whether it has a budget and a store
    methods: list[tuple[MethodSpec, str, dict[str, Any]]] = []
    for spec in specs:
        default = compose_config([f"cache={spec.option}"]).cache
        methods.append((spec, registered_name(default), OmegaConf.to_container(default, resolve=True)))
    # every point composed before anything runs: a bad option or key fails at once, in one line
    points = []
    for length, types in itertools.product(lengths, type_sets):
        streams = "all" if set(types) == set(QUESTION_TYPES) else "+".join(types)
        base = stream_overrides(length, types, n_videos, seed, args)
        for spec, name, default in methods:
            for budget in (budgets if has_budget(name) else [None]):
                for quant in (quant_modes if "kv_quant" in default else ["none"]):
                    quant_set = [] if quant == "none" else [f"cache.kv_quant={quant}",
                                                             f"cache.kv_quant_group_size={QUANT_GROUP_SIZE}"]
                    overrides = [*base, f"cache={spec.option}", *([f"budget_frames={budget}"] if budget else []),
                                 *METHOD_OVERRIDES.get(name, []), *quant_set, *spec.overrides, *user]
                    tag = (f"{spec.slug}_{'b' + str(budget) if budget else 'all'}_L{int(length)}"
                           + ("" if quant == "none" else f"_{quant}") + ("" if streams == "all" else f"_{streams}"))
                    row = {"length_s": length, "frames": int(length * args.sample_fps), "streams": streams,
                           "method": spec.label, "budget": budget or "all"}
                    points.append((tag, compose_config(overrides), row, default))
    results = []
    t_all = time.time()
    for tag, cfg, row, default in points:
        t0 = time.time()
        rows, mem, cache = run_point(cfg, out / "runs" / tag)
        shutil.copyfile(out / "runs" / tag / "predictions.csv", out / f"predictions_{tag}.csv")
        res = {**row, "kv_quant": cache.get("kv_quant", "none"), "knobs": json.dumps(changed_knobs(default, cache)),
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
            f", lengths {lengths} s; one run folder per row in {out / 'runs'}\n\n")
    (out / "results.md").write_text(info + md)
    print("\n" + md + f"\n-> {out}")
    return df


if __name__ == "__main__":
    main()
