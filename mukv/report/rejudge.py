"""Judge (again) the predictions of finished runs without streaming anything.

    python -m mukv.report.rejudge RUN_DIR [RUN_DIR ...] [judge overrides, e.g. judge=openai judge.model=gpt-4o-mini]

For each run folder, every row of ``predictions.csv`` is judged with the configured judge (default: the
judge the run was configured with, from its ``resolved_config.yaml``; overrides compose on top, as in
``mukv.run``), ``judge_correct`` / ``judge_score`` / ``judge_error`` are replaced and ``metrics.json`` is
recomputed. Use it to finish judging after a judge endpoint was down (rows judged before come from the
judgment cache at no cost), or to score a run with another judge (``--only-invalid`` re-asks only the rows
without a valid verdict). The files are replaced atomically; ``predictions.csv`` keeps its row order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import OmegaConf

from mukv.data.datasets import scoring_options
from mukv.errors import MukvError
from mukv.report.metrics import summarize, truth
from mukv.report.outputs import MEMORY, METRICS, PREDICTIONS, write_json_atomic


def judge_config(run_config: dict[str, Any], overrides: Sequence[str]):
    """The run's judge config with ``overrides`` (``judge=<option>`` selects conf/judge/<option>.yaml)."""
    from mukv.config import judge_schema_of

    run_judge = run_config.get("judge") or {}
    cfg = OmegaConf.merge(OmegaConf.structured(judge_schema_of(run_judge)), run_judge)
    conf = Path(__file__).resolve().parents[2] / "conf" / "judge"
    root = (run_config.get("paths") or {}).get("root_dir") or os.getcwd()
    for ov in overrides:
        key, _, value = ov.partition("=")
        if key in ("judge", "+judge"):
            option = conf / f"{value}.yaml"
            if not option.is_file():
                raise MukvError(f"unknown judge option '{value}' (conf/judge/: "
                                f"{', '.join(sorted(p.stem for p in conf.glob('*.yaml')))})")
            data = yaml.safe_load(option.read_text()) or {}
            schema = judge_schema_of(data)
            data.pop("defaults", None)
            if isinstance(data.get("cache_path"), str):
                data["cache_path"] = data["cache_path"].replace("${paths.root_dir}", str(root))
            cfg = OmegaConf.merge(OmegaConf.structured(schema), data)
        elif key.startswith("judge."):
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key[len('judge.'):]}={value}"]))
        else:
            raise MukvError(f"only judge overrides are accepted here, got '{ov}'")
    return cfg


def rejudge(run_dir: str | Path, overrides: Sequence[str] = (), only_invalid: bool = False) -> dict[str, Any]:
    from mukv.judge import build_judge

    run_dir = Path(run_dir)
    pred_path = run_dir / PREDICTIONS
    if not pred_path.is_file():
        raise MukvError(f"{run_dir}: no {PREDICTIONS}")
    run_cfg = yaml.safe_load((run_dir / "resolved_config.yaml").read_text()) if (
        run_dir / "resolved_config.yaml").is_file() else {}
    cfg = judge_config(run_cfg, overrides)
    judge = build_judge(cfg)
    if judge is None:
        raise MukvError("judge=none: nothing to judge with")
    judge.prepare()
    preds = pd.read_csv(pred_path, keep_default_na=False, dtype=str)
    valid = truth(preds["judge_correct"]).notna() if "judge_correct" in preds else pd.Series(False, index=preds.index)
    correct, score, error = [], [], []
    for i, row in preds.iterrows():
        if only_invalid and valid[i]:
            correct.append(row["judge_correct"])
            score.append(row["judge_score"])
            error.append(row.get("judge_error", ""))
            continue
        v = judge.judge(str(row["question"]), str(row["answer"]), str(row["prediction"]))
        correct.append("" if v.correct is None else str(v.correct))
        score.append("" if v.score is None else repr(float(v.score)))
        error.append(v.error)
    preds["judge_correct"], preds["judge_score"], preds["judge_error"] = correct, score, error
    tmp = pred_path.with_suffix(".csv.tmp")
    preds.to_csv(tmp, index=False)
    os.replace(tmp, pred_path)

    old = json.loads((run_dir / METRICS).read_text()) if (run_dir / METRICS).is_file() else {}
    mem = pd.read_csv(run_dir / MEMORY, keep_default_na=False) if (run_dir / MEMORY).is_file() else pd.DataFrame()
    ds = run_cfg.get("dataset") or {}
    metrics = summarize(pd.read_csv(pred_path, keep_default_na=False), mem, float(ds.get("sample_fps") or 1.0),
                        ds.get("age_buckets_s"), **scoring_options(ds))  # the dataset's categories, averaging
    keep = {k: v for k, v in old.items() if k not in metrics and k not in ("judge",)}
    metrics = {**keep, **metrics, "judge": judge.describe()}
    judge.close()
    write_json_atomic(run_dir / METRICS, metrics)
    (run_dir / "judge_config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mukv.report.rejudge", description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="+", help="run folders, then judge overrides (judge=..., judge.key=...)")
    parser.add_argument("--only-invalid", action="store_true", help="ask only rows without a valid verdict")
    args = parser.parse_args(argv)
    runs = [a for a in args.items if Path(a).is_dir()]
    overrides = [a for a in args.items if not Path(a).is_dir()]
    if not runs:
        print("error: no run folder given (existing folders with predictions.csv)", file=sys.stderr)
        return 2
    try:
        for run in runs:
            m = rejudge(run, overrides, args.only_invalid)
            print(f"{run}: accuracy {m.get('accuracy')}, judged {m.get('judged')}, "
                  f"invalid {m.get('invalid_judgments')}, requests {m['judge'].get('requests', 0)}, "
                  f"cache hits {m['judge'].get('cache_hits', 0)}")
    except MukvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
