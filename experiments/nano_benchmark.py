"""The nano model on the synthetic benchmark: every cache method across budget and stream length, one table.

    python experiments/nano_benchmark.py --preset quick      # `make run`: seconds
    python experiments/nano_benchmark.py --preset table      # the table: equal tokens, 3 seeds, paired tests
    python experiments/nano_benchmark.py --preset table_frames  # its secondary view: budgets in frames, 1 seed
    python experiments/nano_benchmark.py --preset in_range   # cache=full within the training length
    python experiments/nano_benchmark.py --preset quant      # methods with a block store, int8 / int4
    python experiments/nano_benchmark.py --preset each_type  # cache=full on streams that ask one type each
    python experiments/nano_benchmark.py --preset table --methods mukv mukv cache.rerank=false --references mukv

Every point is one run of the entry point: a config composed with Hydra's compose API (``model=nano
dataset=synthetic cache=<method> budget_frames=<b> judge=exact`` plus the stream's ``dataset.synthetic.*``)
and run by ``mukv.train_eval.train_eval`` into ``<out>/runs/<point>/``, exactly as ``python -m mukv.run``
would; the table is read back from each run folder (``predictions.csv``, ``memory_stats.csv``). Every
point streams the same held-out videos (evaluation seeds, never trained on) and is scored by exact match.

Methods are the registry's (``mukv.cache.ordered_methods``: every method with a ``conf/cache/<name>.yaml``,
so a new method is benchmarked by existing); ``--methods`` takes ``conf/cache`` options, each optionally
followed by Hydra overrides for it alone (``--methods mukv mukv cache.rerank=false``: two rows, as
``mukv.bench``). Budgets are in frames and reach each method through ``budget_frames=`` (the method's
``budget_knobs``); with ``--budget-unit tokens`` they are video tokens (the init prompt aside) and reach it
through ``budget_tokens=`` (the largest frame budget whose answer context holds at most that many: the
method's ``video_tokens``), so every method answers from about the same number of tokens. The table shows
each run's ``budget_video_tokens`` (what its knobs let the answer hold) beside the measured mean
``online_tokens`` (init prompt included). A method without a budget runs once (budget ``all``). Hydra overrides after ``--`` (or
after the options when ``--methods`` is not given) apply to every run. Writes ``results.csv``,
``results.md`` and one ``predictions_<point>.csv`` per run into ``--out``, one run folder per row in
``--out/runs/``. ``--seeds`` pools several held-out seeds per cell (``results_by_seed.csv`` keeps each);
``--references`` pairs every row with those methods on the same questions (``vs_<method>``: paired bootstrap
interval, McNemar); ``--shard I/N`` then ``--render-only`` splits a long table over processes or machines.
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
from mukv.data.synthetic import CHANCE, QUESTION_CATEGORIES, QUESTION_TYPES  # noqa: E402
from mukv.report.compare import compare  # noqa: E402
from mukv.report.metrics import WINDOW_AGE_BUCKETS, summarize, truth, window_age_breakdown  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # `make run`: 5x the training length, one budget, two videos (one question of each type each)
    "quick": dict(lengths=[300.0], videos=2, budgets=[16], seed=0),
    # the secondary view of the table: budgets in frames (each method's own unit), one seed, two budgets
    "table_frames": dict(lengths=[60.0, 640.0, 1280.0], videos=12, budgets=[8, 16], seed=1000),
    # the accuracy target of cache=full within the training length
    "in_range": dict(lengths=[60.0], videos=60, budgets=[16], seed=2000, methods=["full"]),
    # the accuracy cost of a quantized block store (10x the training length): the methods with a block store
    "quant": dict(lengths=[640.0], videos=12, budgets=[16], seed=1000, methods=["rekv", "mukv"],
                  kv_quant=["none", "int8", "int4"]),
    # each type on streams of its own (a count-only stream shows rings but no needles or balls), within range
    "each_type": dict(lengths=[60.0], videos=40, budgets=[16], seed=700, methods=["full"],
                      types=[[t] for t in QUESTION_TYPES]),
    # the table (BENCHMARKS.md section 2), under the evidence protocol of issue #31: every method answers from
    # the same 256 video tokens (16 nano frames), three held-out seeds of 67 streams (201 questions of each
    # type per cell), the position-bounded full cache beside the full one; within range and at 10x / 20x.
    # Long: shard it (--shard I/N, then --render-only)
    "table": dict(lengths=[60.0, 640.0, 1280.0], videos=67, budgets=[256], budget_unit="tokens",
                     seeds=[918273, 555555, 424242], extra_methods=["full_bounded"],
                     references=["full", "full_bounded"]),
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


def summarise(rows: pd.DataFrame, mem: pd.DataFrame, window_s: float | None = None) -> dict[str, Any]:
    """The table's numbers of one run, from its predictions and memory rows; ``window_s`` (the seconds of stream
    the run's budget holds: its ``metrics.json``) adds detail accuracy and recall by evidence age in windows."""
    df = rows
    # accuracy, per type and per category with their Wilson intervals: the run's own metrics (mukv.report.metrics)
    m = summarize(df, mem, sample_fps=0.0, age_buckets_s=[], categories=QUESTION_CATEGORIES)
    out: dict[str, Any] = {"questions": len(df), "accuracy": m["accuracy"], "accuracy_lo": m["accuracy_lo"],
                           "accuracy_hi": m["accuracy_hi"]}
    for t in QUESTION_TYPES:
        out[t] = m.get("by_type", {}).get(t, {}).get("accuracy", float("nan"))
    # what each kind of question measures (memory / recency / cross-frame reasoning), with its interval
    for cat in QUESTION_CATEGORIES:
        c = m.get("by_category", {}).get(cat, {})
        out[cat] = c.get("accuracy", float("nan"))
        out[f"{cat}_lo"], out[f"{cat}_hi"] = c.get("accuracy_lo", float("nan")), c.get("accuracy_hi", float("nan"))
        out[f"{cat}_n"] = c.get("judged", 0)
    # answers whose context reaches past the model's trained positions (extrapolation, not only memory)
    beyond = truth(df["beyond_trained"]) if "beyond_trained" in df else pd.Series(dtype=object)
    out["beyond_trained"] = float(beyond.eq(True).mean()) if beyond.notna().any() else float("nan")
    # recall diagnostic: share of the detail needles the recalled context holds (methods that report it)
    rec = df[df.qtype == "detail"].evidence_recalled.dropna() if "evidence_recalled" in df else pd.Series(dtype=float)
    out["detail_recall"] = float(rec.mean()) if len(rec) else float("nan")
    # detail by the age of its needle in the method's windows: inside the span a same-budget sliding window holds,
    # 1-4 windows back, older (memory proper); accuracy, count and recall per bucket (no budget: no window)
    detail = df[df.qtype == "detail"]
    by_window = window_age_breakdown(detail, window_s) if window_s and len(detail) else {}
    for name, *_ in WINDOW_AGE_BUCKETS:
        b = by_window.get(name, {})
        out[f"detail_{name}"], out[f"detail_{name}_n"] = b.get("accuracy"), b.get("judged", 0)
        out[f"recall_{name}"] = b.get("recall")
    out["window_s"] = window_s
    # of the KV held, what sits on the device when a question is answered (the rest is in a host store)
    device = pd.to_numeric(df["device_kv_bytes"], errors="coerce") if "device_kv_bytes" in df else pd.Series(dtype=float)
    out["device_kv_mib"] = float(device.mean()) / 2**20 if device.notna().any() else float("nan")
    out.update(online_tokens=float(df.online_tokens.mean()), kv_mib=float(mem.peak_kv_bytes.mean()) / 2**20,
               latency_ms=1000 * float(df.latency_s.mean()), mean_age_s=float(df.end_time.sub(df.start_time).mean()))
    return out


def paired_with(results: list[dict[str, Any]], predictions: dict[str, pd.DataFrame], reference: str = "full") -> None:
    """Each row against the ``reference`` method on the same streams (same length and types): the accuracy
    difference with its paired bootstrap interval and McNemar's exact p-value (``vs_<reference>_*``), paired by
    question id. At 10-20x the training length the meaningful reference is ``full_bounded``."""
    refs = {(r["length_s"], r["streams"]): r["tag"] for r in results if r["method"] == reference}
    for r in results:
        ref = refs.get((r["length_s"], r["streams"]))
        if ref is None or r["tag"] == ref:
            continue
        c = compare(predictions[r["tag"]], predictions[ref])
        r.update({f"vs_{reference}_diff": c.diff, f"vs_{reference}_lo": c.diff_lo, f"vs_{reference}_hi": c.diff_hi,
                  f"vs_{reference}_p": c.p_value})


def markdown(results: pd.DataFrame, references: tuple[str, ...] = ("full",)) -> str:
    cols = ["length_s", "frames", "streams", "method", "budget", "budget_video_tokens", "kv_quant", "questions",
            "accuracy", "per_seed",
            *QUESTION_CATEGORIES, *(f"vs_{ref}" for ref in references), *QUESTION_TYPES, "detail_recall", "detail_by_window_age", "recall_by_window_age", "beyond_trained", "online_tokens",
            "kv_mib", "device_kv_mib", "latency_ms"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    lines = []
    for _, r in results.iterrows():
        cells = []
        for c in cols:
            v = r.get(c, float("nan"))
            if c == "per_seed":  # the range of the seeds' own accuracies (pooled cells only)
                several = " " in str(r.get("seeds", ""))
                cells.append(f"{100 * r['seed_lo']:.0f}-{100 * r['seed_hi']:.0f}" if several else "-")
            elif c.startswith("vs_"):  # accuracy difference to a reference, its interval, * where McNemar p < 0.05
                d = r.get(f"{c}_diff", float("nan"))
                cells.append("-" if pd.isna(d) else f"{100 * d:+.0f} ({100 * r[c + '_lo']:+.0f} to "
                                                   f"{100 * r[c + '_hi']:+.0f}){'*' if r[c + '_p'] < 0.05 else ''}")
            elif c in QUESTION_CATEGORIES:  # with its 95% Wilson interval
                cells.append("-" if pd.isna(v) else f"{100 * v:.0f} ({100 * r[c + '_lo']:.0f}-{100 * r[c + '_hi']:.0f})")
            elif c in ("detail_by_window_age", "recall_by_window_age"):  # in window / 1-4 windows / older
                key = c.split("_by_")[0]
                vals = [r.get(f"{key}_{name}") for name, *_ in WINDOW_AGE_BUCKETS]
                cells.append("-" if all(x is None or pd.isna(x) for x in vals) else " / ".join(
                    "-" if x is None or pd.isna(x) else f"{100 * x:.0f}" for x in vals))
            elif c == "beyond_trained":
                cells.append("-" if pd.isna(v) else f"{100 * v:.0f}")
            elif c == "budget_video_tokens":  # None / NaN: a method without a budget
                cells.append("-" if v is None or pd.isna(v) else f"{int(v)}")
            elif c == "accuracy" and "accuracy_lo" in r and not pd.isna(v):  # with its 95% Wilson interval
                cells.append(f"{100 * v:.0f} ({100 * r['accuracy_lo']:.0f}-{100 * r['accuracy_hi']:.0f})")
            elif c in ("accuracy", "detail_recall", *QUESTION_TYPES):
                cells.append("-" if pd.isna(v) else f"{100 * v:.0f}")
            elif isinstance(v, float):
                cells.append(f"{v:.3g}" if c != "length_s" else f"{v:g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    chance = ", ".join(f"{t} {100 * c:.0f}%" for t, c in CHANCE.items())
    categories = "; ".join(f"{c} = {' + '.join(t)}" for c, t in QUESTION_CATEGORIES.items())
    return head + "\n".join(lines) + (f"\n\nChance per type: {chance}. Accuracy columns in %; accuracy and the "
                                       f"categories ({categories}) with their 95% Wilson interval. vs_<method>: "
                                       "accuracy minus that method's on the same questions, 95% paired bootstrap "
                                       "interval, * where McNemar's exact test gives p < 0.05. detail_recall: % of "
                                       "detail needles in the recalled context (methods that report it). detail_by_window_age / "
                                       "recall_by_window_age: detail accuracy / recall by the needle's age in the "
                                       "method's window (the frames its budget holds; a method without a budget: the "
                                       "widest window of its length's rows): inside it / 1-4 windows back / older "
                                       "(counts per bucket in results.csv). per_seed: the range of the "
                                       "held-out seeds' accuracies (several seeds: the other columns pool them). "
                                       "beyond_trained: % of answers whose context reaches past the model's trained "
                                       "positions. kv_mib: peak KV bytes of a video, device and host store "
                                       "together (mean over videos); device_kv_mib: the part on the device when a "
                                       "question is answered (mean over answers).\n")


def changed_knobs(default: dict[str, Any], used: dict[str, Any]) -> dict[str, Any]:
    """The cache knobs a run set away from its config's defaults (budget, preset and user overrides)."""
    return {k: v for k, v in used.items() if k != "_target_" and default.get(k) != v}


def run_point(cfg: DictConfig, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One run of the entry point into ``folder``; its predictions, memory rows and resolved cache config (with
    the run's ``budget_video_tokens`` from ``metrics.json`` under that key)."""
    from mukv.train_eval import train_eval

    cfg.paths.root_dir = str(ROOT)  # set outside a Hydra job (there the launch folder and the job folder)
    cfg.paths.output_dir = str(folder)
    result = train_eval(cfg, folder)
    if not result.ok:
        raise SystemExit(f"error: the run in {folder} failed: {'; '.join(result.failures)}")
    resolved = yaml.safe_load((folder / "resolved_config.yaml").read_text())
    cache = {**resolved["cache"], "budget_video_tokens": result.metrics.get("budget_video_tokens")}
    return pd.read_csv(folder / "predictions.csv"), pd.read_csv(folder / "memory_stats.csv"), cache


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
    ap.add_argument("--budgets", type=int, nargs="+", help="context budgets in --budget-unit (default: frames)")
    ap.add_argument("--budget-unit", choices=["frames", "tokens"], default=None,
                    help="frames: --budgets are budget_frames=; tokens: video tokens of the answer context, "
                         "budget_tokens= (the method's video_tokens). Default: the preset's (tokens for table)")
    ap.add_argument("--methods", nargs="+", help="conf/cache options, each optionally followed by Hydra overrides for "
                                                 "it alone (default: every method of the registry)")
    ap.add_argument("--seed", type=int, help="evaluation dataset seed (held out: < 1,000,000)")
    ap.add_argument("--seeds", type=int, nargs="+", help="several held-out seeds: each cell runs on each, the table "
                    "pools them (intervals over all questions) and shows the per-seed spread")
    ap.add_argument("--shard", default=None, help="I/N: run every N-th point from the I-th (0-based) into --out; "
                    "after all shards, --render-only --out DIR writes the table")
    ap.add_argument("--references", nargs="+", help="methods every row is paired with (vs_<method> columns; default "
                    "full, and full_bounded for the table preset)")
    ap.add_argument("--render-only", action="store_true", help="write the table from the runs already in --out")
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
    preset_unit = p.get("budget_unit", "frames")
    args.budget_unit = args.budget_unit or (preset_unit if not args.budgets else "frames")
    if args.budget_unit != preset_unit and not args.budgets:
        ap.error(f"--budget-unit {args.budget_unit} needs --budgets (the preset's budgets are {preset_unit})")
    budgets = args.budgets or p["budgets"]
    budget_key, budget_tag = ("budget_frames", "b") if args.budget_unit == "frames" else ("budget_tokens", "t")
    seed = p.get("seed", 0) if args.seed is None else args.seed
    quant_modes = args.kv_quant or p.get("kv_quant") or ["none"]
    type_sets = [args.types] if args.types else p.get("types") or [list(QUESTION_TYPES)]
    try:
        specs = parse_method_specs(args.methods or p.get("methods") or [*ordered_methods(), *p.get("extra_methods", [])])
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
    seeds = args.seeds or ([seed] if args.seed is not None or "seeds" not in p else p["seeds"])
    for length, types, s in itertools.product(lengths, type_sets, seeds):
        streams = "all" if set(types) == set(QUESTION_TYPES) else "+".join(types)
        base = stream_overrides(length, types, n_videos, s, args)
        for spec, name, default in methods:
            for budget in (budgets if has_budget(name) else [None]):
                for quant in (quant_modes if "kv_quant" in default else ["none"]):
                    quant_set = [] if quant == "none" else [f"cache.kv_quant={quant}",
                                                             f"cache.kv_quant_group_size={QUANT_GROUP_SIZE}"]
                    overrides = [*base, f"cache={spec.option}", *([f"{budget_key}={budget}"] if budget else []),
                                 *METHOD_OVERRIDES.get(name, []), *quant_set, *spec.overrides, *user]
                    cell = (f"{spec.slug}_{budget_tag + str(budget) if budget else 'all'}_L{int(length)}"
                            + ("" if quant == "none" else f"_{quant}") + ("" if streams == "all" else f"_{streams}"))
                    tag = cell if len(seeds) == 1 else f"{cell}_s{s}"
                    row = {"length_s": length, "frames": int(length * args.sample_fps), "streams": streams,
                           "method": spec.label, "budget": budget or "all", "budget_unit": args.budget_unit,
                           "cell": cell, "seed": s}
                    points.append((tag, compose_config(overrides), row, default))
    index, count = (int(x) for x in (args.shard or "0/1").split("/"))
    t_all = time.time()
    if not args.render_only:
        (out / "points").mkdir(exist_ok=True)
        for tag, cfg, row, default in points[index::count]:
            t0 = time.time()
            rows, mem, cache = run_point(cfg, out / "runs" / tag)
            shutil.copyfile(out / "runs" / tag / "predictions.csv", out / f"predictions_{tag}.csv")
            video_tokens = cache.pop("budget_video_tokens")
            res = {**row, "tag": tag, "budget_video_tokens": video_tokens, "kv_quant": cache.get("kv_quant", "none"),
                   "knobs": json.dumps(changed_knobs(default, cache)), "wall_s": time.time() - t0}
            (out / "points" / f"{tag}.json").write_text(json.dumps(res))
            acc = summarise(rows, mem)
            print(f"  {tag:<28} acc {100 * acc['accuracy']:5.1f}% (95% CI {100 * acc['accuracy_lo']:.0f}-"
                  f"{100 * acc['accuracy_hi']:.0f}%, n={acc['questions']})  online {acc['online_tokens']:7.0f}  "
                  f"({res['wall_s']:.0f}s)", flush=True)
        if count > 1:
            print(f"shard {index}/{count} done; after every shard: --render-only --out {out}")
            return pd.DataFrame()
    def point_file(tag: str, row: dict[str, Any]) -> Path:
        # one seed of a folder run with several (--render-only --seeds S): that seed's points carry "_s<S>"
        plain = out / "points" / f"{tag}.json"
        seeded = out / "points" / f"{tag}_s{row['seed']}.json"
        return seeded if len(seeds) == 1 and not plain.is_file() and seeded.is_file() else plain

    files = [point_file(tag, row) for tag, _, row, _ in points]
    missing = [f.stem for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"error: {len(missing)} point(s) not run yet in {out} (first: {missing[0]}); run every shard")
    references = tuple(args.references or p.get("references") or ["full"])
    # one seed rendered out of a several-seed folder: its own files, the pooled table stays
    name = f"results_s{seeds[0]}" if any(f.stem != tag for f, (tag, *_) in zip(files, points, strict=True)) \
        else "results"
    df = render([json.loads(f.read_text()) for f in files], out, references, name)
    md = markdown(df, references)
    info = (f"Command: `python experiments/nano_benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f"  \nMachine: {platform.node()} ({platform.machine()}, {torch.get_num_threads()} torch threads), "
            f"date {dt.date.today()}, total {time.time() - t_all:.0f} s  \nHeld-out videos: "
            f"SyntheticSpec(seed={', '.join(map(str, seeds))}, num_videos={n_videos}, questions_per_video=5, "
            f"sample_fps={args.sample_fps}), lengths {lengths} s; one run folder per point in {out / 'runs'}\n\n")
    (out / f"{name}.md").write_text(info + md)
    print("\n" + md + f"\n-> {out}")
    return df


def render(points: list[dict[str, Any]], out: Path, references: tuple[str, ...] = ("full",),
           name: str = "results") -> pd.DataFrame:
    """The table from the points' run folders: one row per cell, its seeds pooled (every interval over all their
    questions; ``seed_lo`` / ``seed_hi`` the per-seed accuracy range), each paired with the full cache; writes
    ``<name>.csv`` (cells) and ``<name>_by_seed.csv`` (points)."""
    frames = {p["tag"]: (pd.read_csv(out / "runs" / p["tag"] / "predictions.csv"),
                         pd.read_csv(out / "runs" / p["tag"] / "memory_stats.csv"),
                         json.loads((out / "runs" / p["tag"] / "metrics.json").read_text()).get("window_s"))
              for p in points}
    # a method without a budget (the full caches) is broken down by the window of the budgeted rows of its length,
    # so that its detail by evidence age is the reference for theirs
    budget_window = {}
    for p in points:
        window = frames[p["tag"]][2]
        if window:
            budget_window[p["length_s"]] = max(window, budget_window.get(p["length_s"], 0.0))
    for p in points:
        rows, mem, window = frames[p["tag"]]
        frames[p["tag"]] = (rows, mem, window or budget_window.get(p["length_s"]))
    by_seed = [{**p, **summarise(*frames[p["tag"]])} for p in points]
    pd.DataFrame(by_seed).to_csv(out / f"{name}_by_seed.csv", index=False)
    results, predictions = [], {}
    for cell in dict.fromkeys(p["cell"] for p in points):
        group = [p for p in by_seed if p["cell"] == cell]
        rows = pd.concat([frames[p["tag"]][0] for p in group], ignore_index=True)
        mem = pd.concat([frames[p["tag"]][1] for p in group], ignore_index=True)
        first = {k: v for k, v in group[0].items() if k not in ("seed", "tag", "wall_s")}
        accuracies = [p["accuracy"] for p in group]
        predictions[cell] = rows
        window_s = frames[group[0]["tag"]][2]  # the same budget and sample rate in every seed of a cell
        results.append({**first, "tag": cell, "seeds": " ".join(str(p["seed"]) for p in group),
                        **summarise(rows, mem, window_s),
                        "seed_lo": min(accuracies), "seed_hi": max(accuracies),
                        "wall_s": sum(p["wall_s"] for p in group)})
    for reference in references:
        paired_with(results, predictions, reference)
    df = pd.DataFrame(results)
    df.to_csv(out / f"{name}.csv", index=False)
    return df


if __name__ == "__main__":
    main()
