"""Resuming a run that died: what its output folder already holds.

A run folder is a function of the command (``hydra.run.dir`` hashes the overrides), so starting the same
command again lands in the same folder; the answered questions are read back from ``predictions.csv``
and the finished videos from ``memory_stats.csv``, and the run continues at the first unanswered
question. A kill can only cut the last line of a CSV short (every line is one fsynced write); such a
partial line is dropped before reading.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path


def short_hash(text: str, length: int = 8) -> str:
    """A stable short digest of a string (used in run folder names)."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:length]


def drop_partial_last_line(path: Path) -> bool:
    """Truncate a trailing line that lacks its newline (a write cut by a kill); True if one was dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())
    return True


def _column(path: Path, column: str, where: str | None = None) -> set[str]:
    if not path.exists() or path.stat().st_size == 0:
        return set()
    drop_partial_last_line(path)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {r[column] for r in rows if column in r and (where is None or not r.get(where))}


def answered_questions(predictions_csv: Path) -> set[str]:
    """Question ids already answered (a row exists, error or not)."""
    return _column(predictions_csv, "qid")


def finished_videos(memory_csv: Path) -> set[str]:
    """Videos whose row in memory_stats.csv was written without an error (fully streamed)."""
    return _column(memory_csv, "video_id", where="error")
