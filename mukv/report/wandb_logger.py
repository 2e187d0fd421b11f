"""Weights & Biases logging: resolved config, per-question table, per-video memory table, summary.

Offline by default (no account needed; ``wandb sync`` uploads later). Local files are written whatever
the logger, so W&B is a view of the run, never the only copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd


class WandbLogger:
    def __init__(self, cfg, run_config: dict[str, Any], output_dir: Path, name: str) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group, tags=list(cfg.tags) or None,
            dir=str(cfg.dir or output_dir), config=run_config, name=name, reinit="finish_previous",
        )

    def log_tables(self, predictions: pd.DataFrame, memory: pd.DataFrame) -> None:
        if len(predictions):
            self.run.log({"predictions": self.wandb.Table(dataframe=predictions.astype(str))})
        if len(memory):
            self.run.log({"memory": self.wandb.Table(dataframe=memory)})

    def log_summary(self, metrics: dict[str, Any]) -> None:
        for key, value in _flatten(metrics).items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
