"""Files of a run folder, written as the run goes so that nothing is lost when it dies.

Every row (one per answered question, one per streamed video) is first appended to a JSON Lines journal,
``predictions.jsonl`` / ``memory_stats.jsonl``, as one fsynced line; JSON escapes newlines, so a kill at
any byte leaves complete lines and at most one partial last line, which the reader drops: any prefix of a
journal is readable and resumable. ``predictions.csv`` and ``memory_stats.csv`` (the documented outputs)
get the same row as it is written, and are rendered again from the journal on resume and at the end of a
run wherever they disagree with it (a row cut by a kill, say inside a quoted answer that holds a newline).
``metrics.json`` is written at the end (replaced atomically).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
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


def journal_path(csv_path: Path) -> Path:
    """The JSON Lines journal behind a run CSV (``predictions.csv`` -> ``predictions.jsonl``)."""
    return csv_path.with_suffix(".jsonl")


def read_journal(path: Path, repair: bool = False) -> tuple[list[dict[str, Any]], int]:
    """(rows, lines skipped) of a JSON Lines journal; a last line without its newline (a write cut by a
    kill) is not a row, and with ``repair`` it is cut off the file so that appends start on a new line.
    A complete line that is not a JSON object (a damaged disk block) is skipped and counted."""
    if not path.is_file():
        return [], 0
    with path.open("rb+" if repair else "rb") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if repair and end < len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    rows, skipped = [], 0
    for line in data[:end].split(b"\n")[:-1]:
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def read_csv_records(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a run CSV, tolerant of damage: a record whose field count differs from the header
    (cut inside a quoted field, or not ended) is dropped, and reading stops at the first such record."""
    if not path.is_file():
        return [], []
    with path.open(encoding="utf-8", errors="replace", newline="") as f:  # "\r\n" inside a quoted answer kept
        text = f.read()
    records = csv.reader(io.StringIO(text, newline=""))
    header = next(records, None) or []
    rows, whole = [], True
    try:
        for rec in records:
            if len(rec) != len(header):
                whole = False
                break
            rows.append(dict(zip(header, rec, strict=True)))
    except csv.Error:
        whole = False
    if whole and rows and not text.endswith("\n"):
        rows.pop()  # the last record lacks its newline: it may be cut short
    return header, rows


class RowJournal:
    """The rows of one run file: a JSON Lines journal (the source, read on resume) and its CSV rendering.

    ``key`` names the column that identifies a row where a later row replaces an earlier one (``video_id``
    in ``memory_stats``: a video that failed and was streamed again on resume); ``ident`` (default: ``key``)
    the column that identifies a row when the CSV is checked against the journal (``qid`` in
    ``predictions``); ``journal_only`` the columns kept in the journal and left out of the CSV (``recalled``
    in ``predictions``: what each answer's context held, read by the run explorer). A run folder written
    before the journals existed is read from its CSV once and journaled.
    """

    def __init__(self, csv_path: Path, key: str | None = None, ident: str | None = None,
                 journal_only: Sequence[str] = ()) -> None:
        self.csv_path, self.path, self.key = csv_path, journal_path(csv_path), key
        self.ident = ident or key
        self.journal_only = frozenset(journal_only)
        self.skipped = 0
        if self.path.is_file() or not csv_path.is_file():
            self.rows, self.skipped = read_journal(self.path, repair=True)
        else:  # a run folder from before the journal: its CSV rows (all strings) become the journal
            _, self.rows = read_csv_records(csv_path)
            for row in self.rows:
                self._journal(row)
        self._csv_fields: list[str] | None = None

    def append(self, row: dict[str, Any]) -> None:
        """Journal the row (one fsynced line), then add it to the CSV (rendered anew if its columns differ)."""
        row = dict(row)
        self._journal(row)
        self.rows.append(row)
        fields = self._csv_fields
        if fields is None or not self.csv_path.is_file() or set(row) - set(fields) - self.journal_only \
                or self.key is not None:
            self.render()  # the first row, new columns, or a keyed file (a later row replaces an earlier one)
            return
        with self.csv_path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([_cell(row.get(k, "")) for k in fields])

    def render(self, order: Sequence[str] | None = None) -> None:
        """Write the CSV from the journal (atomically); ``order``: the key values in the order rows go."""
        rows = self.rendered_rows(order)
        fields = list(dict.fromkeys(k for row in rows for k in row if k not in self.journal_only))
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        if fields:
            writer.writerow(fields)
        for row in rows:
            writer.writerow([_cell(row.get(k, "")) for k in fields])
        tmp = self.csv_path.with_suffix(self.csv_path.suffix + ".tmp")
        tmp.write_text(buf.getvalue(), encoding="utf-8", newline="")
        os.replace(tmp, self.csv_path)
        self._csv_fields = fields

    def sync(self, order: Sequence[str] | None = None) -> bool:
        """Render the CSV again unless it is whole and holds the journal's rows, in order, with all their
        columns (compared by ``ident``, or whole rows without one: a CSV judged again in place by
        ``mukv.report.rejudge`` is kept); True if it was rendered."""
        rows = self.rendered_rows(order)
        header, have = read_csv_records(self.csv_path)
        if self.ident:
            same = [r.get(self.ident) for r in have] == [_text(row.get(self.ident, "")) for row in rows]
        else:
            same = [list(r.values()) for r in have] == [[_text(row.get(k, "")) for k in header] for row in rows]
        if (rows or self.csv_path.is_file()) and (not header or not same
                                                   or not {k for row in rows for k in row} - self.journal_only
                                                   <= set(header)):
            self.render(order)
            return True
        self._csv_fields = header or None
        return False

    def rendered_rows(self, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if self.key is None:
            return list(self.rows)
        last = {str(row.get(self.key)): row for row in self.rows}
        rank = {k: i for i, k in enumerate(order or ())}
        return sorted(last.values(), key=lambda r: rank.get(str(r.get(self.key)), len(rank)))

    def _journal(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, default=str) + "\n"
        # One write of one whole line, then fsync: a kill leaves the line, none of it, or a partial last line.
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _text(value: Any) -> str:
    """A cell as the CSV holds it."""
    return str(_cell(value))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
