"""Evidence recall: how much of a question's evidence the recalled answer context holds.

The synthetic benchmark (:mod:`mukv.data.synthetic`) names each detail, current and motion question's exact
evidence as ``meta['evidence_cells']``, ``[frame, cell]`` pairs on a ``meta['grid']`` x ``meta['grid']``
raster. A cache method reports what its context holds (``mukv.cache.base.Recalled``: whole frames, or single
video tokens ``frame * tokens_per_frame + index``); this module alone knows the question side, so the
engine passes both through and writes the share to predictions.csv as ``evidence_recalled``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


def evidence_recalled(meta: Mapping[str, Any], recalled: Collection[int] | None, tokens_per_frame: int,
                      frames: Collection[int] | None = None, frames_per_step: int = 1) -> float | None:
    """Share of ``meta['evidence_cells']`` in the recalled context; None where the question names no evidence
    or the method reported nothing. Methods that recall whole frames report ``frames``; methods that keep
    single tokens report the ``recalled`` video tokens (a ``range`` for a window), counted token by token when
    the model has one visual token per grid cell, else frame by frame (a frame counts if any of its tokens
    was recalled). ``frames_per_step``: video frames per step of the model (Qwen-VL: 2); ``frames`` and
    ``recalled`` count steps then, and a needle's frame is in the step that embeds it."""
    cells = meta.get("evidence_cells")
    if not cells or (recalled is None and frames is None):
        return None
    cells = [(f // frames_per_step, c) for f, c in cells]
    if frames is None:
        have = recalled if isinstance(recalled, (range, set, frozenset)) else set(recalled)
        if tokens_per_frame == meta.get("grid", 0) ** 2:
            return sum(f * tokens_per_frame + c in have for f, c in cells) / len(cells)
        frames_in = sum(any(f * tokens_per_frame + j in have for j in range(tokens_per_frame)) for f, _ in cells)
        return frames_in / len(cells)
    have_frames = frames if isinstance(frames, (range, set, frozenset)) else set(frames)
    return sum(f in have_frames for f, _ in cells) / len(cells)


# the meta keys of a synthetic question that name whole frames of evidence (count: the rings; order: its needles)
_EVIDENCE_FRAME_KEYS = ("evidence_frames", "first_frame", "second_frame")


def evidence_of(meta: Mapping[str, Any]) -> tuple[list[tuple[int, int]], list[int], int | None]:
    """What a question names as its evidence, for the run explorer: (``[frame, cell]`` pairs on the
    ``grid`` x ``grid`` raster, the evidence frames in time order, ``grid``); empty where it names none (RVS)."""
    cells = [(int(f), int(c)) for f, c in meta.get("evidence_cells") or ()]
    frames = {f for f, _ in cells}
    for key in _EVIDENCE_FRAME_KEYS:
        value = meta.get(key)
        if isinstance(value, (list, tuple)):
            frames.update(int(v) for v in value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            frames.add(int(value))
    return cells, sorted(frames), (int(meta["grid"]) if meta.get("grid") else None)
