"""Judgments cached on disk (sqlite), so that a re-run costs nothing and an interrupted judging resumes.

Key: SHA-256 of (judge id, prompt version, question, reference, prediction). Only valid verdicts are
stored: failed requests and unparsable replies are retried by the next run. Every operation is one short
autocommit statement on a connection with a long busy timeout, so several processes (Hydra multirun jobs,
shards, the joblib or submitit launchers) can share one file; put it on a local disk rather than NFS.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    question TEXT NOT NULL,
    reference TEXT NOT NULL,
    prediction TEXT NOT NULL,
    correct INTEGER NOT NULL,
    score REAL NOT NULL,
    reply TEXT,
    created REAL NOT NULL
)
"""


def judgment_key(judge_id: str, prompt_version: str, question: str, reference: str, prediction: str) -> str:
    payload = json.dumps([judge_id, prompt_version, question, reference, prediction], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class JudgmentCache:
    """A sqlite file of valid verdicts; safe to share between threads and processes."""

    def __init__(self, path: str | Path, timeout_s: float = 120.0) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        with self._lock:
            self._conn.execute(_SCHEMA)

    def get(self, key: str) -> tuple[bool, float] | None:
        with self._lock:
            row = self._conn.execute("SELECT correct, score FROM judgments WHERE key = ?", (key,)).fetchone()
        return None if row is None else (bool(row[0]), float(row[1]))

    def put(self, key: str, *, judge: str, prompt_version: str, question: str, reference: str,
            prediction: str, correct: bool, score: float, reply: str = "") -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, judge, prompt_version, question, reference, prediction, int(correct), float(score), reply,
                 time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM judgments").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __getstate__(self):  # launchers may pickle a config holding a judge: reopen in the child
        return {"path": self.path}

    def __setstate__(self, state) -> None:
        self.__init__(state["path"])
