"""A procedurally generated streaming-QA dataset with exact answers, rendered on the fly.

Why: RVS videos are licensed and absent here, and RVS answers are free text judged by an LLM. A synthetic
stream whose answers follow from its scene description lets every part of the pipeline be checked end to
end, deterministically, with exact-match scoring, and lets a test control how old the evidence is.

The world: a slowly drifting dark background tint, a 4x4 grid of cells, and in each cell a timeline of
objects (a circle, square or triangle in a colour) that appear, stay a few seconds and leave, always
separated by at least one empty frame so that every appearance is a distinct, countable event. Rare
"event" shapes are drawn the same way, in a cell that is empty then (so the frames that carry them are
statistically like the others: same background, same noise, one more object at most):

- needles (``star``, ``cross``, ``diamond``): each shown at most once per video, in one frame (a patch-scale
  detail: one cell = one visual token of the 16 per frame at 112 px);
- ``ring``: shown a few times per video (0-4 in the whole stream), one frame each: the counting target;
- ``ball``: one run per video that crosses a whole row or column in 4 consecutive frames (a segment-scale
  event: no single frame tells its direction).

Ordinary objects also last a single frame often (geometric lengths), so a one-frame appearance is no cue.

Question types (answers are single words):

- ``detail``: "What colour was the star?" -- the needle, shown before the question; ``start_time`` is the
  needle's time. One needle per needle shape; with ``needle_depth`` set, the needle sits at that fraction of
  the frames shown (0 = the first frame, 1 = the last), recorded in ``meta['needle_depth']``.
- ``count``: "How many rings have appeared so far?" -- the number of ring appearances among the frames shown
  (0-4). ``start_time`` is the first counted ring (the question time if none).
- ``current``: "What shape is at row r column c now?" -- the object in that cell in the last frame shown
  (frame ``frames_until(end_time) - 1``); ``start_time`` is that frame's time.
- ``order``: "Which came first, the star or the cross?" -- two needles shown before the question (temporal
  order); ``start_time`` is the earlier one.
- ``motion``: "Which way did the ball move?" -- ``left``/``right``/``up``/``down`` over the ball's 4-frame
  run (what happened in a stretch); ``start_time`` is the run's first frame.

Chance levels: detail 1/6 (colours), count 1/5, current 1/3, order 1/2, motion 1/4.

Multiple choice (``choices=N``, ``dataset.synthetic.choices``): the same streams and questions, each asked
with up to N lettered options (the right answer and others of its type, ``ANSWER_SETS``; an order question
has its two needles) in OVO-Bench's prompt layout (``mukv.data.choice``); the reference is the right letter,
scored by ``judge=choice``. Chance is then 1 / (the options listed).

Seeds: evaluation datasets (``split='eval'``) use ``seed < TRAIN_SEED_BASE``; training streams
(``split='train'``) use ``seed >= TRAIN_SEED_BASE``. ``SyntheticSpec`` enforces the ranges, so held-out
streams are never trained on.

For every question ``meta['age_s'] = end_time - start_time``: how far back the oldest needed evidence lies,
and ``meta['evidence_time'] = start_time``. Detail, current and motion questions also name the exact
``meta['evidence_cells']`` (``[frame, cell]`` pairs on the ``meta['grid']`` x grid raster, cell = row * grid +
column) the answer needs: the needle, the asked cell in the last frame, the ball's run. The engine reports
how much of it a method's recalled context holds (``evidence_recalled``).
Frames are indexed at the dataset's ``sample_fps`` (frame ``i`` shown at ``i / sample_fps``), the same rate
the engine samples at, so answers are exact for exactly the frames the model sees.

Extension points: new shapes go in ``_SHAPE_MASKS``; new question types register in ``QUESTION_BUILDERS``;
new scene content goes in :class:`Scene` (its ``occupancy`` lookup is what rendering and questions share).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mukv.data.choice import LETTERS, choice_prompt
from mukv.data.types import Question, VideoSample
from mukv.errors import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 50, 230),
    "orange": (250, 140, 30),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
OBJECT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NEEDLE_SHAPES: tuple[str, ...] = ("star", "cross", "diamond")
COUNT_SHAPE = "ring"
MOTION_SHAPE = "ball"
SHAPES: tuple[str, ...] = OBJECT_SHAPES + NEEDLE_SHAPES + (COUNT_SHAPE, MOTION_SHAPE)
QUESTION_TYPES: tuple[str, ...] = ("detail", "count", "current", "order", "motion")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MAX_RINGS = 4
MOTION_FRAMES = 4  # a ball run crosses the whole row / column, one cell per frame
# Chance accuracy of a uniform guess among the possible answers, per question type.
CHANCE: dict[str, float] = {"detail": 1 / 6, "count": 1 / 5, "current": 1 / 3, "order": 1 / 2, "motion": 1 / 4}
# What each type measures, reported apart (never folded into one number): memory (the evidence is old: a
# method must have kept it), recency (the last frame: every window holds it by construction) and cross-frame
# reasoning (computed inside the encoding: methods that encode blocks independently cannot see across them).
QUESTION_CATEGORIES: dict[str, tuple[str, ...]] = {"memory": ("detail", "count"), "recency": ("current",),
                                                   "cross_frame": ("order", "motion")}
# Held-out evaluation seeds are < TRAIN_SEED_BASE; training streams use seeds >= TRAIN_SEED_BASE.
TRAIN_SEED_BASE = 1_000_000
GRID = 4
# Background channels stay within [30, 90]; every colour above has a channel >= 200: objects never blend in.
_BG_GREY = (45.0, 75.0)
_BG_TINT = 8.0
_BG_DRIFT = 15.0


@dataclass
class SyntheticSpec:
    """What to generate. ``duration_s * sample_fps`` frames per video (at least 2)."""

    num_videos: int = 4
    duration_s: float = 60.0
    sample_fps: float = 1.0
    frame_size: int = 112
    questions_per_video: int = 6
    seed: int = 0
    question_types: tuple[str, ...] = QUESTION_TYPES
    mean_object_s: float = 4.0  # mean time an object stays in its cell
    mean_gap_s: float = 4.0  # mean time a cell stays empty between two objects
    noise: int = 6  # per-pixel noise, uniform in [-noise, noise]
    needle_depth: float | None = None  # detail needles at this fraction of the frames shown (None: random)
    question_times: str = "spread"  # spread: random in the last 90% of the stream | end: all at the end
    rings: int | None = None  # ring appearances in the whole stream (None: random 0..MAX_RINGS)
    split: str = "eval"  # eval: seed < TRAIN_SEED_BASE | train: seed >= TRAIN_SEED_BASE
    choices: int = 0  # 0: one-word answers | N >= 2: multiple choice, up to N lettered options per question

    def __post_init__(self) -> None:
        self.question_types = tuple(self.question_types)
        if self.split not in ("eval", "train"):
            raise ConfigError("split", f"must be 'eval' or 'train', got {self.split!r}")
        if self.split == "eval" and not 0 <= self.seed < TRAIN_SEED_BASE:
            raise ConfigError("seed", f"evaluation seeds are in [0, {TRAIN_SEED_BASE}) (training uses the rest), "
                                      f"got {self.seed}")
        if self.split == "train" and self.seed < TRAIN_SEED_BASE:
            raise ConfigError("seed", f"training seeds are >= {TRAIN_SEED_BASE} (below are held out), got {self.seed}")
        if self.needle_depth is not None and not 0.0 <= self.needle_depth <= 1.0:
            raise ConfigError("needle_depth", f"must be in [0, 1], got {self.needle_depth}")
        if self.question_times not in ("spread", "end"):
            raise ConfigError("question_times", f"must be 'spread' or 'end', got {self.question_times!r}")
        if self.rings is not None and not 0 <= self.rings <= MAX_RINGS:
            raise ConfigError("rings", f"must be in [0, {MAX_RINGS}], got {self.rings}")
        if self.num_videos < 0:
            raise ConfigError("num_videos", f"must be >= 0, got {self.num_videos}")
        if not (self.duration_s > 0 and self.sample_fps > 0):
            raise ConfigError(
                "duration_s",
                f"duration_s and sample_fps must be positive, got {self.duration_s} and {self.sample_fps}",
            )
        if self.num_frames < 2:
            raise ConfigError(
                "duration_s", f"duration_s * sample_fps must give at least 2 frames, got {self.num_frames}"
            )
        if self.frame_size < GRID * 8:
            raise ConfigError("frame_size", f"must be at least {GRID * 8} pixels, got {self.frame_size}")
        if self.questions_per_video < 0:
            raise ConfigError("questions_per_video", f"must be >= 0, got {self.questions_per_video}")
        unknown = [t for t in self.question_types if t not in QUESTION_BUILDERS]
        if unknown or not self.question_types:
            raise ConfigError(
                "question_types",
                f"unknown or empty {list(self.question_types)}; known: {sorted(QUESTION_BUILDERS)}",
            )
        if not 0 <= self.noise <= 50:
            raise ConfigError("noise", f"must be in [0, 50], got {self.noise}")
        if self.choices != 0 and not 2 <= self.choices <= len(LETTERS):
            raise ConfigError("choices", f"must be 0 (one-word answers) or 2 to {len(LETTERS)} options, got {self.choices}")

    @property
    def num_frames(self) -> int:
        return int(self.duration_s * self.sample_fps)


@dataclass(frozen=True)
class Instance:
    """One appearance: ``shape`` in ``colour`` in grid ``cell`` (row-major) over frames ``[start, stop)``."""

    cell: int
    shape: str
    colour: str
    start: int
    stop: int

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID


@dataclass(frozen=True)
class Scene:
    """Everything needed to render any frame of one stream: pure data, so rendering is a pure function."""

    seed: int
    num_frames: int
    frame_size: int
    instances: tuple[Instance, ...]
    bg_base: tuple[float, float, float]
    bg_drift: tuple[float, float, float]
    bg_phase: tuple[float, float, float]
    bg_period: float  # frames per full drift cycle
    noise: int

    @cached_property
    def occupancy(self) -> np.ndarray:
        """(num_frames, GRID*GRID) index into ``instances`` of what each cell shows, -1 when empty."""
        occ = np.full((self.num_frames, GRID * GRID), -1, dtype=np.int32)
        for k, inst in enumerate(self.instances):
            seg = occ[inst.start : inst.stop, inst.cell]
            if (seg >= 0).any():
                raise ValueError(f"scene {self.seed}: instance {inst} overlaps another in its cell")
            seg[:] = k
        return occ

    def at(self, frame: int, cell: int) -> Instance | None:
        k = int(self.occupancy[frame, cell])
        return None if k < 0 else self.instances[k]

    def background(self, frame: int) -> np.ndarray:
        """Background RGB (floats) of a frame: a slow sinusoidal drift around a dark grey tint."""
        angle = 2 * np.pi * frame / self.bg_period + np.asarray(self.bg_phase)
        return np.asarray(self.bg_base) + np.asarray(self.bg_drift) * np.sin(angle)


def cell_size(frame_size: int) -> int:
    return frame_size // GRID


def cell_center(cell: int, frame_size: int) -> tuple[int, int]:
    """(y, x) pixel at the centre of a cell: inside every shape's mask except the (hollow) ring's."""
    c = cell_size(frame_size)
    return (cell // GRID) * c + c // 2, (cell % GRID) * c + c // 2


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r, theta = np.hypot(x, y), np.arctan2(y, x)
    return r <= 0.3 + 0.5 * ((1 + np.cos(5 * (theta + np.pi / 2))) / 2) ** 2


_SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda x, y: x * x + y * y <= 0.75**2,
    "square": lambda x, y: (np.abs(x) <= 0.65) & (np.abs(y) <= 0.65),
    "triangle": lambda x, y: (y <= 0.65) & (np.abs(x) <= 0.8 * (y + 0.75) / 1.4),
    "star": _star,
    "cross": lambda x, y: (
        ((np.abs(x) <= 0.22) & (np.abs(y) <= 0.8)) | ((np.abs(y) <= 0.22) & (np.abs(x) <= 0.8))
    ),
    "diamond": lambda x, y: np.abs(x) + np.abs(y) <= 0.8,
    "ring": lambda x, y: (x * x + y * y <= 0.8**2) & (x * x + y * y >= 0.45**2),
    "ball": lambda x, y: x * x + y * y <= 0.38**2,
}


@lru_cache(maxsize=64)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape drawn in a cell of ``size`` pixels (cached, read-only)."""
    u = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(u, u, indexing="ij")
    mask = _SHAPE_MASKS[shape](x, y)
    mask.setflags(write=False)
    return mask


def render_frame(scene: Scene, i: int) -> np.ndarray:
    """Frame ``i`` of a scene as uint8 RGB (S, S, 3); a pure function of (scene, i), noise included."""
    if not 0 <= i < scene.num_frames:
        raise IndexError(f"frame {i} outside scene of {scene.num_frames} frames")
    s, c = scene.frame_size, cell_size(scene.frame_size)
    frame = np.empty((s, s, 3), dtype=np.int16)
    frame[:] = np.round(scene.background(i)).astype(np.int16)
    for cell, k in enumerate(scene.occupancy[i]):
        if k < 0:
            continue
        inst = scene.instances[k]
        r, q = divmod(cell, GRID)
        frame[r * c : (r + 1) * c, q * c : (q + 1) * c][shape_mask(inst.shape, c)] = COLOURS[inst.colour]
    if scene.noise:
        rng = np.random.default_rng([scene.seed, i])
        frame += rng.integers(-scene.noise, scene.noise + 1, size=frame.shape, dtype=np.int16)
    return np.clip(frame, 0, 255).astype(np.uint8)


class SyntheticVideoSource:
    """A :class:`FrameSource` rendering scene frames on demand (never the whole stream).

    Scene frame ``i`` is shown at ``i / sample_fps``; the dataset's answers are exact at the rate it was
    generated with (``make_synthetic_dataset`` passes it).
    """

    def __init__(self, scene: Scene, sample_fps: float) -> None:
        self.scene = scene
        self.sample_fps = float(sample_fps)

    def __len__(self) -> int:
        return self.scene.num_frames

    def frames(self, start: int, stop: int) -> np.ndarray:
        if start < 0 or stop < 0:
            raise IndexError(f"frame range {start}:{stop} has a negative bound")
        idx = range(start, min(stop, len(self)))
        if len(idx) == 0:
            s = self.scene.frame_size
            return np.empty((0, s, s, 3), dtype=np.uint8)
        return np.stack([render_frame(self.scene, i) for i in idx])

    def __repr__(self) -> str:
        return (
            f"SyntheticVideoSource(seed={self.scene.seed}, frames={len(self)}, sample_fps={self.sample_fps})"
        )


# ----------------------------------------------------------------------------------------------- generation


def video_seed(seed: int, index: int) -> int:
    """Seed of video ``index`` of a dataset: independent streams, stable under changing ``num_videos``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def video_id(spec: SyntheticSpec, index: int) -> str:
    return f"syn-s{spec.seed}-v{index:04d}"


def _object_timeline(rng: np.random.Generator, spec: SyntheticSpec) -> list[Instance]:
    """Per cell: gap, object, gap, object, ... with geometric lengths; gaps >= 1 frame between objects."""
    n = spec.num_frames
    p_obj = 1.0 / max(1.0, spec.mean_object_s * spec.sample_fps)
    p_gap = 1.0 / max(1.0, spec.mean_gap_s * spec.sample_fps)
    out: list[Instance] = []
    for cell in range(GRID * GRID):
        t = int(rng.geometric(p_gap)) - 1  # the first gap may be empty: a cell can start occupied
        while t < n:
            length = int(rng.geometric(p_obj))
            shape = OBJECT_SHAPES[int(rng.integers(len(OBJECT_SHAPES)))]
            colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            out.append(Instance(cell, shape, colour, t, min(t + length, n)))
            t += length + int(rng.geometric(p_gap))
    return out


@dataclass
class _Builder:
    """Mutable state while one video's questions are planned (needles are added to the scene as they go)."""

    spec: SyntheticSpec
    rng: np.random.Generator
    instances: list[Instance]
    occupancy: np.ndarray  # (num_frames, cells) int32, kept in sync with ``instances``
    video_id: str
    asked: set[str] = field(default_factory=set)  # needle shapes / events a question already asked about

    def add(self, inst: Instance) -> None:
        self.occupancy[inst.start : inst.stop, inst.cell] = len(self.instances)
        self.instances.append(inst)

    def time(self, frame: int) -> float:
        return frame / self.spec.sample_fps


def _question(
    b: _Builder, k: int, text: str, answer: str, qtype: str, start: float, end: float, **meta: Any
) -> Question:
    meta.update(evidence_time=start, age_s=end - start)
    if "evidence_cells" in meta:
        meta["grid"] = GRID
    return Question(
        qid=f"{b.video_id}_q{k}",
        question=text,
        answer=answer,
        start_time=start,
        end_time=end,
        qtype=qtype,
        meta=meta,
    )


def _free_slot(b: _Builder, n: int, frame: int | None = None, exclude: set[int] = frozenset()) -> tuple[int, int] | None:
    """A (frame, cell) empty in the scene among frames ``< n``: at a random frame, or in the frame nearest
    ``frame`` that has an empty cell; frames in ``exclude`` are skipped. None when there is none."""
    free = b.occupancy[:n] < 0
    if exclude:
        free[sorted(f for f in exclude if f < n)] = False
    rows = np.flatnonzero(free.any(axis=1))
    if len(rows) == 0:
        return None
    f = int(rows[int(b.rng.integers(len(rows)))]) if frame is None else int(rows[np.abs(rows - frame).argmin()])
    cells = np.flatnonzero(free[f])
    return f, int(cells[int(b.rng.integers(len(cells)))])


def _place_needle(b: _Builder, n: int, shape: str, frame: int | None = None,
                  exclude: set[int] = frozenset()) -> Instance | None:
    slot = _free_slot(b, n, frame, exclude)
    if slot is None:
        return None
    inst = Instance(slot[1], shape, COLOUR_NAMES[int(b.rng.integers(len(COLOUR_NAMES)))], slot[0], slot[0] + 1)
    b.add(inst)
    return inst


def _needles(b: _Builder) -> dict[str, Instance]:
    return {i.shape: i for i in b.instances if i.shape in NEEDLE_SHAPES}


def _detail(b: _Builder, k: int, n: int, end: float) -> Question | None:
    placed = _needles(b)
    free_shapes = [s for s in NEEDLE_SHAPES if s not in placed]
    if free_shapes:
        shape = free_shapes[int(b.rng.integers(len(free_shapes)))]
        target = None if b.spec.needle_depth is None else int(round(b.spec.needle_depth * (n - 1)))
        inst = _place_needle(b, n, shape, target)
    else:  # every needle shape is placed: ask about one shown already that no detail question asked about
        shown = [i for s, i in placed.items() if i.start < n and s not in b.asked]
        inst = shown[int(b.rng.integers(len(shown)))] if shown else None
    if inst is None:
        return None
    b.asked.add(inst.shape)
    return _question(
        b, k, f"What colour was the {inst.shape}?", inst.colour, "detail", b.time(inst.start), end,
        needle_frame=inst.start, needle_cell=inst.cell, needle_shape=inst.shape, evidence_cells=[[inst.start, inst.cell]],
        needle_depth=inst.start / max(1, n - 1), scale="patch",
    )


def _count(b: _Builder, k: int, n: int, end: float) -> Question | None:
    starts = sorted(i.start for i in b.instances if i.shape == COUNT_SHAPE and i.start < n)
    start = b.time(starts[0]) if starts else end
    return _question(
        b, k, f"How many {COUNT_SHAPE}s have appeared so far?", str(len(starts)), "count", start, end,
        count=len(starts), evidence_frames=starts, shape=COUNT_SHAPE, scale="stream",
    )


def _current(b: _Builder, k: int, n: int, end: float) -> Question | None:
    last = n - 1
    cells = [
        c
        for c in range(GRID * GRID)
        if b.occupancy[last, c] >= 0 and b.instances[b.occupancy[last, c]].shape in OBJECT_SHAPES
    ]
    if not cells:
        return None
    cell = cells[int(b.rng.integers(len(cells)))]
    inst = b.instances[b.occupancy[last, cell]]
    text = f"What shape is at row {cell // GRID + 1} column {cell % GRID + 1} now?"
    return _question(
        b, k, text, inst.shape, "current", b.time(last), end,
        cell=cell, frame=last, colour=inst.colour, object_since=b.time(inst.start), scale="frame",
        evidence_cells=[[last, cell]],
    )


def _order(b: _Builder, k: int, n: int, end: float) -> Question | None:
    """Two needles shown before the question (placing new ones while needle shapes are free)."""
    shown = [i for i in _needles(b).values() if i.start < n]
    free_shapes = [s for s in NEEDLE_SHAPES if s not in _needles(b)]
    order = b.rng.permutation(len(free_shapes))
    for j in order:
        if len(shown) >= 2:
            break
        inst = _place_needle(b, n, free_shapes[j], exclude={i.start for i in shown})
        if inst is not None:
            shown.append(inst)
    pairs = [(x, y) for x in shown for y in shown if x.start < y.start]
    if not pairs:
        return None
    first, second = pairs[int(b.rng.integers(len(pairs)))]
    named = (first, second) if b.rng.random() < 0.5 else (second, first)
    return _question(
        b, k, f"Which came first, the {named[0].shape} or the {named[1].shape}?", first.shape, "order",
        b.time(first.start), end, first_frame=first.start, second_frame=second.start,
        second_shape=second.shape, scale="stream",
    )


_STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def _ball_cells(direction: str, line: int) -> list[int]:
    """Cells a ball run visits, in order: a whole row (left/right) or column (up/down)."""
    dr, dc = _STEPS[direction]
    idx = range(GRID) if dr + dc > 0 else range(GRID - 1, -1, -1)
    return [line * GRID + j if dr == 0 else j * GRID + line for j in idx]


def _motion(b: _Builder, k: int, n: int, end: float) -> Question | None:
    runs = [i for i in b.instances if i.shape == MOTION_SHAPE]
    if runs:  # one ball run per video: ask only once it has finished
        if runs[-1].start >= n or "motion" in b.asked:
            return None
        start, cells = runs[0].start, [i.cell for i in runs]
        direction = next(d for d in DIRECTIONS if _ball_cells(d, _line(d, cells[0])) == cells)
    else:
        if n < MOTION_FRAMES:
            return None
        colour = COLOUR_NAMES[int(b.rng.integers(len(COLOUR_NAMES)))]
        for _ in range(400):
            start = int(b.rng.integers(0, n - MOTION_FRAMES + 1))
            direction = DIRECTIONS[int(b.rng.integers(len(DIRECTIONS)))]
            cells = _ball_cells(direction, int(b.rng.integers(GRID)))
            if all(b.occupancy[start + j, c] < 0 for j, c in enumerate(cells)):
                break
        else:
            return None
        for j, c in enumerate(cells):
            b.add(Instance(c, MOTION_SHAPE, colour, start + j, start + j + 1))
    b.asked.add("motion")
    return _question(
        b, k, f"Which way did the {MOTION_SHAPE} move?", direction, "motion", b.time(start), end,
        run_frames=[start + j for j in range(MOTION_FRAMES)], run_cells=cells, scale="segment",
        evidence_cells=[[start + j, c] for j, c in enumerate(cells)],
    )


def _line(direction: str, cell: int) -> int:
    return cell // GRID if direction in ("left", "right") else cell % GRID


QUESTION_BUILDERS: dict[str, Callable[[_Builder, int, int, float], Question | None]] = {
    "detail": _detail,
    "count": _count,
    "current": _current,
    "order": _order,
    "motion": _motion,
}


def make_video(spec: SyntheticSpec, index: int) -> VideoSample:
    """Video ``index`` of the dataset ``spec`` describes: scene, questions (sorted by time), lazy source."""
    seed = video_seed(spec.seed, index)
    rng = np.random.default_rng(seed)
    n_frames, fps = spec.num_frames, spec.sample_fps
    bg_base = float(rng.uniform(*_BG_GREY)) + rng.uniform(-_BG_TINT, _BG_TINT, 3)
    bg_drift = rng.uniform(0.3 * _BG_DRIFT, _BG_DRIFT, 3)
    bg_phase = rng.uniform(0, 2 * np.pi, 3)
    bg_period = float(rng.uniform(60.0, 180.0)) * fps
    objects = _object_timeline(rng, spec)
    vid = video_id(spec, index)
    b = _Builder(spec, rng, [], np.full((n_frames, GRID * GRID), -1, dtype=np.int32), vid)
    for inst in objects:
        b.add(inst)
    # Rings (the counting target) are placed before any question, in distinct frames, so that every
    # count question sees the same scene whatever is added for later questions.
    rings = spec.rings if spec.rings is not None else int(rng.integers(0, MAX_RINGS + 1))
    ring_frames: set[int] = set()
    for _ in range(rings):
        inst = _place_needle(b, n_frames, COUNT_SHAPE, exclude=ring_frames)
        if inst is not None:
            ring_frames.add(inst.start)

    # Question times: frames-shown counts in the last 90% of the stream (or all at the end), mapped to times
    # and back through the engine's own rule (frames_until = int(t * fps)) so the answers match what the
    # model is shown.
    q = spec.questions_per_video
    if spec.question_times == "end":
        shown = np.full(q, n_frames)
    else:
        lo = min(n_frames, max(2, math.ceil(0.1 * n_frames)))
        choices = np.arange(lo, n_frames + 1)
        shown = np.sort(rng.choice(choices, size=q, replace=q > len(choices)))
    # Types cycle through a per-video shuffle of the spec's types: fewer questions than types still draw
    # every type equally often over a dataset.
    order = [spec.question_types[j] for j in rng.permutation(len(spec.question_types))]
    types = [order[j % len(order)] for j in range(q)]
    questions: list[Question] = []
    for k, (qtype, m) in enumerate(zip(types, shown, strict=True)):
        end = float(m) / fps
        n = min(n_frames, int(end * fps))  # exactly frames_until(source, end); >= 1 since m >= 2
        # A type that cannot apply here (needle shapes used up, no occupied cell) falls back to the spec's
        # other types, then to "count", which always applies.
        for t in dict.fromkeys((qtype, *spec.question_types, "count")):
            question = QUESTION_BUILDERS[t](b, k, n, end)
            if question is not None:
                questions.append(question)
                break
        else:  # pragma: no cover - "count" always succeeds
            raise RuntimeError("no question type applies")

    if spec.choices:
        questions = [as_choice(q, spec.choices, np.random.default_rng([seed, _CHOICE_STREAM, k]))
                     for k, q in enumerate(questions)]
    scene = Scene(
        seed=seed,
        num_frames=n_frames,
        frame_size=spec.frame_size,
        instances=tuple(b.instances),
        bg_base=tuple(float(v) for v in bg_base),
        bg_drift=tuple(float(v) for v in bg_drift),
        bg_phase=tuple(float(v) for v in bg_phase),
        bg_period=bg_period,
        noise=spec.noise,
    )
    return VideoSample(
        video_id=vid,
        duration=n_frames / fps,
        questions=questions,
        source=SyntheticVideoSource(scene, fps),
        meta={"synthetic": True, "scene_seed": seed, "num_frames": n_frames, "split": spec.split},
    )


# The answers a question of each type chooses among (order: the two needles its question names)
ANSWER_SETS: dict[str, tuple[str, ...]] = {"detail": COLOUR_NAMES, "count": tuple(str(i) for i in range(MAX_RINGS + 1)),
                                          "current": OBJECT_SHAPES, "motion": DIRECTIONS}
_CHOICE_STREAM = 7  # the options' random stream: apart from the scene's, so a stream is the same in either mode


def as_choice(q: Question, choices: int, rng: np.random.Generator) -> Question:
    """``q`` as multiple choice (``dataset.synthetic.choices``): the right answer and up to ``choices - 1``
    other answers of its type (an order question: the two needles it names), in random order, lettered in the
    question (``mukv.data.choice.choice_prompt``, OVO-Bench's layout); the reference is the right letter, the
    one-word answer stays in ``meta['answer_text']`` and the options in ``meta['options']``."""
    pool = ANSWER_SETS.get(q.qtype or "") or (q.answer, q.meta["second_shape"])
    others = [a for a in pool if a != q.answer]
    picked = [q.answer, *(others[i] for i in rng.permutation(len(others))[: choices - 1])]
    options = [picked[i] for i in rng.permutation(len(picked))]
    return replace(q, question=choice_prompt(q.question, options), answer=LETTERS[options.index(q.answer)],
                   meta={**q.meta, "options": options, "answer_text": q.answer})


def make_synthetic_dataset(spec: SyntheticSpec) -> list[VideoSample]:
    """All videos of ``spec``; cheap (scenes only), frames are rendered when the engine asks for them."""
    return [make_video(spec, i) for i in range(spec.num_videos)]


# --------------------------------------------------------------------------------------------------- export


def _chunks(sample: VideoSample, repeat: int, chunk: int = 64) -> Iterator[np.ndarray]:
    src = sample.source
    for lo in range(0, len(src), chunk):
        frames = src.frames(lo, lo + chunk)
        yield np.repeat(frames, repeat, axis=0) if repeat > 1 else frames


def _mp4_repeat(fps: float) -> tuple[int, int]:
    """(repeat, file_fps): the smallest integer file rate that the published mp4 sampling
    (``step = int(round(file_fps) / sample_fps)``) maps back onto exactly our frames."""
    for repeat in range(1, 1001):
        file_fps = round(fps * repeat)
        if file_fps >= 1 and abs(file_fps - fps * repeat) < 1e-6 and max(1, int(file_fps / fps)) == repeat:
            return repeat, file_fps
    raise ValueError(f"sample_fps {fps} has no small integer multiple; cannot export it as mp4")


def _npy_repeat(fps: float, n_frames: int) -> int:
    """Frames stored per sampled frame in a 1-fps ``.npy`` so that the published linspace sampling
    returns exactly our frames; checked, not assumed, because of float rounding."""
    repeat = round(1 / fps) if fps <= 1 else 0
    if repeat >= 1 and abs(repeat * fps - 1) < 1e-9:
        n = n_frames * repeat
        idx = np.linspace(0, n - 1, int(n * fps), dtype=int)
        if len(idx) == n_frames and np.array_equal(idx // repeat, np.arange(n_frames)):
            return repeat
    raise ValueError(
        f".npy videos are stored at 1 fps; sample_fps {fps} is not 1/k for an integer k "
        f"(use video_format='mp4')"
    )


def export_synthetic(
    spec: SyntheticSpec,
    out_dir: str | Path,
    video_format: str = "mp4",
    annotation_name: str = "synthetic_oe.json",
) -> Path:
    """Write every video (``videos/<id>.mp4`` or ``.npy``) and an RVS-format annotation file; return its path.

    Read it back with ``load_rvs_annotations(path, data_root=out_dir, sample_fps=spec.sample_fps)``: video
    paths are relative to ``out_dir``. Files are written so that the published sampling at ``sample_fps``
    returns exactly the rendered frames (mp4 is lossy; ``.npy`` is exact). Frames stream in chunks.
    """
    from mukv.video.sources import write_mp4  # lazy: PyAV is only needed for export

    if video_format not in ("mp4", "npy"):
        raise ValueError(f"video_format must be 'mp4' or 'npy', got {video_format!r}")
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for sample in make_synthetic_dataset(spec):
        rel = f"videos/{sample.video_id}.{video_format}"
        n = len(sample.source)
        if video_format == "mp4":
            repeat, file_fps = _mp4_repeat(spec.sample_fps)
            write_mp4(out / rel, _chunks(sample, repeat), file_fps)
        else:
            repeat = _npy_repeat(spec.sample_fps, n)
            s = spec.frame_size
            arr = np.lib.format.open_memmap(out / rel, mode="w+", dtype=np.uint8, shape=(n * repeat, s, s, 3))
            pos = 0
            for frames in _chunks(sample, repeat):
                arr[pos : pos + len(frames)] = frames
                pos += len(frames)
            arr.flush()
            del arr
        records.append(
            {
                "video_id": sample.video_id,
                "video_path": rel,
                "duration": sample.duration,
                "conversations": [
                    {
                        "question": q.question,
                        "answer": q.answer,
                        "start_time": q.start_time,
                        "end_time": q.end_time,
                        "qtype": q.qtype,
                    }
                    for q in sample.questions
                ],
            }
        )
    path = out / annotation_name
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return path


def spec_from_dict(d: dict[str, Any]) -> SyntheticSpec:
    """A spec from a config mapping, rejecting unknown keys (typos would otherwise be silently ignored)."""
    known = {f.name for f in fields(SyntheticSpec)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown synthetic dataset option; known: {sorted(known)}")
    return SyntheticSpec(**d)
