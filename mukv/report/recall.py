"""What an answer's context recalled, kept compact in the run folder and read back for the explorer.

A cache method reports what its answer context holds through the typed record of the method contract
(``mukv.cache.base.Recalled``: whole ``frames``, or video ``tokens`` as ``frame * tokens_per_frame + index``,
optionally split into named ``groups``, MuKV's granularities). The engine packs it with :func:`pack_recalled`
into the ``recalled`` field of each ``predictions.jsonl`` line (not ``predictions.csv``); the run explorer
(``mukv.report.explorer``) unpacks it with :class:`RecallMap`. Nothing here knows any cache method.

The packed form, JSON::

    {"tokens_per_frame": 16, "frames_per_step": 1, "grid": [4, 4],
     "frames": [[0, 12], [15, 16]],        # whole frames recalled, as half-open runs [first, stop)
     "partial": {"13": "8421"},            # frames recalled in part: a hex bit mask of their tokens (bit i: token i)
     "groups": {"g0.25": {"frames": [...], "partial": {...}}, ...}}

"Frames" are the method's frames, i.e. the model's steps (a model that embeds two video frames per step,
``frames_per_step`` 2, numbers its steps); :class:`RecallMap` answers in video frames. A window of 15,000
tokens is one run and two masks; a MuKV context of 8,000 scattered tokens a few hundred masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _runs(values: Iterable[int]) -> list[list[int]]:
    """Sorted distinct ints as half-open runs ``[[first, stop), ...]``."""
    out: list[list[int]] = []
    for v in sorted(set(int(x) for x in values)):
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return out


def _from_runs(runs: Iterable[Sequence[int]]) -> set[int]:
    return {f for a, b in runs for f in range(int(a), int(b))}


def _pack_tokens(tokens: range | Sequence[int], tokens_per_frame: int) -> dict[str, Any]:
    t = int(tokens_per_frame)
    if isinstance(tokens, range) and tokens.step == 1:  # a window: whole frames between two partial ends
        lo, hi = max(tokens.start, 0), tokens.stop
        if hi <= lo:
            return {"frames": [], "partial": {}}
        first, last = lo // t, (hi - 1) // t
        arr = np.concatenate([np.arange(lo, min(hi, (first + 1) * t)), np.arange(max(lo, last * t), hi)])
        whole_from, whole_to = -(-lo // t), hi // t  # frames lying entirely inside
        packed = _pack_tokens(arr.tolist(), t)
        packed["frames"] = _runs([*_from_runs(packed["frames"]), *range(whole_from, whole_to)])
        return packed
    arr = np.unique(np.asarray([int(x) for x in tokens], dtype=np.int64))
    arr = arr[arr >= 0]
    frames, index = arr // t, arr % t
    whole, partial = [], {}
    for f in np.unique(frames).tolist():
        idx = index[frames == f]
        if len(idx) == t:
            whole.append(f)
        else:
            partial[str(f)] = format(sum(1 << int(i) for i in idx.tolist()), "x")
    return {"frames": _runs(whole), "partial": partial}


def pack_recalled(recalled: Any, tokens_per_frame: int, frames_per_step: int = 1,
                  grid: Sequence[int] | None = None) -> dict[str, Any] | None:
    """The compact JSON form of a ``Recalled`` record (see the module doc); None where the method reported
    nothing. ``grid``: (rows, columns) of a frame's tokens where the model lays them out in 2-D (else a
    square grid is assumed where ``tokens_per_frame`` is a square, one row otherwise)."""
    tokens, frames = getattr(recalled, "tokens", None), getattr(recalled, "frames", None)
    if tokens is None and frames is None:
        return None
    out: dict[str, Any] = {"tokens_per_frame": int(tokens_per_frame), "frames_per_step": int(frames_per_step)}
    if grid is not None:
        out["grid"] = [int(grid[0]), int(grid[1])]
    if frames is not None:
        out.update(frames=_runs(frames), partial={})
    else:
        out.update(_pack_tokens(tokens, tokens_per_frame))
    groups = getattr(recalled, "groups", None)
    if groups:
        out["groups"] = {str(name): _pack_tokens(list(toks), tokens_per_frame) for name, toks in groups.items()}
    return out


def token_grid(tokens_per_frame: int, grid: Sequence[int] | None = None) -> tuple[int, int]:
    """(rows, columns) a frame's tokens are drawn on: the model's own grid, a square, else one row."""
    if grid:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(int(tokens_per_frame))
    return (side, side) if side * side == tokens_per_frame else (1, int(tokens_per_frame))


@dataclass
class RecallMap:
    """A packed recall record read back: which tokens of which video frame an answer's context held."""

    tokens_per_frame: int
    frames_per_step: int = 1
    grid: tuple[int, int] = (1, 1)
    whole: set[int] = field(default_factory=set)  # steps recalled whole
    partial: dict[int, np.ndarray] = field(default_factory=dict)  # step -> bool (tokens_per_frame,)
    groups: dict[str, RecallMap] = field(default_factory=dict)

    @classmethod
    def unpack(cls, packed: Mapping[str, Any] | None) -> RecallMap | None:
        if not packed:
            return None
        t, k = int(packed["tokens_per_frame"]), int(packed.get("frames_per_step") or 1)
        grid = token_grid(t, packed.get("grid"))
        groups = {name: cls._one(g, t, k, grid) for name, g in (packed.get("groups") or {}).items()}
        return cls._one(packed, t, k, grid, groups)

    @classmethod
    def _one(cls, d: Mapping[str, Any], t: int, k: int, grid: tuple[int, int],
             groups: dict[str, RecallMap] | None = None) -> RecallMap:
        partial = {}
        for step, mask in (d.get("partial") or {}).items():
            bits = int(mask, 16)
            partial[int(step)] = np.array([(bits >> i) & 1 for i in range(t)], dtype=bool)
        return cls(t, k, grid, _from_runs(d.get("frames") or ()), partial, groups or {})

    def coverage(self, frame: int) -> np.ndarray:
        """Bool (tokens_per_frame,): the tokens of video frame ``frame`` (its step's) in the context."""
        step = int(frame) // self.frames_per_step
        if step in self.whole:
            return np.ones(self.tokens_per_frame, dtype=bool)
        got = self.partial.get(step)
        return got.copy() if got is not None else np.zeros(self.tokens_per_frame, dtype=bool)

    def fraction(self, frame: int) -> float:
        """Share of video frame ``frame``'s tokens in the context."""
        step = int(frame) // self.frames_per_step
        if step in self.whole:
            return 1.0
        got = self.partial.get(step)
        return float(got.mean()) if got is not None else 0.0

    def fractions(self, n: int) -> np.ndarray:
        """``fraction`` of video frames ``0 .. n-1``, as one array."""
        k, out = self.frames_per_step, np.zeros(n)
        for step in self.whole:
            out[step * k: (step + 1) * k] = 1.0
        for step, mask in self.partial.items():
            out[step * k: (step + 1) * k] = mask.mean()
        return out[:n]

    def frames(self) -> list[int]:
        """Video frames any of whose tokens are in the context, in time order."""
        steps = self.whole | set(self.partial)
        return sorted(s * self.frames_per_step + j for s in steps for j in range(self.frames_per_step))

    def cell_grid(self, frame: int) -> np.ndarray:
        """The coverage of ``frame`` as a (rows, columns) float grid (1: recalled), in raster order."""
        rows, cols = self.grid
        return self.coverage(frame).astype(float)[: rows * cols].reshape(rows, cols)
