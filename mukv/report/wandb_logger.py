"""Weights & Biases logging: resolved config, per-question table, per-video memory table, the run's
figures (accuracy by question age, memory and latency along the stream), summary (with the breakdowns).

Offline by default (no account needed; ``wandb sync`` uploads later). Local files are written whatever
the logger, so W&B is a view of the run, never the only copy. Runs are grouped by experiment
(``logger.group``, default the task name), typed by ``logger.job_type`` (default the mode) and tagged with
method, dataset, model and, in a Hydra multirun, the sweep (see ``train_eval._log_wandb``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd


class WandbLogger:
    def __init__(self, cfg, run_config: dict[str, Any], output_dir: Path, name: str, group: str | None = None,
                 job_type: str | None = None, tags: list[str] | None = None) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=group or cfg.group,
            job_type=job_type, tags=(tags if tags is not None else list(cfg.tags)) or None,
            dir=str(cfg.dir or output_dir), config=run_config, name=name, reinit="finish_previous",
        )

    def log_tables(self, predictions: pd.DataFrame, memory: pd.DataFrame) -> None:
        """The per-question and per-video tables (the breakdowns by age and type are in the summary, as
        ``by_age/<bucket>/accuracy`` ..., and in the figures)."""
        if len(predictions):
            self.run.log({"predictions": self.wandb.Table(dataframe=predictions.astype(str))})
        if len(memory):
            self.run.log({"memory": self.wandb.Table(dataframe=memory)})

    def log_images(self, paths: list[Path]) -> None:
        images = {f"figures/{Path(p).stem}": self.wandb.Image(str(p)) for p in paths}
        if images:
            self.run.log(images)

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
