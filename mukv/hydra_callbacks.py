"""Hydra callbacks registered in ``conf/hydra/default.yaml``.

``MultirunTable``: when a multirun ends, one table of its jobs, the one ``make reproduce-table`` renders
(``mukv.report.tables``): ``results.md`` and ``results.csv`` in the sweep folder, and the markdown printed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mukv")


def sweep_folder(config: DictConfig) -> Path:
    return Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()


def job_folders(sweep: Path) -> list[Path]:
    """The sweep's job folders (Hydra writes ``.hydra/`` into each one before the job runs)."""
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: (len(p.name), p.name))


def job_overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides that its row label may need (``key -> value``): not the cache choice
    or its knobs (the table labels those from the config), not the stream length (labelled ``N min``), not
    nested group choices (``+experiment/grid=...`` of ``make reproduce-table``, ``hydra/launcher=...``)."""
    path = job / ".hydra" / "overrides.yaml"
    out: dict[str, str] = {}
    for item in (yaml.safe_load(path.read_text()) if path.is_file() else None) or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key in ("cache", "dataset.max_minutes") or key.startswith(("cache.", "hydra.")) or "/" in key:
            continue
        out[key] = value
    return out


def write_multirun_table(sweep: Path, title: str) -> str:
    """``results.md`` / ``results.csv`` of the finished jobs under ``sweep``; returns the markdown."""
    from mukv.report.tables import collect_runs, write_tables

    jobs = job_folders(sweep) if sweep.is_dir() else []
    runs = collect_runs(jobs)
    for run in runs:  # rows that differ only by a non-cache override (engine.max_new_tokens=2,3) are told apart
        run.knobs.update({k: v for k, v in job_overrides(run.path).items() if k not in run.knobs})
    finished = {r.path.resolve() for r in runs}
    unfinished = [p for p in jobs if p.resolve() not in finished]
    notes = [f"{len(runs)} of {len(jobs)} job(s) finished, in `{sweep}`."]
    if unfinished:
        notes.append("Not finished (no metrics.json): " + ", ".join(p.name for p in unfinished) + ".")
    write_tables(runs, sweep, title=title, notes=notes)
    return (sweep / "results.md").read_text()


class MultirunTable(Callback):
    """Renders the jobs of a multirun as one table when it ends (sweep folder: results.md, results.csv)."""

    def __init__(self) -> None:
        self.sweep: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep = sweep_folder(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = self.sweep or sweep_folder(config)
        title = f"Multirun {OmegaConf.select(config, 'task_name', default='')} {sweep.name}".replace("  ", " ")
        try:
            text = write_multirun_table(sweep, title)
        except Exception as err:  # the jobs' own folders hold every result: a table failure must not hide them
            log.warning("could not write the multirun table in %s: %s", sweep, err)
            print(f"warning: could not write the multirun table in {sweep}: {err}")
            return
        print(f"\n{text}\ntable: {sweep / 'results.md'}, {sweep / 'results.csv'}", flush=True)
