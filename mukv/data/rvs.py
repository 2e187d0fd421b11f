"""RVS (Ego / Movie) open-ended annotations -> :class:`VideoSample` list, validated record by record.

File schema: a JSON list, one object per video with ``video_id``, ``video_path``, ``duration`` (seconds) and
``conversations`` (a list of ``{question, answer, start_time, end_time}``; ``start_time`` is optional and
defaults to 0). Movie entries also carry ``clip_start_time`` / ``clip_end_time``, kept in the sample's meta.
Unknown fields are ignored.

Validation rules (each failure is a :class:`DataError` naming file, record and field):

- times and duration are real numbers (not bools, not strings), finite and non-negative; duration > 0;
- ``start_time <= end_time``;
- ``end_time <= duration + end_tolerance_s`` (default 1 s). ``duration`` is measured from the video
  container (e.g. 3599.97 s) while question times are whole seconds, so a question at the last second may
  round past it; in the released files every ``end_time`` is within ``duration``, so the tolerance only
  forgives rounding, never a question set past its video;
- question strings are non-empty; answers are strings;
- ``video_id`` is a non-empty string, unique in the file.

Conversations not sorted by ``end_time`` are stably re-sorted (the protocol answers in ``end_time`` order)
and the sample's ``meta['resorted']`` says so. Question ids are ``f"{video_id}_q{i}"`` with ``i`` the index
in the file's original order.

Every video path is resolved (``..`` and symlinks followed) and must lie inside ``data_root``: a record that
points elsewhere (``../../etc/x.npy``, a symlink out of the root, an absolute path not under the prefix) is a
:class:`DataError` unless ``allow_outside_root=True`` (``dataset.allow_outside_root=true``). A file nested too
deeply for the JSON parser is a :class:`DataError`, not a ``RecursionError``.

Loading never touches the videos: each sample's source is a :class:`LazySource` that opens the file on first
use. ``check_videos=True`` checks up front that every selected video file exists.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mukv.data.types import FrameSource, Question, VideoSample
from mukv.errors import DataError, VideoError
from mukv.video.sources import open_video

RVS_PATH_PREFIX = "/data/rvs"


class LazySource:
    """A :class:`FrameSource` that opens its video on first ``len()`` / ``frames()``.

    Keeps annotation loading free of video I/O, and lets a run over many long videos hold one decoder
    at a time (``close()`` drops the opened source).
    """

    def __init__(
        self, path: str | Path, sample_fps: float, opener: Callable[[Path, float], FrameSource] = open_video
    ) -> None:
        self.path = Path(path)
        self.sample_fps = float(sample_fps)
        self._opener = opener
        self._source: FrameSource | None = None

    @property
    def is_open(self) -> bool:
        return self._source is not None

    def open(self) -> FrameSource:
        """The underlying source, opened now if needed; failures are :class:`VideoError` naming the path."""
        if self._source is None:
            try:
                self._source = self._opener(self.path, self.sample_fps)
            except VideoError:
                raise
            except Exception as e:  # an opener that raises something else still names the file
                raise VideoError(self.path, f"cannot be opened: {e}") from e
        return self._source

    def close(self) -> None:
        self._source = None

    @property
    def duration_s(self) -> float | None:
        """The file's real length in seconds (opens it), None for a source that does not know it."""
        return getattr(self.open(), "duration_s", None)

    def __len__(self) -> int:
        return len(self.open())

    def frames(self, start: int, stop: int) -> np.ndarray:
        return self.open().frames(start, stop)

    def __repr__(self) -> str:
        return f"LazySource({str(self.path)!r}, sample_fps={self.sample_fps}, open={self.is_open})"


def resolve_video_path(video_path: str, data_root: str | Path, prefix: str | None = RVS_PATH_PREFIX) -> Path:
    """Where a record's video lives locally.

    A released absolute path under ``prefix`` maps under ``data_root`` (``/data/rvs/ego/videos/x.mp4`` ->
    ``data_root/ego/videos/x.mp4``); a relative path is taken relative to ``data_root``; any other absolute
    path is used as is.
    """
    p = PurePosixPath(video_path)
    if prefix:
        try:
            return Path(data_root) / p.relative_to(PurePosixPath(prefix))
        except ValueError:
            pass
    if p.is_absolute():
        return Path(video_path)
    return Path(data_root) / video_path


def load_rvs_annotations(
    path: str | Path,
    data_root: str | Path,
    sample_fps: float,
    *,
    video_path_prefix: str | None = RVS_PATH_PREFIX,
    limit_videos: int | None = None,
    video_ids: Sequence[str] | None = None,
    check_videos: bool = False,
    end_tolerance_s: float = 1.0,
    allow_outside_root: bool = False,
) -> list[VideoSample]:
    """Read and validate an RVS annotation file; videos are opened lazily at ``sample_fps``.

    The whole file is validated even when ``video_ids`` / ``limit_videos`` select a subset, so a broken
    file fails the same way whatever the selection. ``video_ids`` keeps the file's order; an unknown id is
    a :class:`DataError`. ``limit_videos`` then keeps the first ``n``.
    """
    path = Path(path)
    data = read_record_list(path, "video records", "an annotation file")

    samples: list[VideoSample] = []
    seen: set[str] = set()
    root = None if allow_outside_root else Path(os.path.realpath(data_root))
    for index, record in enumerate(data):
        sample = _parse_record(path, index, record, data_root, sample_fps, video_path_prefix, end_tolerance_s,
                               root)
        if sample.video_id in seen:
            raise DataError(path, "duplicate video_id", record=sample.video_id, field="video_id")
        seen.add(sample.video_id)
        samples.append(sample)

    if video_ids is not None:
        unknown = [v for v in video_ids if v not in seen]
        if unknown:
            raise DataError(path, f"video_ids not in this file: {_few(unknown)}", field="video_id")
        wanted = set(video_ids)
        samples = [s for s in samples if s.video_id in wanted]
    if limit_videos is not None:
        if limit_videos < 0:
            raise ValueError(f"limit_videos must be >= 0, got {limit_videos}")
        samples = samples[:limit_videos]
    if check_videos:
        missing = [str(s.meta["video_path"]) for s in samples if not Path(s.meta["video_path"]).is_file()]
        if missing:
            raise VideoError(
                missing[0],
                f"{len(missing)} of {len(samples)} videos of {path} not found under "
                f"data root {data_root}: {_few(missing)}",
            )
    return samples


def _parse_record(
    path: Path,
    index: int,
    record: Any,
    data_root: str | Path,
    sample_fps: float,
    prefix: str | None,
    tolerance: float,
    root: Path | None = None,
) -> VideoSample:
    if not isinstance(record, dict):
        raise DataError(path, f"expected an object, got {type(record).__name__}", record=index)
    for key in ("video_id", "video_path", "duration", "conversations"):
        if key not in record:
            raise DataError(path, "missing field", record=record.get("video_id", index), field=key)
    video_id = record["video_id"]
    if not isinstance(video_id, str) or not video_id.strip():
        raise DataError(path, f"must be a non-empty string, got {video_id!r}", record=index, field="video_id")
    video_path = record["video_path"]
    if not isinstance(video_path, str) or not video_path.strip():
        raise DataError(
            path, f"must be a non-empty string, got {video_path!r}", record=video_id, field="video_path"
        )
    duration = _number(path, video_id, "duration", record["duration"])
    if duration <= 0:
        raise DataError(path, f"must be positive, got {duration}", record=video_id, field="duration")
    convs = record["conversations"]
    if not isinstance(convs, list) or not convs:
        raise DataError(path, "must be a non-empty list of questions", record=video_id, field="conversations")

    questions = [_parse_question(path, video_id, i, c, duration, tolerance) for i, c in enumerate(convs)]
    ordered = sorted(questions, key=lambda q: q.end_time)  # stable: ties keep file order
    resorted = [q.qid for q in ordered] != [q.qid for q in questions]
    local_path = resolve_video_path(video_path, data_root, prefix)
    if root is not None:
        confine_to_root(path, video_path, local_path, root, record=video_id, field="video_path")
    meta: dict[str, Any] = {
        "video_path": str(local_path),
        "annotation_video_path": video_path,
        "annotation_file": str(path),
        "record_index": index,
        "resorted": resorted,
    }
    for key in ("clip_start_time", "clip_end_time"):
        if key in record:
            meta[key] = _number(path, video_id, key, record[key])
    return VideoSample(
        video_id=video_id,
        duration=duration,
        questions=ordered,
        source=LazySource(local_path, sample_fps),
        meta=meta,
    )


def _parse_question(
    path: Path, video_id: str, i: int, conv: Any, duration: float, tolerance: float
) -> Question:
    where = f"conversations[{i}]"
    if not isinstance(conv, dict):
        raise DataError(path, f"expected an object, got {type(conv).__name__}", record=video_id, field=where)
    for key in ("question", "answer", "end_time"):
        if key not in conv:
            raise DataError(path, "missing field", record=video_id, field=f"{where}.{key}")
    question, answer = conv["question"], conv["answer"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(
            path, f"must be a non-empty string, got {question!r}", record=video_id, field=f"{where}.question"
        )
    if not isinstance(answer, str):
        raise DataError(
            path, f"must be a string, got {type(answer).__name__}", record=video_id, field=f"{where}.answer"
        )
    start = _number(path, video_id, f"{where}.start_time", conv.get("start_time", 0))
    end = _number(path, video_id, f"{where}.end_time", conv["end_time"])
    if start > end:
        raise DataError(
            path, f"start_time {start} is after end_time {end}", record=video_id, field=f"{where}.start_time"
        )
    if end > duration + tolerance:
        raise DataError(
            path,
            f"end_time {end} is past the video duration {duration} (tolerance {tolerance} s)",
            record=video_id,
            field=f"{where}.end_time",
        )
    return Question(
        qid=f"{video_id}_q{i}", question=question, answer=answer, start_time=start, end_time=end, qtype=None
    )


def read_record_list(path: Path, records: str, kind: str) -> list[Any]:
    """An annotation file's top-level JSON list (of ``records``); one :class:`DataError` naming the file for a
    missing file, bad JSON, nesting too deep for the parser (``kind`` names what the file should be) or another
    top-level value."""
    if not path.is_file():
        raise DataError(path, "annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON: {e}") from e
    except RecursionError:  # [[[[...]]]] deeper than the parser's recursion limit
        raise DataError(path, f"JSON nested too deeply to be {kind} (expected a list of {records})") from None
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of {records}, got {type(data).__name__}")
    return data


def confine_to_root(path: Path, video_path: str, local_path: Path, root: Path, *, record: str | int,
                    field: str) -> None:
    """A :class:`DataError` naming ``record`` and ``field`` unless ``local_path`` lies inside ``root`` (the real
    data root) once ``..`` and symlinks are followed."""
    try:
        real = Path(os.path.realpath(local_path))
    except (ValueError, OSError) as e:  # an embedded NUL byte, a symlink loop
        raise DataError(path, f"{video_path!r} is not a usable path: {e}", record=record, field=field) from None
    if not real.is_relative_to(root):
        raise DataError(path, f"{video_path!r} resolves to {real}, outside the data root {root} "
                              "(dataset.allow_outside_root=true reads it anyway)", record=record, field=field)


def _number(path: Path, video_id: str | int, field: str, value: Any) -> float:
    """A finite, non-negative real number; rejects bools and numeric strings rather than guessing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(path, f"must be a number, got {value!r}", record=video_id, field=field)
    x = float(value)
    if not math.isfinite(x):
        raise DataError(path, f"must be finite, got {value!r}", record=video_id, field=field)
    if x < 0:
        raise DataError(path, f"must not be negative, got {value!r}", record=video_id, field=field)
    return x


def _few(items: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(items[:k])
    return shown + (f" ... and {len(items) - k} more" if len(items) > k else "")
