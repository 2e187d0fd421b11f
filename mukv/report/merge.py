"""Merge the run folders of one configuration's shards into one result.

``python -m mukv.report.merge RUN_DIR... --out DIR`` concatenates ``predictions.csv`` and
``memory_stats.csv`` (sorted by video, then question time), recomputes ``metrics.json`` from the merged
rows (the same ``summarize`` as a single run), and writes the first run's ``resolved_config.yaml`` with the
shard fields reset. The runs must share one configuration apart from ``dataset.shard_index`` (and paths,
logger and progress settings): merging a ``full`` shard with a ``sliding_window`` one is refused, naming the
keys that differ. A video or question present in two inputs is refused too (overlapping shards), and
missing shards are reported (a warning; ``--require-complete`` makes it an error).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mukv.data.datasets import scoring_options
from mukv.report.metrics import summarize
from mukv.report.outputs import MEMORY, METRICS, PREDICTIONS, write_json_atomic

# Config keys that may differ between shards of one configuration.
IGNORED_KEYS = ("paths", "logger", "task_name", "tags", "dataset.shard_index", "engine.progress",
                "judge.cache_path", "hydra_job")


class MergeError(Exception):
    """Inputs that cannot be merged into one result (message meant to be read as is)."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def run_config(path: Path) -> dict[str, Any]:
    f = path / "resolved_config.yaml"
    if not f.is_file():
        raise MergeError(f"{path}: no resolved_config.yaml (not a finished mukv run folder?)")
    return yaml.safe_load(f.read_text()) or {}


def config_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config without the keys shards may differ in."""
    return {k: v for k, v in _flat(config).items() if not _ignored(k)}


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    fa, fb = config_identity(a), config_identity(b)
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def group_runs(paths: Sequence[Path]) -> list[list[Path]]:
    """Run folders grouped by configuration (shards of one configuration together), in input order."""
    groups: list[tuple[dict[str, Any], list[Path]]] = []
    for p in paths:
        ident = config_identity(run_config(p))
        for g_ident, members in groups:
            if g_ident == ident:
                members.append(p)
                break
        else:
            groups.append((ident, [p]))
    return [members for _, members in groups]


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False) if path.is_file() and path.stat().st_size else pd.DataFrame()


def merge_runs(paths: Sequence[str | Path], out: str | Path, require_complete: bool = False) -> dict[str, Any]:
    """Merge the runs in ``paths`` into ``out``; returns the recomputed metrics."""
    runs = [Path(p) for p in paths]
    if not runs:
        raise MergeError("no run folders given")
    for p in runs:
        if not (p / PREDICTIONS).is_file() and not (p / MEMORY).is_file():
            raise MergeError(f"{p}: neither {PREDICTIONS} nor {MEMORY} (not a run folder, or it never started)")
    configs = [run_config(p) for p in runs]
    for p, c in zip(runs[1:], configs[1:], strict=True):
        diff = config_differences(configs[0], c)
        if diff:
            raise MergeError(f"{p} is not a shard of the same configuration as {runs[0]}: " + "; ".join(diff))
    ds = configs[0].get("dataset", {})
    num_shards = int(ds.get("num_shards", 1) or 1)
    indices = [int(c.get("dataset", {}).get("shard_index", 0) or 0) for c in configs]
    dup = sorted({i for i in indices if indices.count(i) > 1})
    if dup and num_shards > 1:
        raise MergeError(f"shard index {dup} given more than once")
    missing = sorted(set(range(num_shards)) - set(indices))
    if missing:
        msg = f"shards {missing} of {num_shards} are missing; the merged result covers part of the dataset"
        if require_complete:
            raise MergeError(msg)
        print(f"warning: {msg}", file=sys.stderr)

    preds = [_read(p / PREDICTIONS) for p in runs]
    mems = [_read(p / MEMORY) for p in runs]
    seen: dict[str, Path] = {}
    for p, mem, pred in zip(runs, mems, preds, strict=True):
        vids = set(mem["video_id"].astype(str)) if "video_id" in mem else set()
        vids |= set(pred["video_id"].astype(str)) if "video_id" in pred else set()
        for v in sorted(vids):
            if v in seen:
                raise MergeError(f"video {v} is in both {seen[v]} and {p} (overlapping shards or a run given twice)")
            seen[v] = p
    pred_df = pd.concat([d for d in preds if len(d)], ignore_index=True) if any(len(d) for d in preds) else pd.DataFrame()
    mem_df = pd.concat([d for d in mems if len(d)], ignore_index=True) if any(len(d) for d in mems) else pd.DataFrame()
    if len(pred_df):
        pred_df = pred_df.sort_values(["video_id", "end_time", "qid"], kind="stable").reset_index(drop=True)
    if len(mem_df):
        mem_df = mem_df.sort_values("video_id", kind="stable").reset_index(drop=True)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pred_df.to_csv(out / PREDICTIONS, index=False)
    mem_df.to_csv(out / MEMORY, index=False)
    metrics = summarize(pred_df, mem_df, float(ds.get("sample_fps", 1.0)), ds.get("age_buckets_s"),
                        **scoring_options(ds))  # the dataset's categories and averaging, as a single run
    first = json.loads((runs[0] / METRICS).read_text()) if (runs[0] / METRICS).is_file() else {}
    metrics.update(method=first.get("method"), dataset=first.get("dataset") or ds.get("name"),
                   model=first.get("model"), max_minutes=ds.get("max_minutes"), shard_index=0, num_shards=1,
                   merged_from=[str(p) for p in runs], merged_shards=sorted(indices), missing_shards=missing,
                   wall_s=sum(float(_json(p).get("wall_s") or 0.0) for p in runs))
    judges = [_json(p).get("judge") for p in runs if _json(p).get("judge")]
    if judges:
        judge = dict(judges[0])
        for key, value in judge.items():
            if isinstance(value, int) and not isinstance(value, bool):
                judge[key] = sum(int(j.get(key) or 0) for j in judges)
        metrics["judge"] = judge
    write_json_atomic(out / METRICS, metrics)
    merged_cfg = dict(configs[0])
    merged_cfg["dataset"] = {**ds, "shard_index": 0, "num_shards": 1}
    (out / "resolved_config.yaml").write_text(yaml.safe_dump(merged_cfg, sort_keys=False))
    return metrics


def _json(path: Path) -> dict[str, Any]:
    f = path / METRICS
    return json.loads(f.read_text()) if f.is_file() else {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mukv.report.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (the shards of one configuration)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the merged result")
    parser.add_argument("--require-complete", action="store_true", help="fail if a shard is missing")
    args = parser.parse_args(argv)
    try:
        metrics = merge_runs(args.runs, args.out, args.require_complete)
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    acc = metrics.get("accuracy")
    print(f"merged {len(args.runs)} run(s) -> {args.out}: {metrics.get('questions')} questions, "
          f"{metrics.get('videos')} videos, accuracy {acc if acc is None else round(acc, 4)}, "
          f"{metrics.get('invalid_judgments', 0)} invalid judgment(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
