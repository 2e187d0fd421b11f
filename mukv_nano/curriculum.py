"""The curriculum: what each training step's streams look like along the schedule.

The schedule runs on *progress* = max(step / train.steps, elapsed / train.max_minutes), so a time budget
always ends it cleanly. Along it: 2-4 frame streams first, then the maximum length ramps up (and most
streams stay at ``mid_frames`` after the ramp); the distractor density ramps up; the needle colour alone
first, then count and current, then all five types; only the ``full`` layout at first, then the mixture.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from mukv.data.synthetic import QUESTION_TYPES


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * min(1.0, max(0.0, t))


@dataclass
class Curriculum:
    """Stream length, density, question types and layouts as fractions of the schedule."""

    min_frames: int = 2
    max_frames: int = 32
    short_phase: float = 0.1  # 2-4 frame streams until this progress
    ramp_end: float = 0.45  # max length and distractor density reach their final values here
    mid_frames: int = 16  # > 0: after the ramp, streams are <= mid_frames long except a long_share of steps
    long_share: float = 0.3
    empty_until: float = 0.05  # no distractor objects until this progress
    full_only_until: float = 0.12  # only the full layout until this progress, then layout_weights
    layout_weights: dict[str, float] = field(default_factory=lambda: {
        "full": 0.4, "uniform": 0.1, "window": 0.1, "rekv": 0.2, "mukv": 0.2})
    detail_only_until: float = 0.15  # only the needle-colour question until this progress
    all_types_from: float = 0.3  # detail, count and current until this progress, then all five types
    detail_share: float = 0.1  # once all types are in, this share of steps still asks the needle colour only
    # streams of mixed types: once all types are in, this share of the training streams carries a random subset
    # of the question types (each type kept with probability 1/2, at least one), so that no type's evidence
    # (needles, balls, rings) is always on screen. With every type on every stream, count over-counted on
    # streams without needles or balls (12% on count-only streams); 0: every stream carries every type
    subset_share: float = 0.25
    sample_fps: float = 0.5
    questions_per_stream: int = 12  # > 0: this many questions per training stream (cycling types), else one per type

    def step_types(self, progress: float,
                   rng: random.Random | None = None) -> tuple[tuple[str, ...], int | None]:
        """Question types (and ring count) of this step: the needle colour alone first (one needle, no rings:
        the vision tower and the content-addressed attention must form before anything else can be learned),
        then count and current, then all five types."""
        if progress < self.detail_only_until:
            return ("detail",), 0
        if progress < self.all_types_from:
            return ("detail", "count", "current"), None
        if rng is not None and rng.random() < self.detail_share:
            return ("detail",), None
        return QUESTION_TYPES, None

    def stream_types(self, types: tuple[str, ...], rng: random.Random) -> tuple[str, ...]:
        """The types one training stream carries: the step's, or (a ``subset_share`` of the streams of all-type
        steps) a random non-empty subset of them, in their order."""
        if types != QUESTION_TYPES or self.subset_share <= 0 or rng.random() >= self.subset_share:
            return types
        while True:
            kept = tuple(t for t in types if rng.random() < 0.5)
            if kept:
                return kept

    def sample_step(self, progress: float, rng: random.Random) -> tuple[int, float, str]:
        """(frames, mean gap seconds, layout) for this step's batch."""
        if progress < self.short_phase:
            n = rng.randint(self.min_frames, min(4, self.max_frames))
        else:
            t = (progress - self.short_phase) / max(1e-9, self.ramp_end - self.short_phase)
            hi = int(round(_lerp(4, self.max_frames, t)))
            if self.mid_frames and hi > self.mid_frames:
                hi = hi if rng.random() < self.long_share else self.mid_frames
            n = rng.randint(self.min_frames, max(self.min_frames, hi))
        # no distractors at first, then their density ramps up to the benchmark's (a 4 s mean gap)
        gap = 1e6 if progress < self.empty_until else math.exp(
            _lerp(math.log(60.0), math.log(4.0), (progress - self.empty_until) / (self.ramp_end - self.empty_until)))
        if progress < self.full_only_until:
            layout = "full"
        else:
            names, w = zip(*self.layout_weights.items(), strict=True)
            layout = rng.choices(names, weights=w)[0]
        return n, gap, layout
