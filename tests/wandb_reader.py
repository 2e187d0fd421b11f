"""Reads an offline W&B run file (``run-*.wandb``) back, so tests can check what was logged.

The file is W&B's 7-byte header (``:W&B``, magic, version) followed by a LevelDB-style log of 32 KiB
blocks, each record a 7-byte header (crc32, little-endian length, type) and a protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            chunk = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        else:
            chunk, pending = pending + payload, b""
        rec = pb.Record()
        rec.ParseFromString(chunk)
        yield rec


def summary_and_config(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(summary, config, names of logged history keys) of the offline run in ``run_dir``."""
    (path,) = sorted(run_dir.glob("run-*.wandb"))
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    history: list[str] = []
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in rec.summary.update})
        elif kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
        elif kind == "history":
            history.extend(i.key for i in rec.history.item)
    return summary, config, history
