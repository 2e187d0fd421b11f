"""Summary metrics of a run, from its predictions and memory rows."""

from __future__ import annotations

from typing import Any

import pandas as pd


def summarize(predictions: pd.DataFrame, memory: pd.DataFrame, sample_fps: float) -> dict[str, Any]:
    """Accuracy = correct / judged (as published), plus the count of answers that could not be judged."""
    out: dict[str, Any] = {"questions": int(len(predictions)), "videos": int(len(memory))}
    if len(predictions):
        failed = predictions["error"].fillna("").astype(str).ne("") if "error" in predictions else False
        out["failed_questions"] = int(failed.sum()) if not isinstance(failed, bool) else 0
        for col in ("online_tokens", "latency_s", "ttft_s", "recall_s", "new_tokens"):
            if col in predictions:
                out[f"mean_{col}"] = float(pd.to_numeric(predictions[col]).mean())
        if "judge_correct" in predictions:
            judged = predictions["judge_correct"].dropna()
            judged = judged[judged.astype(str) != ""]
            correct = judged.astype(str).str.lower().isin(["true", "1", "1.0"])
            out["judged"] = int(len(judged))
            out["invalid_judgments"] = int(len(predictions) - len(judged))
            out["accuracy"] = float(correct.mean()) if len(judged) else None
            scores = pd.to_numeric(predictions.get("judge_score"), errors="coerce").dropna()
            out["mean_score"] = float(scores.mean()) if len(scores) else None
            if "qtype" in predictions and predictions["qtype"].notna().any():
                by_type = {}
                for qtype, rows in predictions.assign(_ok=correct.reindex(predictions.index)).groupby("qtype"):
                    ok = rows["_ok"].dropna()
                    by_type[str(qtype)] = float(ok.astype(bool).mean()) if len(ok) else None
                out["accuracy_by_type"] = by_type
    if len(memory):
        frames = pd.to_numeric(memory["frames_encoded"]).sum()
        encode_s = pd.to_numeric(memory["encode_s"]).sum()
        hours = frames / sample_fps / 3600.0
        kv = pd.to_numeric(memory["kv_bytes"]).sum()
        out.update({
            "frames_encoded": int(frames),
            "encode_fps": float(frames / encode_s) if encode_s else None,
            "kv_bytes_total": int(kv),
            "peak_kv_bytes": int(pd.to_numeric(memory["peak_kv_bytes"]).max()),
            "kv_gb_per_hour": float(kv / 1e9 / hours) if hours else None,
            "peak_rss_bytes": int(pd.to_numeric(memory["peak_rss_bytes"]).max()),
            "peak_cuda_bytes": int(pd.to_numeric(memory["peak_cuda_bytes"]).max()),
        })
    return out
