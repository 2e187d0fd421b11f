"""The run explorer: one self-contained HTML page showing what each answer's context recalled.

    python -m mukv.report.explorer RUN_DIR                      # -> RUN_DIR/explorer.html (every run writes it)
    python -m mukv.report.explorer RUN_A RUN_B ... --out page.html   # methods side by side on the same questions

The page reads the run folders only: ``predictions.jsonl`` (each answer with the compact ``recalled`` record
the engine packs from the method's ``Recalled``, :mod:`mukv.report.recall`), ``predictions.csv`` (verdicts,
also after ``mukv.report.rejudge``), ``memory_stats``, ``metrics.json`` and ``resolved_config.yaml``, from
which the dataset is built again to render the frames (synthetic streams are rendered from their seed; mp4
and ``.npy`` videos are read from their files). It never imports a cache method.

What the page shows, per video: a timeline of the stream with each question at its time (one row per run,
coloured by verdict; the evidence the dataset names on its own row); for the chosen question, the answers and
verdicts of every run, a strip of how much of each frame every run recalled (and per group, e.g. MuKV's
granularities), and thumbnails of the evidence frames and the frames recalled most, each with a heat map of
the recalled tokens over the frame's token grid and the evidence cells outlined (green: recalled, red:
missed). Then KV bytes held, device bytes, time per frame and time to first token along the stream.
Plots are plotly figures, drawn by the plotly.js bundle embedded in the page (no server, works offline).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import html
import io
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mukv.report.evidence import evidence_of
from mukv.report.outputs import MEMORY, METRICS, PREDICTIONS, journal_path, read_csv_records, read_journal
from mukv.report.recall import RecallMap, token_grid

log = logging.getLogger("mukv")

EXPLORER = "explorer.html"
VERDICT_COLORS = {True: "#2ca02c", False: "#d62728", None: "#8c8c8c"}
RECALLED_OUTLINE, MISSED_OUTLINE = "#00e000", "#ff2020"  # evidence cell outlines (opaque, for the eye and tests)
# recalled tokens are lightly tinted, the rest of the frame dimmed
HEAT_COLORSCALE = [[0.0, "rgba(0,0,0,0.62)"], [1.0, "rgba(255,215,0,0.12)"]]
STRIP_COLORSCALE = [[0.0, "#f4f4f4"], [1.0, "#08519c"]]
PANEL_COLUMNS = 6  # thumbnails per row
STRIP_BINS = 600  # most columns of the recall strip (longer streams are binned)
DATA_TYPE = "application/gzip+base64"  # the page's data element (PAGE_JS: readData)


# ------------------------------------------------------------------------------------------ reading runs
@dataclass
class RunView:
    """One run folder, read for the page."""

    folder: Path
    label: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    answers: dict[tuple[str, str], dict[str, Any]]  # (video_id, qid) -> the answer row, typed
    memory: list[dict[str, Any]]

    @property
    def method(self) -> str:
        return str(self.metrics.get("method") or (self.config.get("cache") or {}).get("name")
                   or next((a["method"] for a in self.answers.values()), "?"))

    @property
    def sample_fps(self) -> float:
        return float((self.config.get("dataset") or {}).get("sample_fps") or 1.0)


def _verdict(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    s = "" if value is None else str(value).strip().lower()
    return True if s in ("true", "1", "1.0") else False if s in ("false", "0", "0.0") else None


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def typed_answer(row: Mapping[str, Any]) -> dict[str, Any]:
    """An answer row from the journal or the CSV (strings) with its numbers, verdict and meta parsed."""
    out = dict(row)
    for key in ("start_time", "end_time", "frames_seen", "online_tokens", "kv_tokens", "kv_bytes", "device_kv_bytes",
                "encode_s", "recall_s", "ttft_s", "latency_s", "evidence_recalled", "judge_score"):
        out[key] = _number(row.get(key))
    out["judge_correct"] = _verdict(row.get("judge_correct"))
    meta = row.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except ValueError:
            meta = {}
    out["meta"] = meta if isinstance(meta, dict) else {}
    out["recall"] = RecallMap.unpack(row.get("recalled")) if isinstance(row.get("recalled"), dict) else None
    return out


def load_run(folder: str | Path, label: str | None = None) -> RunView:
    """A run folder's answers (the journal's rows, with the CSV's verdicts where it was judged again), memory
    rows, metrics and resolved config."""
    folder = Path(folder)
    pred_csv = folder / PREDICTIONS
    journal, _ = read_journal(journal_path(pred_csv))
    _, csv_rows = read_csv_records(pred_csv)
    if not journal and not csv_rows:
        raise FileNotFoundError(f"{folder}: no {PREDICTIONS} or {journal_path(pred_csv).name} (not a run folder?)")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for row in journal or csv_rows:
        rows[(str(row.get("video_id")), str(row.get("qid")))] = dict(row)
    if journal:  # the CSV holds the verdicts of record (mukv.report.rejudge rewrites it in place)
        for row in csv_rows:
            key = (str(row.get("video_id")), str(row.get("qid")))
            if key in rows:
                rows[key].update({k: v for k, v in row.items() if k.startswith("judge_")})
    mem_rows, _ = read_journal(journal_path(folder / MEMORY))
    if not mem_rows:
        _, mem_rows = read_csv_records(folder / MEMORY)
    memory = list({str(r.get("video_id")): r for r in mem_rows}.values())
    cfg_path, metrics_path = folder / "resolved_config.yaml", folder / METRICS
    config = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    run = RunView(folder, "", config, metrics, {k: typed_answer(r) for k, r in rows.items()}, memory)
    run.label = label or run.method
    return run


def _label_runs(runs: list[RunView]) -> None:
    """Distinct labels: the method, with the folder's name where two runs share a method."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.folder.name})"


# ---------------------------------------------------------------------------------------------- frames
def frame_sources(config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """video_id -> FrameSource of the run's dataset, built again from its resolved config (synthetic streams
    render from their seed, files are opened where they lie); ({}, why) where that fails."""
    try:
        from omegaconf import OmegaConf

        from mukv.data.datasets import dataset_class

        ds = OmegaConf.create(dict(config.get("dataset") or {}))
        return {v.video_id: v.source for v in dataset_class(ds).load(ds)}, None
    except Exception as err:  # a moved data folder, a missing annotation file: the page goes on without frames
        return {}, f"{type(err).__name__}: {err}"


def thumbnail(frame: np.ndarray, max_side: int = 128) -> tuple[str, tuple[int, int]]:
    """A uint8 RGB frame as a JPEG data URI (a noisy synthetic frame: 4 KB, a sixth of its PNG), at most
    ``max_side`` pixels on its longer side, and its (width, height)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(frame))
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.size


def render_thumbnails(sources: Mapping[str, Any], wanted: Mapping[str, set[int]], limit: int
                      ) -> dict[str, tuple[str, tuple[int, int]]]:
    """``{frame_key(video, frame): (data URI, (width, height))}`` of the wanted frames (at most ``limit``), read
    in runs of consecutive frames."""
    out: dict[str, tuple[str, tuple[int, int]]] = {}
    for video, frames in wanted.items():
        src = sources.get(video)
        if src is None:
            continue
        todo = sorted(f for f in frames if 0 <= f < len(src))
        i = 0
        while i < len(todo) and len(out) < limit:
            j = i
            while j + 1 < len(todo) and todo[j + 1] == todo[j] + 1 and j - i < 63:
                j += 1
            try:
                block = src.frames(todo[i], todo[j] + 1)
            except Exception as err:  # a broken file: these frames stay blank
                log.warning("explorer: frames %d-%d of %s could not be read: %s", todo[i], todo[j], video, err)
                block = []
            for f, img in zip(todo[i: j + 1], block, strict=False):
                if len(out) < limit:
                    out[frame_key(video, f)] = thumbnail(img)
            i = j + 1
    return out


def frame_key(video: str, frame: int) -> str:
    return f"{video}#{int(frame)}"


# ---------------------------------------------------------------------------------------------- figures
def _ax(i: int) -> str:
    """Axis suffix of panel ``i`` (0 -> '', 1 -> '2', ...)."""
    return "" if i == 0 else str(i + 1)


def _time(frame: int, fps: float) -> float:
    return round(frame / fps, 3)


def _esc(text: Any) -> str:
    return html.escape(str(text if text is not None else ""))


def _verdict_text(v: bool | None) -> str:
    return "right" if v is True else "wrong" if v is False else "not judged"


def _fmt(x: Any, spec: str) -> str:
    v = _number(x)
    return "—" if v is None else format(v, spec)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def timeline_figure(video: str, runs: Sequence[RunView], keys: Sequence[str],
                    questions: Mapping[str, dict[str, Any]], duration: float | None) -> dict[str, Any]:
    """The stream's timeline: each question at its time, one row per run (coloured by verdict), and the
    evidence the dataset names on a row of its own. ``customdata``: the question's key (a click selects it)."""
    data: list[dict[str, Any]] = []
    ev_x, ev_key, ev_text = [], [], []
    for key in keys:
        q = questions[key]
        for f in q["evidence_frames"]:
            ev_x.append(_time(f, q["fps"]))
            ev_key.append(key)
            ev_text.append(f"evidence of {_esc(q['qid'])}: frame {f}")
    if ev_x:
        data.append({"type": "scatter", "mode": "markers", "name": "evidence", "x": ev_x, "y": ["evidence"] * len(ev_x),
                     "customdata": ev_key, "text": ev_text, "hoverinfo": "text",
                     "marker": {"symbol": "star", "size": 11, "color": "#9467bd"}, "showlegend": False})
    for run in runs:
        xs, colors, custom, texts = [], [], [], []
        for key in keys:
            q = questions[key]
            a = run.answers.get(q["id"])
            if a is None:
                continue
            xs.append(q["end_time"])
            colors.append(VERDICT_COLORS[a["judge_correct"]])
            custom.append(key)
            texts.append(f"{_esc(q['qid'])} [{_esc(q['qtype'])}] {_esc(q['question'])}<br>reference: {_esc(q['answer'])}"
                         f" · {_esc(run.label)}: {_esc(a.get('prediction'))} ({_verdict_text(a['judge_correct'])})"
                         f"<br>evidence recalled: {_pct(a.get('evidence_recalled'))}")
        data.append({"type": "scatter", "mode": "markers", "name": run.label, "x": xs, "y": [run.label] * len(xs),
                     "customdata": custom, "text": texts, "hoverinfo": "text", "showlegend": False,
                     "marker": {"size": 13, "color": colors, "line": {"width": 1, "color": "#333"}}})
    rows = (["evidence"] if ev_x else []) + [r.label for r in runs]
    layout = {"height": 110 + 34 * len(rows), "margin": {"l": 130, "r": 20, "t": 30, "b": 40},
              "title": {"text": f"{_esc(video)}: questions along the stream (click one)", "font": {"size": 13}},
              "xaxis": {"title": {"text": "stream time (s)"}, "zeroline": False,
                        **({"range": [0, duration * 1.01]} if duration else {})},
              "yaxis": {"type": "category", "categoryorder": "array", "categoryarray": rows[::-1]},
              "shapes": [], "hovermode": "closest"}
    return {"data": data, "layout": layout}


def _strip_bins(n: int) -> list[tuple[int, int]]:
    if n <= STRIP_BINS:
        return [(i, i + 1) for i in range(n)]
    edges = np.linspace(0, n, STRIP_BINS + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def recall_strip_figure(q: dict[str, Any], runs: Sequence[RunView]) -> dict[str, Any]:
    """How much of each frame shown so far every run's context held (per group too), with the evidence."""
    n = max(1, int(max([q["frames_seen"]] + [f + 1 for f in q["evidence_frames"]])))
    bins = _strip_bins(n)
    x = [_time(a, q["fps"]) for a, _ in bins] + [_time(bins[-1][1], q["fps"])]  # cell edges: frame f is [f, f+1)
    rows, z, notes = [], [], []
    for run in runs:
        a = run.answers.get(q["id"])
        rm: RecallMap | None = a["recall"] if a else None
        views = [(run.label, rm)] + ([(f"{run.label} · {g}", m) for g, m in rm.groups.items()] if rm else [])
        for name, m in views:
            rows.append(name)
            if m is None:
                z.append([None] * len(bins))
                notes.append(f"{name}: not asked" if a is None else f"{name}: the method does not report its recall")
            else:
                share = np.add.reduceat(m.fractions(n), [lo for lo, _ in bins]) / [hi - lo for lo, hi in bins]
                z.append(share.round(3).tolist())
    if q["evidence_frames"]:  # its own (empty) row of the heat map: plotly.js wants every category there
        rows, z = ["evidence", *rows], [[None] * len(bins), *z]
    data: list[dict[str, Any]] = [{
        "type": "heatmap", "x": x, "y": rows, "z": z, "zmin": 0, "zmax": 1, "colorscale": STRIP_COLORSCALE,
        "colorbar": {"title": {"text": "share of<br>tokens"}, "len": 1, "thickness": 12},
        "hovertemplate": "%{y}<br>t %{x} s: %{z:.0%} of the frame's tokens<extra></extra>", "xgap": 0, "ygap": 2}]
    if q["evidence_frames"]:
        data.append({"type": "scatter", "mode": "markers", "x": [_time(f + 0.5, q["fps"]) for f in q["evidence_frames"]],
                     "y": ["evidence"] * len(q["evidence_frames"]), "name": "evidence", "showlegend": False,
                     "hovertemplate": "evidence<extra></extra>",
                     "marker": {"symbol": "star", "size": 12, "color": "#9467bd"}})
    layout = {"height": 120 + 30 * len(rows), "margin": {"l": 190, "r": 20, "t": 30, "b": 40},
              "title": {"text": "recalled share of each frame shown so far", "font": {"size": 13}},
              "xaxis": {"title": {"text": "stream time (s)"}, "range": [0, _time(n, q["fps"])]},
              "yaxis": {"type": "category", "categoryorder": "array", "categoryarray": rows[::-1]},
              "annotations": [{"text": "; ".join(notes), "xref": "paper", "yref": "paper", "x": 0, "y": 1.0,
                               "yanchor": "bottom", "showarrow": False, "font": {"size": 11, "color": "#777"}}]
              if notes else []}
    return {"data": data, "layout": layout}


def shown_frames(q: dict[str, Any], runs: Sequence[RunView], per_run: int = 6, most: int = 12) -> list[int]:
    """The frames a question's panel shows: its evidence, then for each run the frames it recalled most
    (evenly spread among equals), in time order."""
    chosen = list(dict.fromkeys(q["evidence_frames"]))[:most]
    for run in runs:
        a = run.answers.get(q["id"])
        rm = a["recall"] if a else None
        if rm is None:
            continue
        frames = [f for f in rm.frames() if f < max(q["frames_seen"], 1)]
        frames.sort(key=lambda f: -rm.fraction(f))  # stable: time order among equals
        top = frames[: 3 * per_run]
        top.sort()
        if len(top) > per_run:
            top = [top[i] for i in np.linspace(0, len(top) - 1, per_run).round().astype(int)]
        chosen += [f for f in top if f not in chosen]
    return sorted(dict.fromkeys(chosen[:most]))


def _cell_rect(cell: int, grid: int, rows: int, cols: int) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of evidence cell ``cell`` of a ``grid`` x ``grid`` raster in token-grid units."""
    r, c = divmod(int(cell), grid)
    return c * cols / grid, (c + 1) * cols / grid, r * rows / grid, (r + 1) * rows / grid


def _covered(heat: np.ndarray, rect: tuple[float, float, float, float]) -> bool:
    x0, x1, y0, y1 = rect
    part = heat[int(math.floor(y0)): max(int(math.ceil(y1)), int(math.floor(y0)) + 1),
                int(math.floor(x0)): max(int(math.ceil(x1)), int(math.floor(x0)) + 1)]
    return bool(part.size and part.max() > 0)


def frames_figure(q: dict[str, Any], runs: Sequence[RunView], frames: Sequence[int],
                  image: Callable[[str, int], tuple[str, tuple[int, int]] | None] = lambda v, f: None
                  ) -> dict[str, Any]:
    """Thumbnails of ``frames``, one row block per run, each with a heat map of the tokens its context held
    over the frame's token grid and the evidence cells outlined (green: recalled, red: missed).

    ``image(video, frame)`` gives each thumbnail's ``source`` (a data URI, or a key the page swaps for one)
    and its (width, height) in pixels; None: no picture (the heat map is drawn alone).
    Runs that report groups (MuKV's granularities) get buttons showing each group's tokens.
    ``layout.meta.panels`` says where each (run, frame) panel is (its axes), for tests and tools."""
    frames = list(frames)
    ncols = PANEL_COLUMNS  # the same size of thumbnail whatever their number
    block_rows = max(1, math.ceil(len(frames) / ncols))
    nrows = block_rows * len(runs)
    cells = {f: [c for ef, c in q["evidence_cells"] if ef == f] for f in frames}
    group_names = list(dict.fromkeys(g for r in runs for a in [r.answers.get(q["id"])]
                                     if a and a["recall"] for g in a["recall"].groups))
    views = ["all", *group_names]
    data: list[dict[str, Any]] = []
    heat_view: list[str | None] = []  # per trace: the view it belongs to (None: every view)
    shapes, annotations, panels, layout = [], [], [], {}
    # vertical layout in pixels: per run a header line, then its rows of panels (each with a title line)
    header_px, row_px, title_px = 26, 176, 16
    plot_px = len(runs) * header_px + nrows * row_px
    for ri, run in enumerate(runs):
        a = run.answers.get(q["id"])
        rm: RecallMap | None = a["recall"] if a else None
        rows_t, cols_t = rm.grid if rm else token_grid(q.get("tokens_per_frame") or 1)
        top = 1 - ri * (header_px + block_rows * row_px) / plot_px
        verdict = "not asked" if a is None else (f"answered {_esc(a.get('prediction'))!r}, "
                                                 f"{_verdict_text(a['judge_correct'])}")
        annotations.append({"text": f"<b>{_esc(run.label)}</b>: {verdict}" + ("" if rm is not None or a is None else
                                                                               " (does not report its recall)"),
                            "xref": "paper", "yref": "paper", "x": 0, "y": top, "xanchor": "left",
                            "yanchor": "top", "showarrow": False, "font": {"size": 12}})
        for j, f in enumerate(frames):
            p = ri * len(frames) + j
            c = j % ncols
            ax = _ax(p)
            x_dom = [c / ncols + 0.006, (c + 1) / ncols - 0.006]
            y_hi = top - (header_px + (j // ncols) * row_px + title_px) / plot_px
            y_dom = [y_hi - (row_px - title_px - 6) / plot_px, y_hi]
            layout[f"xaxis{ax}"] = {"domain": x_dom, "range": [0, cols_t], "visible": False, "constrain": "domain",
                                    "fixedrange": True}
            layout[f"yaxis{ax}"] = {"domain": y_dom, "range": [rows_t, 0], "visible": False, "constrain": "domain",
                                    "scaleanchor": f"x{ax}", "fixedrange": True}
            pic = image(q["video_id"], f)
            if pic is not None:  # the picture spans the token grid: its pixels scaled to grid units
                src, (w, h) = pic
                dx, dy = cols_t / w, rows_t / h
                data.append({"type": "image", "source": src, "xaxis": f"x{ax}", "yaxis": f"y{ax}", "x0": dx / 2,
                             "y0": dy / 2, "dx": dx, "dy": dy, "hoverinfo": "skip", "name": f"frame {f}"})
                heat_view.append(None)
            for view in views if rm is not None else []:
                m = rm if view == "all" else rm.groups.get(view)
                if m is None:
                    continue
                z = m.cell_grid(f)
                data.append({"type": "heatmap", "z": z.round(3).tolist(), "x0": 0.5, "dx": 1, "y0": 0.5, "dy": 1,
                             "xaxis": f"x{ax}", "yaxis": f"y{ax}", "zmin": 0, "zmax": 1,
                             "colorscale": HEAT_COLORSCALE, "showscale": False, "visible": view == "all",
                             "name": f"{run.label} {view}",
                             "hovertemplate": f"{_esc(run.label)} {view}<br>token row %{{y}}, column %{{x}}: "
                                              "%{z:.0%}<extra></extra>"})
                heat_view.append(view if group_names else None)
            heat = rm.cell_grid(f) if rm is not None else np.zeros((rows_t, cols_t))
            grid = q["grid"] or 1
            # evidence cells outlined; an evidence frame named whole (a count's rings, an order's needles) is
            # outlined whole: green where the context held any of it
            rects = [_cell_rect(c, grid, rows_t, cols_t) for c in cells[f]] or (
                [(0.0, float(cols_t), 0.0, float(rows_t))] if f in q["evidence_frames"] else [])
            for rect in rects:
                hit = rm is not None and _covered(heat, rect)
                shapes.append({"type": "rect", "xref": f"x{ax}", "yref": f"y{ax}", "x0": rect[0], "x1": rect[1],
                               "y0": rect[2], "y1": rect[3], "line": {"color": RECALLED_OUTLINE if hit else MISSED_OUTLINE,
                                                                      "width": 3}})
            star = " ★" if f in q["evidence_frames"] else ""
            annotations.append({"text": f"frame {f} · {_time(f, q['fps']):g} s{star}", "xref": f"x{ax} domain",
                                "yref": f"y{ax} domain", "x": 0.5, "y": 1.0, "yanchor": "bottom", "showarrow": False,
                                "font": {"size": 10}})
            panels.append({"run": run.label, "frame": f, "xaxis": f"x{ax}", "yaxis": f"y{ax}", "rows": rows_t,
                           "cols": cols_t, "evidence_cells": cells[f],
                           "recalled": None if rm is None else round(rm.fraction(f), 4)})
    layout.update({"height": 50 + plot_px, "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
                   "title": {"text": "frames: evidence (★) and most recalled; dimmed tokens were not in the context",
                             "font": {"size": 13}},
                   "shapes": shapes, "annotations": annotations, "showlegend": False,
                   "meta": {"panels": panels, "grid": q["grid"], "frames": frames}})
    if group_names:
        buttons = [{"label": v, "method": "restyle",
                    "args": [{"visible": [hv is None or hv == v for hv in heat_view]}]} for v in views]
        layout["updatemenus"] = [{"type": "buttons", "direction": "right", "x": 1, "xanchor": "right", "y": 1,
                                  "yanchor": "bottom", "pad": {"t": 22}, "buttons": buttons, "showactive": True}]
    if not frames:
        layout["annotations"].append({"text": "no frame to show (nothing streamed yet, or no recall reported)",
                                      "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5, "showarrow": False})
    return {"data": data, "layout": layout}


def memory_figure(runs: Sequence[RunView]) -> dict[str, Any]:
    """KV bytes held (and on the device), time per frame and time to first token along the stream, one line
    per run and video."""
    data: list[dict[str, Any]] = []
    panels = [("KV MiB held", 0.70, 1.0), ("encode s / frame", 0.36, 0.64), ("TTFT s", 0.0, 0.30)]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for ri, run in enumerate(runs):
        color = palette[ri % len(palette)]
        by_video: dict[str, list[dict[str, Any]]] = {}
        for (video, _), a in run.answers.items():
            if a.get("frames_seen") is not None and not a.get("error"):
                by_video.setdefault(video, []).append(a)
        for vi, (video, rows) in enumerate(by_video.items()):
            rows.sort(key=lambda a: a["frames_seen"])
            t = [_time(a["frames_seen"], run.sample_fps) for a in rows]
            name, first = f"{run.label} · {video}", vi == 0
            common = {"type": "scatter", "mode": "lines+markers", "legendgroup": run.label, "x": t,
                      "line": {"color": color, "width": 1.5}, "marker": {"size": 5}}
            data.append({**common, "name": run.label, "showlegend": first, "yaxis": "y", "xaxis": "x",
                         "y": [(a["kv_bytes"] or 0) / 2**20 for a in rows],
                         "hovertemplate": f"{_esc(name)}<br>%{{x}} s: %{{y:.2f}} MiB held<extra></extra>"})
            dev = [a.get("device_kv_bytes") for a in rows]
            if any(d is not None for d in dev):
                data.append({**common, "name": f"{run.label} (device)", "showlegend": first, "yaxis": "y", "xaxis": "x",
                             "line": {"color": color, "width": 1, "dash": "dot"}, "marker": {"size": 3},
                             "y": [None if d is None else d / 2**20 for d in dev],
                             "hovertemplate": f"{_esc(name)}<br>%{{x}} s: %{{y:.2f}} MiB on the device<extra></extra>"})
            per_frame, prev = [], 0
            for a in rows:
                new = a["frames_seen"] - prev
                per_frame.append((a["encode_s"] or 0) / new if new > 0 else None)
                prev = a["frames_seen"]
            data.append({**common, "name": run.label, "showlegend": False, "yaxis": "y2", "xaxis": "x2", "y": per_frame,
                         "hovertemplate": f"{_esc(name)}<br>%{{x}} s: %{{y:.3f}} s per frame<extra></extra>"})
            data.append({**common, "name": run.label, "showlegend": False, "yaxis": "y3", "xaxis": "x3",
                         "y": [a["ttft_s"] for a in rows],
                         "hovertemplate": f"{_esc(name)}<br>%{{x}} s: TTFT %{{y:.3f}} s<extra></extra>"})
    layout: dict[str, Any] = {"height": 620, "margin": {"l": 70, "r": 20, "t": 40, "b": 45},
                              "title": {"text": "memory and latency along the stream (at each question)",
                                        "font": {"size": 13}}, "legend": {"orientation": "h", "y": -0.08}}
    for i, (title, lo, hi) in enumerate(panels):
        ax = _ax(i)
        layout[f"xaxis{ax}"] = {"domain": [0, 1], "anchor": f"y{ax}",
                                "title": {"text": "stream time (s)"} if i == len(panels) - 1 else {}}
        layout[f"yaxis{ax}"] = {"domain": [lo, hi], "anchor": f"x{ax}", "title": {"text": title}, "rangemode": "tozero"}
    return {"data": data, "layout": layout}


# ---------------------------------------------------------------------------------------------- the page
def _describe_evidence(q: dict[str, Any]) -> str:
    if not q["evidence_frames"]:
        return "the dataset names no evidence frames"
    parts = []
    for f in q["evidence_frames"]:
        cs = [c for ef, c in q["evidence_cells"] if ef == f]
        where = "".join(f", row {c // q['grid'] + 1} column {c % q['grid'] + 1}" for c in cs) if q["grid"] else ""
        parts.append(f"frame {f} ({_time(f, q['fps']):g} s){where}")
    return "; ".join(parts)


def question_html(q: dict[str, Any], runs: Sequence[RunView]) -> str:
    """The question, its reference and every run's answer, verdict and recall, as an HTML fragment."""
    head = (f"<p class='q'><b>{_esc(q['question'])}</b> <span class='meta'>({_esc(q['qid'])}, {_esc(q['qtype'])},"
            f" asked at {q['end_time']:g} s)</span></p><p>reference: <b>{_esc(q['answer'])}</b> · evidence: "
            f"{_esc(_describe_evidence(q))}</p>")
    rows = []
    for run in runs:
        a = run.answers.get(q["id"])
        if a is None:
            rows.append(f"<tr><td>{_esc(run.label)}</td><td colspan='6'>not asked in this run</td></tr>")
            continue
        v = a["judge_correct"]
        mark = {True: "✓", False: "✗", None: "–"}[v]
        ttft = "—" if a.get("ttft_s") is None else f"{a['ttft_s']:.3f} s"
        recalled = "not reported" if a["recall"] is None else f"{len(a['recall'].frames())} frames"
        rows.append(f"<tr class='{_verdict_text(v).replace(' ', '-')}'><td>{_esc(run.label)}</td>"
                    f"<td>{_esc(a.get('prediction'))}</td><td class='verdict'>{mark} {_verdict_text(v)}</td>"
                    f"<td>{_pct(a.get('evidence_recalled'))}</td><td>{recalled}</td>"
                    f"<td>{'' if a.get('online_tokens') is None else int(a['online_tokens'])}</td><td>{ttft}</td>"
                    f"<td>{_esc(a.get('error') or '')}</td></tr>")
    table = ("<table class='answers'><tr><th>method</th><th>answer</th><th>verdict</th><th>evidence recalled</th>"
             "<th>context holds</th><th>online tokens</th><th>TTFT</th><th>error</th></tr>" + "".join(rows) + "</table>")
    return head + table


def collect_questions(runs: Sequence[RunView]) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Every question of the runs (the union, matched by video and question id), keyed ``q<i>``, and the
    keys of each video in time order."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        for key, a in run.answers.items():
            q = merged.setdefault(key, {"id": key, "video_id": key[0], "qid": key[1], "question": a.get("question"),
                                        "answer": a.get("answer"), "qtype": a.get("qtype") or "",
                                        "end_time": a.get("end_time") or 0.0, "start_time": a.get("start_time"),
                                        "fps": run.sample_fps, "meta": a["meta"], "frames_seen": 0,
                                        "tokens_per_frame": None})
            q["frames_seen"] = max(q["frames_seen"], int(a.get("frames_seen") or 0))
            if a["recall"] is not None:
                q["tokens_per_frame"] = a["recall"].tokens_per_frame
    videos: dict[str, list[tuple[str, str]]] = {}
    for key in merged:
        videos.setdefault(key[0], []).append(key)
    questions, order = {}, {}
    for video, keys in videos.items():
        keys.sort(key=lambda k: (merged[k]["end_time"], k[1]))
        order[video] = []
        for k in keys:
            q = merged[k]
            cells, frames, grid = evidence_of(q["meta"])
            q.update(evidence_cells=cells, evidence_frames=frames, grid=grid)
            name = f"q{len(questions)}"
            questions[name] = q
            order[video].append(name)
    return questions, order


def pack_data(data: Any) -> str:
    """The page's data as base64 of gzipped JSON (the figures of a thousand questions repeat themselves: 26 MB of
    JSON is 2 MB so); the page unpacks it with the browser's own ``DecompressionStream``."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    text = json.dumps(data, default=default, separators=(",", ":"))
    return base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=6, mtime=0)).decode("ascii")


def read_page_data(path: str | Path) -> dict[str, Any]:
    """The data an explorer page holds (videos, questions with their figures, frames, memory), for tests and
    tools."""
    text = Path(path).read_text(encoding="utf-8")
    packed = text.split(f'<script type="{DATA_TYPE}" id="explorer-data">', 1)[1].split("</script>", 1)[0]
    return json.loads(gzip.decompress(base64.b64decode(packed)))


def plotly_bundle() -> str:
    """plotly.js, minified, from the installed plotly package (embedded: the page works offline)."""
    return (resources.files("plotly") / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


def _runs_table(runs: Sequence[RunView]) -> str:
    rows = []
    for r in runs:
        m = r.metrics
        acc = m.get("accuracy")
        model = (r.config.get("model") or {}).get("name") or m.get("model") or ""
        dataset = (r.config.get("dataset") or {}).get("name") or m.get("dataset") or ""
        rows.append(f"<tr><td>{_esc(r.label)}</td><td>{_esc(model)}</td><td>{_esc(dataset)}</td>"
                    f"<td>{'—' if acc is None else f'{100 * acc:.1f}%'}</td><td>{m.get('judged', '—')}</td>"
                    f"<td>{_fmt(m.get('mean_online_tokens'), '.0f')}</td><td class='path'>{_esc(r.folder)}</td></tr>")
    return ("<table class='runs'><tr><th>run</th><th>model</th><th>dataset</th><th>accuracy</th><th>judged</th>"
            "<th>online tokens</th><th>folder</th></tr>" + "".join(rows) + "</table>")


def _memory_table(runs: Sequence[RunView]) -> str:
    def mib(x: Any) -> str:
        v = _number(x)
        return "—" if v is None else f"{v / 2**20:.2f}"

    rows = [f"<tr><td>{_esc(r.label)}</td><td>{_esc(m.get('video_id'))}</td><td>{_esc(m.get('frames_encoded'))}</td>"
            f"<td>{mib(m.get('kv_bytes'))}</td><td>{mib(m.get('peak_kv_bytes'))}</td><td>{mib(m.get('aux_bytes'))}</td>"
            f"<td>{_number(m.get('encode_fps')) or 0:.2f}</td><td>{mib(m.get('peak_rss_bytes'))}</td>"
            f"<td>{_esc(m.get('error') or '')}</td></tr>" for r in runs for m in r.memory]
    return ("<table class='memory'><tr><th>run</th><th>video</th><th>frames</th><th>KV MiB</th><th>peak KV MiB</th>"
            "<th>aux MiB</th><th>encode fps</th><th>peak RSS MiB</th><th>error</th></tr>" + "".join(rows) + "</table>")


PAGE_JS = """
let DATA;  // videos, questions (with their figures), frames, memory: unpacked from the page below
const CONFIG = {displaylogo: false, responsive: true};
const $ = (id) => document.getElementById(id);

function draw(id, fig) { return Plotly.react(id, fig.data, fig.layout, CONFIG); }

// image traces name their frame by key: each frame's pixels are stored once per page, in DATA.frames
function withFrames(fig) {
  const copy = JSON.parse(JSON.stringify(fig));
  copy.data.forEach((t) => { if (t.type === 'image') t.source = DATA.frames[t.source]; });
  return copy;
}

function showQuestion(key) {
  const q = DATA.questions[key];
  $('question').value = key;
  $('details').innerHTML = q.html;
  Plotly.relayout('timeline', {shapes: [{type: 'line', xref: 'x', yref: 'paper', x0: q.time, x1: q.time,
                                         y0: 0, y1: 1, line: {color: '#555', dash: 'dot', width: 1}}]});
  return Promise.all([draw('recall', q.recall), draw('frames', withFrames(q.frames))])
    .then(() => { document.body.dataset.shown = key; });
}

function showVideo(video, key) {
  const v = DATA.videos[video];
  $('video').value = video;
  $('question').replaceChildren(...v.questions.map((k) => new Option(DATA.questions[k].label, k)));
  return draw('timeline', v.timeline).then(() => showQuestion(key || v.questions[0]));
}

// base64 of gzipped JSON (mukv.report.explorer.pack_data), unpacked by the browser itself
async function readData() {
  const bytes = Uint8Array.from(atob($('explorer-data').textContent), (c) => c.charCodeAt(0));
  const json = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
  return JSON.parse(await new Response(json).text());
}

readData().then((data) => {
  DATA = data;
  $('video').replaceChildren(...DATA.video_order.map((v) => new Option(v, v)));
  $('video').addEventListener('change', (e) => showVideo(e.target.value));
  $('question').addEventListener('change', (e) => showQuestion(e.target.value));
  draw('memory', DATA.memory);
  if (!DATA.video_order.length) return;
  showVideo(DATA.video_order[0]).then(() => {
    // a click on a question (or on its evidence) in the timeline selects it
    $('timeline').on('plotly_click', (e) => { const k = e.points[0].customdata; if (k) showQuestion(k); });
  });
});
"""

PAGE_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 8px; } h2 { font-size: 16px; margin: 24px 0 6px; }
table { border-collapse: collapse; margin: 6px 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } td.path { color: #777; font-size: 12px; }
tr.right td.verdict { color: #2ca02c; } tr.wrong td.verdict { color: #d62728; }
.controls { margin: 8px 0; } select { font-size: 14px; max-width: 70em; } .meta, .note { color: #777; }
p.q { font-size: 15px; margin: 8px 0 2px; }
"""


def build_page(runs: Sequence[RunView], max_thumbnails: int = 2000, title: str | None = None) -> str:
    """The explorer page of ``runs`` (one run, or several compared on the same questions), as one HTML string."""
    runs = list(runs)
    _label_runs(runs)
    questions, order = collect_questions(runs)
    shown = {k: shown_frames(q, runs) for k, q in questions.items()}
    wanted: dict[str, set[int]] = {}
    for k, frames in shown.items():
        wanted.setdefault(questions[k]["video_id"], set()).update(frames)
    thumbs: dict[str, tuple[str, tuple[int, int]]] = {}
    notes = []
    for run in runs:  # the frames of each video from the first run whose dataset opens it
        missing = {v: fs for v, fs in wanted.items() if any(frame_key(v, f) not in thumbs for f in fs)}
        if not missing:
            break
        sources, why = frame_sources(run.config)
        if why:
            notes.append(f"frames of {run.label}'s dataset could not be read ({why})")
        thumbs.update(render_thumbnails(sources, missing, max_thumbnails - len(thumbs)))
    if sum(len(fs) for fs in wanted.values()) > len(thumbs) and not notes:
        notes.append(f"{sum(len(fs) for fs in wanted.values()) - len(thumbs)} frame(s) shown without their picture "
                     f"(more than {max_thumbnails} thumbnails, or outside the video)")

    def image(video: str, frame: int) -> tuple[str, tuple[int, int]] | None:
        key = frame_key(video, frame)  # the page puts the picture in place of its key (PAGE_JS: withFrames)
        return (key, thumbs[key][1]) if key in thumbs else None

    videos = {}
    for video, keys in order.items():
        durations = [float(r.answers[questions[k]["id"]]["end_time"] or 0) for r in runs for k in keys
                     if questions[k]["id"] in r.answers]
        videos[video] = {"questions": keys,
                         "timeline": timeline_figure(video, runs, keys, questions, max(durations, default=0) or None)}
    page_questions = {
        k: {"video": q["video_id"], "time": q["end_time"], "html": question_html(q, runs),
            "label": f"{q['end_time']:g} s · {q['qtype'] or 'question'} · {q['question']}",
            "recall": recall_strip_figure(q, runs), "frames": frames_figure(q, runs, shown[k], image)}
        for k, q in questions.items()}
    data = {"videos": videos, "video_order": list(order), "questions": page_questions,
            "frames": {k: uri for k, (uri, _) in thumbs.items()},
            "memory": memory_figure(runs)}
    name = title or ("mukv explorer: " + " vs ".join(r.label for r in runs))
    note_html = "".join(f"<p class='note'>{_esc(n)}</p>" for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(name)}</title>
<style>{PAGE_CSS}</style>
<script>{plotly_bundle()}</script>
</head><body>
<h1>{_esc(name)}</h1>
{_runs_table(runs)}{note_html}
<div class="controls"><label>video <select id="video"></select></label></div>
<div id="timeline"></div>
<div class="controls"><label>question <select id="question"></select></label></div>
<div id="details"></div>
<div id="recall"></div>
<div id="frames"></div>
<h2>Memory and latency</h2>
<div id="memory"></div>
{_memory_table(runs)}
<script type="{DATA_TYPE}" id="explorer-data">{pack_data(data)}</script>
<script>{PAGE_JS}</script>
</body></html>
"""


def write_explorer(folders: Sequence[str | Path], out: str | Path, max_thumbnails: int = 2000) -> Path:
    """Write the explorer page of the run ``folders`` to ``out``."""
    page = build_page([load_run(f) for f in folders], max_thumbnails=max_thumbnails)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def write_run_explorer(folder: str | Path) -> Path | None:
    """``<run>/explorer.html``, at the end of every run; a failure is logged, never raised (the page is a view of
    the results, not a result)."""
    try:
        return write_explorer([folder], Path(folder) / EXPLORER)
    except Exception as err:  # noqa: BLE001 - nothing here may fail a run
        log.warning("explorer.html not written: %s: %s", type(err).__name__, err)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mukv.report.explorer", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (several: compared on the same questions)")
    parser.add_argument("--out", help=f"the page to write (default: RUN/{EXPLORER} for one run, "
                                      "explorer_compare.html here for several)")
    parser.add_argument("--max-thumbnails", type=int, default=2000, help="frames drawn with their picture (2000)")
    args = parser.parse_args(argv)
    out = args.out or (Path(args.runs[0]) / EXPLORER if len(args.runs) == 1 else Path("explorer_compare.html"))
    try:
        path = write_explorer(args.runs, out, args.max_thumbnails)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
