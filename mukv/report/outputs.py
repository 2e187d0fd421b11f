"""Files of a run folder, written as the run goes so that nothing is lost when it dies.

``predictions.csv`` gets one line per answered question, flushed and fsynced as it is written;
``memory_stats.csv`` one line per video; ``metrics.json`` at the end (replaced atomically).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

PREDICTIONS = "predictions.csv"
MEMORY = "memory_stats.csv"
METRICS = "metrics.json"


class CsvAppender:
    """Appends dict rows to a CSV; the header comes from the first row (later keys must match)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as f:
                self.fields = next(csv.reader(f), None)

    def append(self, row: dict[str, Any]) -> None:
        if self.fields is None:
            self.fields = list(row)
            self._write_line(self.fields)
        extra = set(row) - set(self.fields)
        if extra:
            raise ValueError(f"{self.path.name}: columns {sorted(extra)} are not in the header")
        self._write_line([_cell(row.get(k, "")) for k in self.fields])

    def _write_line(self, values: list[Any]) -> None:
        buf = io.StringIO()
        csv.writer(buf).writerow(values)
        # One write of one whole line, then fsync: a kill leaves either the whole line or none of it.
        with self.path.open("a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else value


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
