"""Results tables from run folders: one row per run, as CSV and markdown.

``collect_runs`` reads every run folder (``metrics.json``, ``resolved_config.yaml``); ``results_frame``
turns them into one row per run with the paper's columns (accuracy, score, invalid judgments, online
tokens, KV GB per hour, peak memory, encode fps, latencies); ``write_tables`` writes ``results.csv``,
``results.md`` (per dataset, methods in the paper's order, plus a method x dataset accuracy table). Every
accuracy carries its 95% Wilson interval and the number of judged questions it is over, so that a
10-question table is not read as a result. For a dataset scored per question type and category (OVO-Bench:
``breakdowns``), ``results.md`` adds a table of every run's accuracy per type, per category (the mean of its
types) and overall (the mean of the categories), with published reference rows beside them (``Reference``:
counts per type, scored by the same averaging), also written as ``results_by_type.csv``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mukv.cache import method_rank
from mukv.report.metrics import macro_scores, wilson_interval

RUN_FIELDS = ("dataset", "method", "setting", "model", "role", "max_minutes", "shards")
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("questions", "questions"),
    ("judged", "judged"),
    ("invalid_judgments", "invalid"),
    ("accuracy_pct", "acc %"),
    ("accuracy_ci", "95% CI"),
    ("mean_score", "score"),
    ("mean_online_tokens", "online tok"),
    ("kv_gb_per_hour", "KV GB/h"),
    ("peak_kv_mb", "peak KV MB"),
    ("encode_fps", "enc fps"),
    ("mean_ttft_s", "TTFT s"),
    ("mean_latency_s", "latency s"),
    ("peak_rss_gb", "RSS GB"),
    ("peak_cuda_gb", "GPU GB"),
)


@dataclass
class RunInfo:
    """A finished run folder: its metrics and the parts of its config that tell runs apart."""

    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.metrics.get("method") or self.config.get("cache", {}).get("_target_", "?"))

    @property
    def dataset(self) -> str:
        return str(self.metrics.get("dataset") or self.config.get("dataset", {}).get("name", "?"))

    @property
    def role(self) -> str:
        """``main`` / ``budget`` / ... from a ``grid:<role>`` tag (experiments/reproduce_table.py)."""
        for tag in self.config.get("tags") or []:
            if str(tag).startswith("grid:"):
                return str(tag)[5:]
        return ""

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.csv"


def load_run(path: str | Path) -> RunInfo | None:
    """The run in ``path``, or None if it has no metrics.json (unfinished or not a run folder)."""
    path = Path(path)
    if not (path / "metrics.json").is_file():
        return None
    metrics = json.loads((path / "metrics.json").read_text())
    config: dict[str, Any] = {}
    for name in ("resolved_config.yaml", ".hydra/config.yaml"):
        if (path / name).is_file():
            config = yaml.safe_load((path / name).read_text()) or {}
            break
    knobs = {k: v for k, v in (config.get("cache") or {}).items() if k != "_target_"}
    for key in ("budget_frames", "budget_tokens"):  # a budget run's label names its budget beside the knobs it set
        if config.get(key) is not None:
            knobs[key] = config[key]
    return RunInfo(path, metrics, config, knobs)


def collect_runs(paths: Iterable[str | Path]) -> list[RunInfo]:
    """Every finished run under ``paths`` (run folders themselves, or folders containing them)."""
    runs: dict[Path, RunInfo] = {}
    for root in paths:
        root = Path(root)
        candidates = [root] if (root / "metrics.json").is_file() else sorted(p.parent for p in root.rglob("metrics.json"))
        for c in candidates:
            run = load_run(c)
            if run is not None:
                runs[c.resolve()] = run
    return list(runs.values())


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def settings(runs: Sequence[RunInfo]) -> dict[Path, str]:
    """A short label per run: the cache knobs (and stream length) that vary among runs of its method."""
    out: dict[Path, str] = {}
    by_method: dict[tuple[str, str], list[RunInfo]] = {}
    for r in runs:
        by_method.setdefault((r.method, r.dataset), []).append(r)
    for group in by_method.values():
        keys = sorted({k for r in group for k in r.knobs})
        varying = [k for k in keys if len({json.dumps(r.knobs.get(k), sort_keys=True) for r in group}) > 1]
        for r in group:
            parts = [f"{k}={_fmt_value(r.knobs[k])}" for k in varying if k in r.knobs]  # a main run has no budget_frames
            if r.metrics.get("max_minutes") is not None:
                parts.append(f"{_fmt_value(r.metrics['max_minutes'])} min")
            out[r.path] = ", ".join(parts) or "default"
    return out


def results_frame(runs: Sequence[RunInfo]) -> pd.DataFrame:
    """One row per run: what it was (dataset, method, setting, ...) and its metrics, in paper order."""
    labels = settings(runs)
    rows = []
    for r in runs:
        m = r.metrics
        acc = m.get("accuracy")
        lo, hi = _interval(m)
        rows.append({
            "dataset": r.dataset, "method": r.method, "setting": labels[r.path], "model": m.get("model"),
            "role": r.role, "max_minutes": m.get("max_minutes"), "shards": m.get("num_shards", 1),
            "questions": m.get("questions"), "judged": m.get("judged"),
            "invalid_judgments": m.get("invalid_judgments"), "correct": m.get("correct"),
            "accuracy_pct": None if acc is None else 100.0 * acc,
            "accuracy_lo_pct": None if lo is None else 100.0 * lo,
            "accuracy_hi_pct": None if hi is None else 100.0 * hi, "mean_score": m.get("mean_score"),
            "mean_online_tokens": m.get("mean_online_tokens"), "kv_gb_per_hour": m.get("kv_gb_per_hour"),
            "peak_kv_mb": None if m.get("peak_kv_bytes") is None else m["peak_kv_bytes"] / 1e6,
            "encode_fps": m.get("encode_fps"), "mean_ttft_s": m.get("mean_ttft_s"),
            "mean_latency_s": m.get("mean_latency_s"),
            "peak_rss_gb": None if m.get("peak_rss_bytes") is None else m["peak_rss_bytes"] / 1e9,
            "peak_cuda_gb": None if m.get("peak_cuda_bytes") is None else m["peak_cuda_bytes"] / 1e9,
            "failed_videos": m.get("failed_videos", 0), "run_dir": str(r.path),
        })
    df = pd.DataFrame(rows)
    if len(df):
        df["_o"] = df["method"].map(lambda m: method_rank(m)[0])  # the registry's display order
        df["_main"] = df["role"].ne("main")  # a method's main run first, then its sweep by budget
        df = df.sort_values(["dataset", "_o", "method", "_main", "mean_online_tokens", "setting"], kind="stable")
        df = df.drop(columns=["_o", "_main"]).reset_index(drop=True)
    return df


def _interval(m: dict[str, Any]) -> tuple[float | None, float | None]:
    """The run's 95% Wilson interval of accuracy, from its correct / judged counts (runs written before the
    interval was stored in metrics.json included); (None, None) without judged questions."""
    correct, judged = m.get("correct"), m.get("judged")
    if isinstance(correct, (int, float)) and isinstance(judged, (int, float)) and judged > 0:
        return wilson_interval(int(correct), int(judged))
    return m.get("accuracy_lo"), m.get("accuracy_hi")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def accuracy_text(acc_pct: Any, lo_pct: Any, hi_pct: Any, n: Any) -> str:
    """``62.5 (30.6-86.3), n=8``: accuracy %, its 95% Wilson interval, the judged questions."""
    if _missing(acc_pct):
        return "-"
    text = f"{acc_pct:.1f}"
    if not (_missing(lo_pct) or _missing(hi_pct)):
        text += f" ({lo_pct:.1f}-{hi_pct:.1f})"
    return text if _missing(n) else f"{text}, n={int(n)}"


def _cell(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(1, digits - len(str(int(abs(v)))))}f}"
    return str(v)


def markdown_table(df: pd.DataFrame, columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(label for _, label in columns) + " |"
    rule = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |" for _, row in df.iterrows()]
    return "\n".join([head, rule, *body])


def accuracy_pivot(df: pd.DataFrame) -> pd.DataFrame:
    """Method (setting) x dataset accuracy % with its 95% interval and judged questions (``accuracy_text``),
    the shape of the paper's main table (main runs only when the grid marks them)."""
    main = df[df["role"] == "main"] if (df["role"] == "main").any() else df
    main = main.assign(row=main["method"] + main["setting"].map(lambda s: "" if s == "default" else f" ({s})"),
                       cell=[accuracy_text(r.accuracy_pct, r.accuracy_lo_pct, r.accuracy_hi_pct, r.judged)
                             for r in main.itertuples()])
    pivot = main.pivot_table(index="row", columns="dataset", values="cell", aggfunc="first", dropna=False)
    rows = main.drop_duplicates("row")
    # the registry's order; rows of one method keep their order (sorted is stable)
    order = sorted(zip(rows["method"], rows["row"], strict=True), key=lambda mr: method_rank(mr[0])[0])
    return pivot.reindex([row for _, row in order])


def render_markdown(df: pd.DataFrame, title: str = "Results", notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += [f"{n}" for n in notes] + ([""] if notes else [])
    if not len(df):
        return "\n".join(lines + ["No finished runs."]) + "\n"
    pivot = accuracy_pivot(df)
    if len(pivot.columns) > 1 or len(df) > 1:
        lines += ["## Accuracy (%, 95% Wilson interval, n judged questions)", ""]
        cols = [("row", "method")] + [(c, c) for c in pivot.columns]
        lines += [markdown_table(pivot.reset_index(), cols), ""]
    for dataset, rows in df.groupby("dataset", sort=True):
        model = ", ".join(sorted({str(m) for m in rows["model"]}))
        lines += [f"## {dataset} ({model})", ""]
        rows = rows.assign(accuracy_ci=[
            "-" if _missing(r.accuracy_lo_pct) or _missing(r.accuracy_hi_pct)
            else f"{r.accuracy_lo_pct:.1f}-{r.accuracy_hi_pct:.1f}" for r in rows.itertuples()])
        lines += [markdown_table(rows, [("method", "method"), ("setting", "setting"), *METRIC_COLUMNS]), ""]
    failed = df[df["failed_videos"].fillna(0).astype(int) > 0]
    if len(failed):
        lines += ["Runs with failed videos (see their memory_stats.csv):", ""]
        lines += [f"- {r.method} {r.setting}: {r.failed_videos} video(s), {r.run_dir}" for r in failed.itertuples()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Reference:
    """A published result shown beside the runs of ``dataset``: per question type (correct, total)."""

    dataset: str
    label: str
    correct_total: dict[str, tuple[int, int]]

    def accuracy_by_type(self) -> dict[str, float]:
        return {t: c / n for t, (c, n) in self.correct_total.items() if n}


def type_breakdown(df: pd.DataFrame, runs: Sequence[RunInfo], dataset: str, categories: dict[str, Sequence[str]],
                   references: Sequence[Reference] = ()) -> pd.DataFrame:
    """One row per run of ``dataset`` (in ``df``'s order) and per reference: accuracy % per type (in the
    categories' order), per category (the mean of its types') and ``overall`` (the mean of the categories),
    the leaderboard's averaging (``mukv.report.metrics.macro_scores``); None where a run has no such question."""
    types = [t for members in categories.values() for t in members]
    by_path = {str(r.path): r for r in runs}

    def row(label: str, role: str, accuracy: dict[str, Any]) -> dict[str, Any]:
        means, overall = macro_scores(accuracy, categories)
        return {"row": label, "role": role, **{t: _pct(accuracy.get(t)) for t in types},
                **{c: _pct(means.get(c)) for c in categories}, "overall": _pct(overall)}

    rows = []
    for r in df[df["dataset"] == dataset].itertuples():
        run = by_path[r.run_dir]
        label = r.method + ("" if r.setting == "default" else f" ({r.setting})")
        rows.append(row(label, r.role or "run", run.metrics.get("accuracy_by_type") or {}))
    rows += [row(ref.label, "reference", ref.accuracy_by_type()) for ref in references if ref.dataset == dataset]
    return pd.DataFrame(rows, columns=["row", "role", *types, *categories, "overall"])


def _pct(v: Any) -> float | None:
    return None if v is None else 100.0 * float(v)


def breakdown_markdown(table: pd.DataFrame, dataset: str, categories: dict[str, Sequence[str]]) -> str:
    """The ``type_breakdown`` table as a markdown section (two decimals, as the leaderboard)."""
    types = [t for members in categories.values() for t in members]
    cols = [("row", "run"), *[(t, t) for t in types], *[(c, c) for c in categories], ("overall", "overall")]
    defined = "; ".join(f"{c} = mean({', '.join(members)})" for c, members in categories.items())
    lines = [f"## {dataset}: accuracy by type (%)", "",
             f"Categories: the mean of their types' accuracies ({defined}); overall: the mean of the categories.", "",
             "| " + " | ".join(label for _, label in cols) + " |", "|---|" + "|".join("---:" for _ in cols[1:]) + "|"]
    for _, r in table.iterrows():
        label = f"{r['row']} [reference]" if r["role"] == "reference" else str(r["row"])
        cells = ["-" if _missing(r[key]) else f"{r[key]:.2f}" for key, _ in cols[1:]]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_tables(runs: Sequence[RunInfo], folder: str | Path, title: str = "Results",
                 notes: Sequence[str] = (), breakdowns: dict[str, dict[str, Sequence[str]]] | None = None,
                 references: Sequence[Reference] = ()) -> pd.DataFrame:
    """``results.csv`` and ``results.md`` in ``folder``; returns the results frame. ``breakdowns`` (dataset ->
    its categories of question types) adds each such dataset's table by type, with its ``references``
    (``results_by_type.csv``: every such row, its dataset named)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    df = results_frame(runs)
    df.to_csv(folder / "results.csv", index=False)
    text = render_markdown(df, title, notes)
    tables = []
    for dataset, categories in (breakdowns or {}).items():
        table = type_breakdown(df if len(df) else pd.DataFrame(columns=["dataset"]), runs, dataset, categories,
                               references)
        if len(table):
            text += "\n" + breakdown_markdown(table, dataset, categories)
            tables.append(table.assign(dataset=dataset))
    if tables:
        pd.concat(tables, ignore_index=True).to_csv(folder / "results_by_type.csv", index=False)
    (folder / "results.md").write_text(text)
    return df
