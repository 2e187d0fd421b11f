"""Summary metrics of a run, from its predictions and memory rows (as written to, or read back from, CSV).

Accuracy is the published definition, yes / (yes + no) over valid judgments, with its 95% Wilson interval
(``accuracy_lo``, ``accuracy_hi``; overall and in every breakdown), and the mean score is over the same
judgments; answers the judge could not judge (failed requests, unparsable replies) are counted as
``invalid_judgments`` and never silently dropped. ``accuracy_strict`` counts them as wrong, a lower bound.
``failed_questions`` counts rows with an error (not answered, not judged: counted among the invalid
judgments); ``past_end_questions`` those asked past the video file's real end (``meta.past_end_s``), whether
failed or, with ``dataset.past_end=answer``, answered from the frames that exist.
Breakdowns: by question type (where the dataset has types) and by question age, the time from the
answer's evidence to the question (``end_time - meta.evidence_time``, else ``meta.age_s``, else
``end_time - start_time``) in configurable buckets (edges in seconds, the last bucket open-ended), and,
for a method with a budget, by that age relative to its window (``by_window_age``: the span of the most recent
frames its answer context could hold, ``window_s``): evidence inside it (a sliding window of the same tokens
holds it), 1-4 windows old, older; each with its types and its evidence recall (``evidence_recalled``).
Categories (``Dataset.categories``: category -> question types) pool their questions (``by_category``); a
dataset whose leaderboard averages per type (OVO-Bench: ``Dataset.macro_average``) also gets each category's
unweighted mean of its types' accuracies and the mean of those categories' means (``macro_accuracy``, in each
``by_category`` entry and overall; :func:`macro_scores`), every type counting alike however many questions it
has. ``invalid_answers``: answers a choice judge read and found no choice in (judged wrong, ``judge_error``
starting with ``mukv.judge.base.INVALID_ANSWER``).
Efficiency: online tokens (what an answer attends to), KV bytes held at the end of each video, GB of KV per
hour of video, peak KV / RSS / CUDA memory, encode frames per second, time to first token and to the full
answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_AGE_BUCKETS_S: tuple[float, ...] = (0, 30, 60, 120, 300, 600, 1200, 1800, 2700, 3600)
_TRUE = {"true", "1", "1.0", "yes"}
_FALSE = {"false", "0", "0.0", "no"}


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (``z`` = 1.96) Wilson score interval of a proportion ``correct / n``, as fractions; (nan, nan) for
    no questions. Unlike the normal approximation it stays inside [0, 1] and is honest at 0 / n and n / n."""
    if n <= 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def truth(values: pd.Series) -> pd.Series:
    """Judge verdicts as True / False / None, whatever pandas made of the CSV column (bool, str, NaN)."""

    def one(v: Any) -> bool | None:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        s = str(v).strip().lower()
        return True if s in _TRUE else False if s in _FALSE else None

    return values.map(one).astype(object)


def _num(values: pd.Series | None) -> pd.Series:
    if values is None:
        return pd.Series(dtype=float)
    return pd.to_numeric(values.replace("", np.nan), errors="coerce")


def _meta(cell: Any) -> dict[str, Any]:
    if isinstance(cell, dict):
        return cell
    if isinstance(cell, str) and cell.strip().startswith("{"):
        try:
            value = json.loads(cell)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def question_age_s(predictions: pd.DataFrame) -> pd.Series:
    """Seconds from each answer's evidence to its question (see the module docstring)."""
    end = _num(predictions.get("end_time"))
    start = _num(predictions.get("start_time"))
    metas = predictions["meta"].map(_meta) if "meta" in predictions else pd.Series([{}] * len(predictions),
                                                                                      index=predictions.index)

    def one(i: Any) -> float:
        meta = metas.loc[i]
        for key, from_end in (("evidence_time", True), ("age_s", False)):
            v = meta.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                return float(end.loc[i] - v) if from_end else float(v)
        return float(end.loc[i] - start.loc[i])

    return pd.Series([one(i) for i in predictions.index], index=predictions.index, dtype=float)


def _bucket_labels(edges: Sequence[float]) -> list[str]:
    labels = [f"{lo:g}-{hi:g}s" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return labels + [f">={edges[-1]:g}s"]


WINDOW_AGE_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("in_window", 0.0, 1.0), ("1-4_windows", 1.0, 4.0), ("older", 4.0, math.inf))


def window_age_breakdown(predictions: pd.DataFrame, window_s: float) -> dict[str, Any]:
    """Questions by the age of their evidence in windows of ``window_s`` seconds (``WINDOW_AGE_BUCKETS``, age /
    window in (lo, hi], the first from 0): what a method recalls from inside the span a same-budget sliding
    window would hold, and from beyond it (memory proper). Each bucket: the judged stats, ``by_type`` accuracy
    and the mean ``evidence_recalled`` of its questions that report one (``recall``, else None)."""
    if not window_s or window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    ratio = question_age_s(predictions) / float(window_s)
    correct = truth(predictions["judge_correct"])
    scores = _num(predictions.get("judge_score", pd.Series(np.nan, index=predictions.index)))
    recalled = _num(predictions["evidence_recalled"]) if "evidence_recalled" in predictions else None
    qtype = predictions["qtype"].astype(str) if "qtype" in predictions else None
    out: dict[str, Any] = {}
    for name, lo, hi in WINDOW_AGE_BUCKETS:
        idx = predictions.index[((ratio > lo) | (lo == 0)) & (ratio <= hi)]
        if not len(idx):
            continue
        stats = _judged_stats(correct[idx], scores[idx])
        if qtype is not None:
            stats["by_type"] = {t: _judged_stats(correct[i], scores[i])["accuracy"]
                                for t, i in qtype[idx].groupby(qtype[idx]).groups.items()}
        rec = recalled[idx].dropna() if recalled is not None else ()
        stats["recall"] = float(rec.mean()) if len(rec) else None
        out[name] = stats
    return out


def macro_scores(type_accuracy: Mapping[str, float | None], categories: Mapping[str, Sequence[str]]
                 ) -> tuple[dict[str, float], float | None]:
    """(category -> the mean of its types' accuracies, the mean of those): OVO-Bench's leaderboard averaging.
    Types without an accuracy (no judged question) and categories without such a type are left out."""
    by_category: dict[str, float] = {}
    for category, types in categories.items():
        values = [float(type_accuracy[t]) for t in types if type_accuracy.get(t) is not None]
        if values:
            by_category[category] = sum(values) / len(values)
    overall = sum(by_category.values()) / len(by_category) if by_category else None
    return by_category, overall


def _judged_stats(correct: pd.Series, scores: pd.Series) -> dict[str, Any]:
    valid = correct.notna()
    n = int(valid.sum())
    yes = int((correct[valid] == True).sum())  # noqa: E712  (object column of True/False/None)
    s = scores[valid].dropna()
    lo, hi = wilson_interval(yes, n)
    return {
        "questions": int(len(correct)), "judged": n, "invalid": int(len(correct) - n), "correct": yes,
        "accuracy": yes / n if n else None, "accuracy_lo": lo, "accuracy_hi": hi,  # 95% Wilson interval
        "mean_score": float(s.mean()) if len(s) else None,
    }


def summarize(predictions: pd.DataFrame, memory: pd.DataFrame, sample_fps: float,
              age_buckets_s: Sequence[float] | None = None,
              categories: Mapping[str, Sequence[str]] | None = None,
              window_s: float | None = None, macro_average: bool = False) -> dict[str, Any]:
    """The run's metrics (see the module docstring); every value is JSON-serialisable. ``categories``
    (category -> question types, the dataset's own: ``Dataset.categories``) adds ``by_category``; with
    ``macro_average`` (``Dataset.macro_average``) each category and the run also get ``macro_accuracy``;
    ``window_s`` (the seconds of stream a method's budget holds) adds ``window_s`` and ``by_window_age``."""
    out: dict[str, Any] = {"questions": int(len(predictions)), "videos": int(len(memory))}
    if len(predictions):
        err = predictions["error"].astype(str).str.strip() if "error" in predictions else None
        out["failed_questions"] = int((err.ne("") & err.ne("nan")).sum()) if err is not None else 0
        if "beyond_trained" in predictions:  # answers whose context reaches past the model's trained positions
            out["beyond_trained_questions"] = int(truth(predictions["beyond_trained"]).eq(True).sum())
        if "meta" in predictions:  # asked past the video file's real end (failed, or answered and flagged)
            out["past_end_questions"] = int(predictions["meta"].map(lambda c: "past_end_s" in _meta(c)).sum())
        for col in ("online_tokens", "kv_tokens", "ttft_s", "latency_s", "recall_s", "encode_s", "new_tokens"):
            if col in predictions:
                out[f"mean_{col}"] = float(_num(predictions[col]).mean())
        if "latency_s" in predictions:
            lat = _num(predictions["latency_s"]).dropna()
            out["p50_latency_s"] = float(lat.quantile(0.5)) if len(lat) else None
            out["p90_latency_s"] = float(lat.quantile(0.9)) if len(lat) else None
        if "judge_correct" in predictions:
            correct = truth(predictions["judge_correct"])
            scores = _num(predictions.get("judge_score", pd.Series(np.nan, index=predictions.index)))
            overall = _judged_stats(correct, scores)
            out.update(judged=overall["judged"], invalid_judgments=overall["invalid"], correct=overall["correct"],
                       accuracy=overall["accuracy"], accuracy_lo=overall["accuracy_lo"],
                       accuracy_hi=overall["accuracy_hi"], mean_score=overall["mean_score"],
                       accuracy_strict=overall["correct"] / len(predictions))
            if "judge_error" in predictions:  # read, no choice found: judged wrong, counted apart
                from mukv.judge.base import INVALID_ANSWER

                out["invalid_answers"] = int(predictions["judge_error"].astype(str).str.startswith(INVALID_ANSWER).sum())
            if "qtype" in predictions:
                qtype = predictions["qtype"].astype(str).str.strip()
                typed = qtype.ne("") & qtype.ne("nan") & qtype.ne("None")
                if typed.any():
                    by_type = {t: _judged_stats(correct[idx], scores[idx])
                               for t, idx in qtype[typed].groupby(qtype[typed]).groups.items()}
                    out["by_type"] = by_type
                    out["accuracy_by_type"] = {t: v["accuracy"] for t, v in by_type.items()}
                    if categories:
                        by_category = {c: _judged_stats(correct[qtype.isin(list(types))], scores[qtype.isin(list(types))])
                                       for c, types in categories.items() if qtype.isin(list(types)).any()}
                        out["by_category"] = by_category
                        if macro_average:
                            means, out["macro_accuracy"] = macro_scores(out["accuracy_by_type"], categories)
                            for c, stats in by_category.items():
                                stats.update(types=[t for t in categories[c] if t in by_type],
                                             macro_accuracy=means.get(c))
            edges = sorted(float(e) for e in (DEFAULT_AGE_BUCKETS_S if age_buckets_s is None else age_buckets_s))
            if edges:
                age = question_age_s(predictions)
                which = np.clip(np.searchsorted(edges, age.to_numpy(), side="right") - 1, 0, len(edges) - 1)
                labels = _bucket_labels(edges)
                by_age = {}
                for b in sorted(set(which.tolist())):
                    idx = predictions.index[which == b]
                    stats = _judged_stats(correct[idx], scores[idx])
                    stats.update(lo_s=edges[b], hi_s=edges[b + 1] if b + 1 < len(edges) else None,
                                 mean_age_s=float(age[idx].mean()))
                    by_age[labels[b]] = stats
                out["by_age"] = by_age
            if window_s:
                out["window_s"] = float(window_s)
                out["by_window_age"] = window_age_breakdown(predictions, window_s)
    if len(memory):
        frames = float(_num(memory["frames_encoded"]).sum())
        encode_s = float(_num(memory["encode_s"]).sum())
        hours = frames / sample_fps / 3600.0 if sample_fps else 0.0
        kv = float(_num(memory["kv_bytes"]).sum())
        err = memory["error"].astype(str).str.strip() if "error" in memory else None
        out.update({
            "failed_videos": int((err.ne("") & err.ne("nan")).sum()) if err is not None else 0,
            "frames_encoded": int(frames),
            "video_hours": hours,
            "encode_fps": frames / encode_s if encode_s else None,
            "kv_bytes_total": int(kv),
            "kv_bytes_per_video": kv / len(memory),
            "peak_kv_bytes": int(_num(memory["peak_kv_bytes"]).max()),
            "kv_gb_per_hour": kv / 1e9 / hours if hours else None,
            "aux_bytes_total": int(_num(memory.get("aux_bytes", pd.Series([0]))).fillna(0).sum()),
            "peak_rss_bytes": int(_num(memory["peak_rss_bytes"]).max()),
            "peak_cuda_bytes": int(_num(memory["peak_cuda_bytes"]).max()),
        })
    return _plain(out)


def _plain(value: Any) -> Any:
    """NaN -> None and numpy scalars -> Python, recursively (metrics.json and W&B want plain values)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
