"""Training examples: one short synthetic stream with its questions asked at its end.

Streams come from ``mukv.data.synthetic`` with ``split='train'`` (seeds the evaluation never uses); besides
the frames and questions, an example keeps what the training signals supervise: the evidence tokens of each
question, every cell's colour and shape, the counted rings and the needles in time order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mukv.data.synthetic import (
    COLOUR_NAMES,
    COUNT_SHAPE,
    GRID,
    NEEDLE_SHAPES,
    OBJECT_SHAPES,
    QUESTION_TYPES,
    SHAPES,
    TRAIN_SEED_BASE,
    SyntheticSpec,
    make_video,
)

TOKENS_PER_FRAME = GRID * GRID  # the nano model's visual tokens: one per grid cell
VAL_SEED_BASE = TRAIN_SEED_BASE + 900_000_000  # validation streams: training range, never trained on


@dataclass
class Example:
    frames: np.ndarray  # (F, S, S, 3) uint8
    questions: list  # Question
    evidence_frames: set[int]
    evidence_tokens: set[int]  # token indices (frame * 16 + cell) within the video
    cell_colour: np.ndarray | None = None  # (F, 16) colour index per cell, len(COLOUR_NAMES) = empty
    cell_shape: np.ndarray | None = None  # (F, 16) shape index per cell, len(SHAPES) = empty
    kept_frames: list[int] | None = None  # frames of the original stream kept here (``uniform``), None: all
    ring_tokens: tuple[int, ...] = ()  # the counted rings' tokens (frame * 16 + cell) within the video
    needle_tokens: tuple[tuple[int, str], ...] = ()  # (token, shape) of each needle shown, in time order

    def token_index(self, t: int) -> int | None:
        """Where original video token ``t`` sits in this example's frames (None: its frame was dropped)."""
        if self.kept_frames is None:
            return t
        f, c = divmod(t, TOKENS_PER_FRAME)
        return self.kept_frames.index(f) * TOKENS_PER_FRAME + c if f in self.kept_frames else None

    def keep_frames(self, kept: list[int]) -> Example:
        """This stream with only the frames ``kept`` (``uniform`` encodes a subset); the questions stay (their
        evidence frames are among those kept) and ``token_index`` maps the original tokens."""
        return Example(self.frames[kept], self.questions, self.evidence_frames, self.evidence_tokens,
                       None if self.cell_colour is None else self.cell_colour[kept],
                       None if self.cell_shape is None else self.cell_shape[kept], list(kept), self.ring_tokens,
                       self.needle_tokens)


def make_example(seed: int, n_frames: int, fps: float, gap_s: float, split: str = "train",
                 types: tuple[str, ...] = QUESTION_TYPES, rings: int | None = None,
                 questions: int | None = None) -> Example:
    """One training stream with its questions asked at the end: one per type, or ``questions`` cycling
    through the types (more answers per encoded stream; a question asked twice is kept once)."""
    spec = SyntheticSpec(num_videos=1, duration_s=n_frames / fps, sample_fps=fps, frame_size=112,
                         questions_per_video=questions or len(types), seed=seed, question_times="end",
                         question_types=types, mean_gap_s=gap_s, split=split, rings=rings)
    video = make_video(spec, 0)
    seen: set[str] = set()
    video.questions = [q for q in video.questions if not (q.question in seen or seen.add(q.question))]
    scene = video.source.scene
    tokens = {i.start * TOKENS_PER_FRAME + i.cell for i in scene.instances if i.shape not in OBJECT_SHAPES}
    for q in video.questions:
        if q.qtype == "current":
            tokens.add(q.meta["frame"] * TOKENS_PER_FRAME + q.meta["cell"])
    occ = scene.occupancy[:n_frames]
    colour_of = np.array([COLOUR_NAMES.index(i.colour) for i in scene.instances] + [len(COLOUR_NAMES)])
    shape_of = np.array([SHAPES.index(i.shape) for i in scene.instances] + [len(SHAPES)])
    rings = tuple(sorted(i.start * TOKENS_PER_FRAME + i.cell for i in scene.instances
                         if i.shape == COUNT_SHAPE and i.start < n_frames))
    needles = tuple(sorted((i.start * TOKENS_PER_FRAME + i.cell, i.shape) for i in scene.instances
                           if i.shape in NEEDLE_SHAPES and i.start < n_frames))
    return Example(video.source.frames(0, n_frames), video.questions, {t // TOKENS_PER_FRAME for t in tokens},
                   tokens, colour_of[occ], shape_of[occ], ring_tokens=rings, needle_tokens=needles)


def question_evidence(q) -> list[int]:
    """Video token indices (frame * 16 + cell) a question's answer has to look at (the generator's
    ``evidence_cells``: the needle of detail, the asked cell in the last frame of current, the ball's run of
    motion); empty for the other types."""
    return [f * TOKENS_PER_FRAME + c for f, c in q.meta.get("evidence_cells", [])]


def motion_runs(ex: Example) -> list[tuple[list[int | None], str]]:
    """Each motion question's ball tokens in this example's frames (None: frame dropped) and its direction."""
    return [([ex.token_index(t) for t in question_evidence(q)], q.answer) for q in ex.questions
            if q.qtype == "motion"]


def shown_needles(ex: Example) -> list[tuple[int, str]]:
    """(token in this example's frames, shape) of each needle whose frame is kept, in time order."""
    return [(t, shape) for t, shape in ((ex.token_index(t), shape) for t, shape in ex.needle_tokens) if t is not None]
