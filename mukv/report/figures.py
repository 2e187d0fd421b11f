"""Figures (PNG, matplotlib's Agg backend, no display needed).

Grid figures (``make reproduce-table``), one panel per dataset, one line per method:

- ``accuracy_vs_online_tokens.png``: accuracy against the mean number of tokens an answer attends to
  (each method's budget sweep is one line);
- ``accuracy_vs_question_age.png``: accuracy against the time since the answer's evidence (the paper's
  accuracy-vs-interval figure), from each run's ``by_age`` buckets;
- ``memory_latency_vs_length.png``: KV memory held and question-to-answer latency against how much video
  has streamed (minutes), from the per-question rows of each method's main run.

Per-run figures, written into every run folder (``<run>/figures/``, ``write_run_figures``) and logged to
W&B with ``logger=wandb``: ``accuracy_by_age.png`` (with each bucket's 95% Wilson interval and question count)
and ``stream_memory_latency.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from mukv.cache import method_rank  # noqa: E402
from mukv.report.tables import RunInfo, results_frame  # noqa: E402

log = logging.getLogger(__name__)

COLORS = {"full": "#222222", "sliding_window": "#1f77b4", "uniform": "#2ca02c", "rekv": "#ff7f0e",
          "mukv": "#d62728"}
MARKERS = {"full": "s", "sliding_window": "o", "uniform": "^", "rekv": "D", "mukv": "*"}


def _style(method: str) -> dict[str, Any]:
    return {"color": COLORS.get(method), "marker": MARKERS.get(method, "o")}


def _methods(names: Sequence[str]) -> list[str]:
    """Methods in the registry's display order (``mukv.cache.method_rank``), unregistered names last."""
    return sorted(set(names), key=method_rank)


def _panels(n: int, rows: int = 1, width: float = 5.2, height: float = 3.8):
    fig, axes = plt.subplots(rows, n, figsize=(width * n, height * rows), squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy_axis(ax) -> None:
    ax.set_ylim(-3, 103)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)


def _log_tokens_axis(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _no_data(ax, text: str = "no judged answers") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _main_runs(runs: Sequence[RunInfo]) -> list[RunInfo]:
    """Each (dataset, method)'s main run: the one tagged ``grid:main``, else its largest online budget."""
    chosen: dict[tuple[str, str], RunInfo] = {}
    for r in runs:
        key = (r.dataset, r.method)
        best = chosen.get(key)
        if best is None or (r.role == "main") > (best.role == "main") or (
                (r.role == "main") == (best.role == "main")
                and (r.metrics.get("mean_online_tokens") or 0) > (best.metrics.get("mean_online_tokens") or 0)):
            chosen[key] = r
    return list(chosen.values())


# --------------------------------------------------------------------------------------- grid figures
def accuracy_vs_online_tokens(runs: Sequence[RunInfo], path: Path) -> Path:
    df = results_frame(runs)
    datasets = sorted(df["dataset"].unique()) if len(df) else ["(none)"]
    fig, axes = _panels(len(datasets))
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = df[(df["dataset"] == dataset)] if len(df) else df
        plotted = False
        for method in _methods(rows["method"]) if len(rows) else []:
            pts = rows[(rows["method"] == method)].dropna(subset=["accuracy_pct", "mean_online_tokens"])
            pts = pts.sort_values("mean_online_tokens")
            if len(pts):
                ax.plot(pts["mean_online_tokens"], pts["accuracy_pct"], label=method, **_style(method))
                plotted = True
        if not plotted:
            _no_data(ax)
        _log_tokens_axis(ax)
        ax.set_xlabel("online tokens per answer (mean)")
        _accuracy_axis(ax)
        ax.set_title(dataset)
        if plotted:
            ax.legend(fontsize=8)
    fig.suptitle("Accuracy against online token budget")
    return _save(fig, path)


def _age_points(metrics: dict[str, Any], scale: float = 60.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [v for v in (metrics.get("by_age") or {}).values() if v.get("accuracy") is not None]
    x = np.array([v["mean_age_s"] / scale for v in rows])
    y = np.array([100.0 * v["accuracy"] for v in rows])
    n = np.array([v["judged"] for v in rows])
    order = np.argsort(x)
    return x[order], y[order], n[order]


def accuracy_vs_question_age(runs: Sequence[RunInfo], path: Path) -> Path:
    main = _main_runs(runs)
    datasets = sorted({r.dataset for r in main}) or ["(none)"]
    fig, axes = _panels(len(datasets))
    for ax, dataset in zip(axes[0], datasets, strict=True):
        plotted = False
        mine = sorted((r for r in main if r.dataset == dataset), key=lambda r: method_rank(r.method))
        oldest = max((v.get("mean_age_s") or 0.0 for r in mine for v in (r.metrics.get("by_age") or {}).values()),
                     default=0.0)
        scale, unit = (60.0, "minutes") if oldest >= 120 else (1.0, "seconds")
        for r in mine:
            x, y, _ = _age_points(r.metrics, scale)
            if len(x):
                ax.plot(x, y, label=r.method, **_style(r.method))
                plotted = True
        if not plotted:
            _no_data(ax)
        ax.set_xlabel(f"question age: {unit} since the evidence (bucket mean)")
        _accuracy_axis(ax)
        ax.set_title(dataset)
        if plotted:
            ax.legend(fontsize=8)
    fig.suptitle("Accuracy against question age")
    return _save(fig, path)


def _stream_curve(pred: pd.DataFrame, column: str, bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``column`` against stream time (minutes), in equal-width bins of end_time."""
    if not len(pred) or column not in pred:
        return np.array([]), np.array([])
    t = pd.to_numeric(pred["end_time"], errors="coerce") / 60.0
    v = pd.to_numeric(pred[column], errors="coerce")
    ok = t.notna() & v.notna()
    t, v = t[ok], v[ok]
    if not len(t):
        return np.array([]), np.array([])
    edges = np.linspace(t.min(), t.max(), min(bins, t.nunique()) + 1) if t.nunique() > 1 else np.array([t.min()] * 2)
    which = np.clip(np.searchsorted(edges, t.to_numpy(), side="right") - 1, 0, max(len(edges) - 2, 0))
    frame = pd.DataFrame({"t": t.to_numpy(), "v": v.to_numpy(), "b": which}).groupby("b").mean()
    return frame["t"].to_numpy(), frame["v"].to_numpy()


def _read_predictions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False) if path.is_file() and path.stat().st_size else pd.DataFrame()


def _plot_stream(ax_mem, ax_lat, series: Sequence[tuple[str, str, pd.DataFrame]]) -> None:
    plotted = False
    for label, method, pred in series:
        x, kv = _stream_curve(pred, "kv_bytes")
        if len(x):
            ax_mem.plot(x, kv / 1e6, label=label, **_style(method))
            plotted = True
        x, lat = _stream_curve(pred, "latency_s")
        if len(x):
            ax_lat.plot(x, lat, label=label, **_style(method))
    for ax, ylabel in ((ax_mem, "KV held (MB)"), (ax_lat, "question-to-answer latency (s)")):
        ax.set_xlabel("video streamed (minutes)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize=8)
        else:
            _no_data(ax, "no answers")


def memory_latency_vs_length(runs: Sequence[RunInfo], path: Path) -> Path:
    main = _main_runs(runs)
    datasets = sorted({r.dataset for r in main}) or ["(none)"]
    fig, axes = _panels(2, rows=len(datasets))
    for row, dataset in enumerate(datasets):
        series = [(r.method, r.method, _read_predictions(r.predictions))
                  for r in sorted((r for r in main if r.dataset == dataset), key=lambda r: method_rank(r.method))]
        _plot_stream(axes[row][0], axes[row][1], series)
        axes[row][0].set_title(f"{dataset}: memory")
        axes[row][1].set_title(f"{dataset}: latency")
    fig.suptitle("Memory and latency against video length")
    return _save(fig, path)


def grid_figures(runs: Sequence[RunInfo], folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return [
        accuracy_vs_online_tokens(runs, folder / "accuracy_vs_online_tokens.png"),
        accuracy_vs_question_age(runs, folder / "accuracy_vs_question_age.png"),
        memory_latency_vs_length(runs, folder / "memory_latency_vs_length.png"),
    ]


# ----------------------------------------------------------------------------------------- run figures
def run_figures(predictions: pd.DataFrame, metrics: dict[str, Any], folder: str | Path) -> list[Path]:
    """One run's figures: accuracy by question-age bucket; KV memory and latency along the stream."""
    folder = Path(folder)
    method = str(metrics.get("method", ""))
    paths = []
    by_age = metrics.get("by_age") or {}
    if by_age:
        fig, axes = _panels(1)
        ax = axes[0][0]
        labels = list(by_age)
        acc = [100.0 * v["accuracy"] if v.get("accuracy") is not None else 0.0 for v in by_age.values()]
        buckets = list(zip(by_age.values(), acc, strict=True))
        lo = [100.0 * v["accuracy_lo"] if v.get("accuracy_lo") is not None else a for v, a in buckets]
        hi = [100.0 * v["accuracy_hi"] if v.get("accuracy_hi") is not None else a for v, a in buckets]
        err = [np.subtract(acc, lo).clip(0), np.subtract(hi, acc).clip(0)]
        bars = ax.bar(range(len(labels)), acc, color=COLORS.get(method, "#1f77b4"), alpha=0.45, yerr=err,
                      capsize=4, error_kw={"elinewidth": 1.2, "ecolor": "black"})
        for bar, v in zip(bars, by_age.values(), strict=True):
            ax.annotate(f"n={v['judged']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_xlabel("question age (since the evidence); whiskers: 95% Wilson interval")
        _accuracy_axis(ax)
        ax.set_title(f"{metrics.get('dataset', '')} / {method}: accuracy by question age")
        paths.append(_save(fig, folder / "accuracy_by_age.png"))
    fig, axes = _panels(2)
    _plot_stream(axes[0][0], axes[0][1], [(method, method, predictions)])
    fig.suptitle(f"{metrics.get('dataset', '')} / {method}: memory and latency along the stream")
    paths.append(_save(fig, folder / "stream_memory_latency.png"))
    return paths


def write_run_figures(predictions: pd.DataFrame, metrics: dict[str, Any], folder: str | Path) -> list[Path]:
    """``run_figures`` into a run folder, whatever the logger. Figures are a view of results already on
    disk (predictions.csv, metrics.json): a plotting failure is logged as one line and never fails the run."""
    if not len(predictions):
        return []
    try:
        return run_figures(predictions, metrics, folder)
    except Exception as err:  # noqa: BLE001  (matplotlib can fail in many ways; the results are already written)
        log.warning("figures not written to %s: %s: %s", folder, type(err).__name__, err)
        return []
