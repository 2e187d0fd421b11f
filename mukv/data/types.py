"""What a dataset hands the engine: videos as frame sources, each with its timestamped questions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Question:
    """One question, answered at ``end_time`` (seconds) from what the stream has shown so far."""

    qid: str
    question: str
    answer: str
    start_time: float
    end_time: float
    qtype: str | None = None
    # Free-form extras a dataset can record (needle time, evidence time, choices, ...).
    meta: dict[str, Any] = field(default_factory=dict)


class FrameSource(Protocol):
    """Frames of one video, already sampled at the dataset's ``sample_fps``.

    Frame ``i`` is shown at time ``i / sample_fps`` seconds. Sources decode lazily in chunks so that an
    hour of video is never held in memory at once.
    """

    sample_fps: float

    def __len__(self) -> int:
        """Number of sampled frames in the whole video."""
        ...

    def frames(self, start: int, stop: int) -> np.ndarray:
        """Sampled frames ``start:stop`` as uint8 RGB, shape (n, H, W, 3)."""
        ...


def iter_chunks(source: FrameSource, start: int, stop: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first_index, frames) over ``start:stop`` in chunks of at most ``chunk`` frames."""
    for lo in range(start, min(stop, len(source)), chunk):
        hi = min(lo + chunk, stop, len(source))
        yield lo, source.frames(lo, hi)


def frames_until(source: FrameSource, t: float) -> int:
    """Number of sampled frames shown up to time ``t`` (the published protocol: ``int(t * sample_fps)``)."""
    return min(len(source), int(t * source.sample_fps))


@dataclass
class VideoSample:
    """One video of a dataset with its questions, sorted by ``end_time``."""

    video_id: str
    duration: float
    questions: list[Question]
    source: FrameSource
    meta: dict[str, Any] = field(default_factory=dict)
