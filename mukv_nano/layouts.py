"""The context layouts: what each streaming method's answer attends to, as one training forward computes it.

A layout says how the stream is encoded (``encoding``) and, per batch item, which encoded keys the
questions see and at which rotary positions. One per streaming method:

=========== ========== ===========================================================================
layout      encoding   the answer's context (method)
=========== ========== ===========================================================================
``full``    causal     init + every frame at contiguous positions (``cache=full``; ReKV within its
                       window)
``window``  window     init (sink) + the last ``n_local`` tokens, re-indexed (``sliding_window``)
``rekv``    causal     init + a subset of frames encoded in the stream, re-indexed (ReKV's recall)
``uniform`` causal     init + a subset of frames encoded fresh (``uniform``: ``full`` on the subset)
``mukv``    blocks     init + trimmed blocks, each encoded alone after the init prompt, at positions
                       init_len + offset, overlapping (MuKV)
=========== ========== ===========================================================================

``tests/test_nano_layouts.py`` checks that each computes exactly what its streaming method computes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mukv_nano.examples import TOKENS_PER_FRAME, Example

LAYOUTS = ("full", "uniform", "window", "rekv", "mukv")


@dataclass
class Layout:
    """How one forward encodes the stream and what each question's answer attends to."""

    name: str
    encoding: str  # causal | window | blocks
    ctx_idx: torch.Tensor  # (B, C) indices into [init | video]
    ctx_pos: torch.Tensor  # (B, C) rotation positions
    ctx_valid: torch.Tensor  # (B, C) bool
    q_start: torch.Tensor  # (B,) position of each question's first token
    n_local: int | None = None  # window encoding
    block_of: torch.Tensor | None = None  # (T,) block id of each video token (blocks encoding)
    offset: torch.Tensor | None = None  # (T,) offset of each video token in its block


def _contiguous_context(b: int, picks: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Init + picked token indices re-indexed to contiguous positions (padding masked)."""
    c = max(len(p) for p in picks)
    idx = torch.zeros(b, c, dtype=torch.long)
    valid = torch.zeros(b, c, dtype=torch.bool)
    for i, p in enumerate(picks):
        idx[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        valid[i, : len(p)] = True
    pos = torch.arange(c).expand(b, c).clone()
    q_start = torch.tensor([len(p) for p in picks], dtype=torch.long)
    return idx, pos, valid, q_start


def full_layout(b: int, n_init: int, n_video: int) -> Layout:
    """``cache=full``: every token at its position (and ``uniform`` on the frames it keeps)."""
    idx, pos, valid, qs = _contiguous_context(b, [list(range(n_init + n_video))] * b)
    return Layout("full", "causal", idx, pos, valid, qs)


def window_layout(b: int, n_init: int, n_video: int, n_local: int) -> Layout:
    """``sliding_window``: sink + last ``n_local`` tokens, as ``WindowStreamingCache.window_context``."""
    n = n_init + n_video
    keep = list(range(n)) if n <= n_local else list(range(n_init)) + list(range(n - n_local, n))
    idx, pos, valid, qs = _contiguous_context(b, [keep] * b)
    return Layout("window", "window", idx, pos, valid, qs, n_local=n_local)


def subset_layout(b: int, n_init: int, frames_per_item: list[list[int]]) -> Layout:
    """ReKV's answer: init + the picked frames (time order) re-indexed to contiguous positions."""
    picks = [list(range(n_init)) + [n_init + f * TOKENS_PER_FRAME + t for f in sorted(fr)
                                     for t in range(TOKENS_PER_FRAME)] for fr in frames_per_item]
    idx, pos, valid, qs = _contiguous_context(b, picks)
    return Layout("rekv", "causal", idx, pos, valid, qs)


def mukv_layout(b: int, n_init: int, n_video: int, blocks: list[tuple[int, int]],
                kept_items: list[list[list[int]]]) -> Layout:
    """MuKV's published layout: video tokens cut into ``blocks`` (start, size), each encoded with only the
    init prompt as prefix at positions init_len + offset; item i's context is the init prompt plus the video
    tokens ``kept_items[i][block]`` (indices into the video) at their encoding positions, and its prompt
    starts at position = cache length (init + kept tokens). Order in the cache does not matter."""
    block_of = torch.empty(n_video, dtype=torch.long)
    offset = torch.empty(n_video, dtype=torch.long)
    for k, (a, g) in enumerate(blocks):
        block_of[a: a + g] = k
        offset[a: a + g] = torch.arange(g)
    picks, positions = [], []
    for kept_blocks in kept_items:
        idx, pos = list(range(n_init)), list(range(n_init))
        for (a, _), kept in zip(blocks, kept_blocks, strict=True):
            idx += [n_init + t for t in kept]
            pos += [n_init + t - a for t in kept]
        picks.append(idx)
        positions.append(pos)
    c = max(len(p) for p in picks)
    ctx_idx = torch.zeros(b, c, dtype=torch.long)
    ctx_pos = torch.zeros(b, c, dtype=torch.long)
    valid = torch.zeros(b, c, dtype=torch.bool)
    for i, (p, q) in enumerate(zip(picks, positions, strict=True)):
        ctx_idx[i, : len(p)], ctx_pos[i, : len(p)], valid[i, : len(p)] = torch.tensor(p), torch.tensor(q), True
    q_start = torch.tensor([len(p) for p in picks], dtype=torch.long)
    return Layout("mukv", "blocks", ctx_idx, ctx_pos, valid, q_start, block_of=block_of, offset=offset)


def block_partition(n_frames: int, rng: random.Random, sizes=(4, 16, 64)) -> list[tuple[int, int]]:
    """MuKV-like blocks over the video tokens: each 4-frame group is one segment block, 4 frame blocks or
    16 patch blocks (a trailing partial group uses frame or patch blocks)."""
    blocks, t = [], 0
    seg = sizes[2] // TOKENS_PER_FRAME
    for g0 in range(0, n_frames, seg):
        nf = min(seg, n_frames - g0)
        choice = rng.choice([s for s in sizes if s <= nf * TOKENS_PER_FRAME])
        for a in range(0, nf * TOKENS_PER_FRAME, choice):
            blocks.append((t + a, choice))
        t += nf * TOKENS_PER_FRAME
    return blocks


def blocks_layout(b: int, n_init: int, n_frames: int, examples: list[Example], rng: random.Random,
                  p_block: float = 0.5) -> Layout:
    """MuKV: blocks encoded independently (init + block), a random subset of blocks with a random subset of
    tokens kept (evidence always kept)."""
    blocks = block_partition(n_frames, rng)
    kept_items = []
    for ex in examples:
        kept_blocks = []
        for a, g in blocks:
            evid = [t for t in range(a, a + g) if t in ex.evidence_tokens]
            if not evid and rng.random() > p_block:
                kept_blocks.append([])
                continue
            keep_ratio = rng.uniform(0.1, 1.0)
            kept = set(evid) | {t for t in range(a, a + g) if rng.random() < keep_ratio}
            kept_blocks.append(sorted(kept or {a + rng.randrange(g)}))
        kept_items.append(kept_blocks)
    return mukv_layout(b, n_init, n_frames * TOKENS_PER_FRAME, blocks, kept_items)


def frame_subsets(examples: list[Example], n_frames: int, rng: random.Random) -> tuple[int, list[list[int]]]:
    """A random subset size k (at least the evidence) and, per example, its evidence frames plus random
    others up to k, in time order (what uniform sampling or retrieval would hand the answer)."""
    evid = max(len(ex.evidence_frames) for ex in examples)
    k = rng.randint(min(n_frames, max(1, evid)), n_frames)
    subsets = []
    for ex in examples:
        others = [f for f in range(n_frames) if f not in ex.evidence_frames]
        rng.shuffle(others)
        subsets.append(sorted(set(ex.evidence_frames) | set(others[: max(0, k - len(ex.evidence_frames))])))
    return k, subsets


def build_layout(name: str, examples: list[Example], n_init: int, n_frames: int,
                 rng: random.Random) -> tuple[Layout, list[list[int]] | None]:
    """(layout, frames kept per example): ``uniform`` re-encodes a subset, so it changes the frames."""
    b = len(examples)
    if name == "uniform":  # init + a subset of frames encoded fresh, contiguous (full on the subset)
        k, subsets = frame_subsets(examples, n_frames, rng)
        return full_layout(b, n_init, k * TOKENS_PER_FRAME), [frames[:k] for frames in subsets]
    n_video = n_frames * TOKENS_PER_FRAME
    if name == "full":
        return full_layout(b, n_init, n_video), None
    if name == "window":
        # the window holds at least the last frames that carry evidence for "current"
        n_local = rng.randint(TOKENS_PER_FRAME, max(TOKENS_PER_FRAME, n_init + n_video))
        return window_layout(b, n_init, n_video, n_local), None
    if name == "rekv":
        return subset_layout(b, n_init, frame_subsets(examples, n_frames, rng)[1]), None
    if name == "mukv":
        return blocks_layout(b, n_init, n_frames, examples, rng), None
    raise ValueError(name)
