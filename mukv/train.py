"""Training the nano model on the synthetic benchmark, under every cache method's context layout.

One training example is one short synthetic stream (``split='train'`` seeds only) with one question of each
type asked at its end. The language model runs with position ids 0 and a per-layer attention callable (the
same hook the streaming methods use), which computes, in one forward:

* the **encoding** of the init prompt and the video tokens, in one of three modes:
  ``causal`` (init + frames, contiguous positions: ``full``, ReKV's encoding within its window, and
  ``uniform``'s fresh encoding of the sampled frames), ``window`` (the sink + sliding-window encoding of
  ``sliding_window`` / ReKV with a window shorter than the stream; it *is* :class:`SinkWindowKV`), and
  ``blocks`` (MuKV: each block attends to the init prompt and itself, at positions init_len + offset);
* the **answer context**: for every batch item, which encoded keys the answer sees and at which positions
  (all at their positions; init + window re-indexed to 0..N-1; init + a subset of frames re-indexed to
  0..N-1; init + trimmed blocks at their encoding positions), and the position of the first prompt token;
* the **questions**: each question's prompt and answer tokens attend to the context and causally to
  themselves only (several questions share one encoded stream; a question's KV is never seen by another,
  as the engine never keeps it).

So the training forward computes exactly the attention the streaming methods use at inference for these
layouts; ``tests/test_nano.py`` checks it against the engine (full, uniform, sliding window, a re-indexed
subset as ReKV answers from, and independently encoded blocks as MuKV answers from).

Curriculum (see ``/work/shared/reference/NANO-NOTES.md``): 2-4 frame streams first, then the maximum
length ramps up; distractor density ramps up; only the ``full`` layout at first, then the mixture. The
schedule runs on *progress* = max(step / steps, elapsed / max_minutes), so a time budget always ends the
schedule cleanly. Checkpoints are saved periodically (the best by validation accuracy on separate training
seeds, never the held-out evaluation seeds).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mukv.cache.attention import SinkWindowKV, attention_weights, grouped_sdpa
from mukv.data.synthetic import (
    COLOUR_NAMES,
    COUNT_SHAPE,
    DIRECTIONS,
    GRID,
    MAX_RINGS,
    NEEDLE_SHAPES,
    OBJECT_SHAPES,
    QUESTION_TYPES,
    SHAPES,
    TRAIN_SEED_BASE,
    SyntheticSpec,
    make_video,
)
from mukv.errors import ConfigError
from mukv.models import attention_hook
from mukv.models.adapter import DEFAULT_INIT_PROMPT, DEFAULT_QUESTION_TEMPLATE
from mukv.models.rope import RotaryTable

log = logging.getLogger("mukv.train")

TOKENS_PER_FRAME = GRID * GRID
VAL_SEED_BASE = TRAIN_SEED_BASE + 900_000_000  # validation streams: training range, never trained on
LAYOUTS = ("full", "uniform", "window", "rekv", "mukv")


@dataclass
class TrainSettings:
    steps: int = 20000
    max_minutes: float = 55.0
    batch_size: int = 16
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    warmup: float = 0.03  # fraction of the schedule
    grad_clip: float = 1.0
    min_frames: int = 2
    max_frames: int = 32
    short_phase: float = 0.1  # 2-4 frame streams until this progress
    ramp_end: float = 0.45  # max length and distractor density reach their final values here
    sample_fps: float = 0.5
    layout_weights: dict[str, float] = field(default_factory=lambda: {
        "full": 0.4, "uniform": 0.1, "window": 0.1, "rekv": 0.2, "mukv": 0.2})
    full_only_until: float = 0.12
    empty_until: float = 0.05  # no distractor objects until this progress
    detail_only_until: float = 0.15  # only the needle-colour question until this progress
    all_types_from: float = 0.3
    aux_weight: float = 0.5  # per-cell colour / shape probe on the visual tokens (x0.25 after ramp_end)
    probe_cells: bool = True  # the probe also predicts each token's cell (puts "where" into the visual tokens)
    probe_words: bool = True  # the probe's classes are the word embeddings of the colour / shape / digit names
    # attention supervision: at each answer position of a question of attend_types (detail / current / motion:
    # the types whose evidence is a few tokens), the heads of the best of attend_layers put their attention on
    # the question's evidence tokens (x attend_weight, 0: off). The recipe: "current" only, the mean over the
    # heads of layer 2 or 3 (with the cell words and the asked-cell probe below), until attend_until. On every
    # type at 1.0 ("best") from scratch the heads found the needle, but detail training accuracy stalled at 43%
    # (93% without it at the same step); on "current" to the end of the schedule (experiment=nano_current)
    # current reached 100% while detail fell to 78% and motion and count to chance
    attend_weight: float = 1.0
    attend_layers: tuple[int, ...] = (2, 3)
    attend_head: str = "mean"  # best: any one head of a layer; mean: the heads' mean mass; "0", "1", ...: that head
    attend_types: tuple[str, ...] = ("current",)
    # ... only until this progress (1.0: the whole schedule): releasing the heads halfway brought detail and
    # motion back (to 99 / 100% in range) with current kept at 99%
    attend_until: float = 0.5
    # counting: at each "count" answer position, head count_head of layer count_layer spreads its attention
    # uniformly over the ring tokens in context and the init prompt's tokens (a sink of n), so that its output
    # moves with k / (k + n) for k rings (x count_weight, 0: off; cross-entropy to that distribution). Without
    # it, count training accuracy stayed at chance in every recipe; with it, count is 99% in range
    count_weight: float = 1.0
    count_layer: int = 1
    count_head: int = 3
    # ... and its readout: a probe on the hidden state after count_probe_layer layers at each count answer names the
    # count through the digit words (x count_probe_weight, 0: off; CountProbe)
    count_probe_weight: float = 1.0
    count_probe_layer: int = 2
    count_probe_until: float = 0.5  # ... only until this progress (1.0: the whole schedule)
    # the cell words: "row r" / "column c" are single tokens (build_word_tokenizer), and the probe of the asked
    # cell reads them at each "current" question's answer position (the hidden state after parse_layer layers)
    # through the cell words' embeddings (x parse_weight, 0: off)
    cell_words: bool = True
    parse_weight: float = 1.0
    parse_layer: int = 2
    # ... helped by attention supervision: some head of these layers, at those answer positions, attends to the
    # question's "row r" and "column c" tokens (from scratch, the probe alone stayed at chance: at
    # initialisation those two tokens get 1/500 of the answer position's attention); () off
    parse_attend_layers: tuple[int, ...] = (0, 1)
    # the motion probe: a linear head on the language model's hidden state (after layer motion_layer) at each ball
    # token that follows the ball of the frame before predicts the run's direction (x motion_weight, 0: off)
    motion_weight: float = 0.5
    motion_layer: int = 2
    # ... helped by attention supervision: in some head of these layers, each of those ball tokens attends to
    # the ball of the frame before (where the step is read from); () off
    motion_attend_layers: tuple[int, ...] = (0, 1)
    # ... by these heads of those layers only (() any head). Left free, the order pattern took layer 0 and
    # the ball pattern moved into layer 1, onto the counting head (experiments/nano_head_map.py)
    motion_attend_heads: tuple[int, ...] = ()
    # ... whose classes are the direction words' embeddings (through a learned map: a dot product, as the cell
    # probe's row / column heads), not a free linear head: the internal direction is then tied to the words
    motion_words: bool = True
    # the order probe: at each needle token, a head on the hidden state after layer order_layer names the needle
    # shapes shown before it (multi-label, scored against the needle words' embeddings), so that the later
    # needle's token carries the earlier one's word and an "order" answer can copy it as detail copies a colour
    # (x order_weight, 0: off); helped by attention supervision within the encoding: some head of
    # order_attend_layers at each needle token attends to each earlier needle; () off. Without it, order
    # training accuracy stayed at chance (0.47-0.53) in the 2026-11-27 e run; with it, order is 96% in range
    order_weight: float = 1.0
    order_layer: int = 2
    order_attend_layers: tuple[int, ...] = (0, 1)
    order_attend_heads: tuple[int, ...] = ()  # ... by these heads of those layers only (() any head)
    # ... only until this progress (1.0: the whole schedule). To the end, order reached 90% in range while
    # motion stayed at chance (24%); released halfway (with attend_until), motion came back to 100% in ~500 steps
    order_until: float = 0.5
    # answer-word separation: within each answer set (colours, object shapes, needle shapes, directions, count
    # digits) every pair of word embeddings above cosine separate_margin is penalised (x separate_weight, 0: off)
    separate_weight: float = 1.0
    separate_margin: float = 0.2
    detail_share: float = 0.1  # once all types are in, this share of steps still asks the needle colour only
    mid_frames: int = 16  # > 0: after the ramp, streams are <= mid_frames long except a long_share of steps
    long_share: float = 0.3
    # streams of mixed types: once all types are in, this share of the training streams carries a random subset of
    # the question types (each type kept with probability 1/2, at least one), so that no type's evidence (needles,
    # balls, rings) is always on screen. With every type on every stream, count over-counted on streams without
    # needles or balls (12% on count-only streams); 0: every stream carries every type
    subset_share: float = 0.25
    # the language model's attention heads (query / key-value; None: the nano default, NANO_DIMS). From scratch
    # only: train.init_from keeps the checkpoint's
    text_heads: int | None = None
    text_kv_heads: int | None = None
    questions_per_stream: int = 12  # > 0: this many questions per training stream (cycling types), else one per type
    # bf16 autocast for the forward (fp32 weights and optimiser): ~1.3x faster on AVX512-BF16 / AMX CPUs, ~100x
    # slower where bf16 is emulated (AVX2). None: on exactly where the CPU runs bf16 natively (fast_bf16)
    bf16: bool | None = None
    init_from: str | None = None  # continue from a nano checkpoint folder (a second stage)
    save_every_s: float = 300.0
    val_videos: int = 48
    seed: int = 0
    threads: int = 0  # 0: torch default

    def head_dims(self) -> dict:
        """``build_nano`` keyword arguments for the head counts set here."""
        return {k: v for k, v in (("text_heads", self.text_heads), ("text_kv_heads", self.text_kv_heads))
                if v is not None}

    def model_shape(self) -> tuple[int, int]:
        """(attention heads, layers) of the language model this run trains: the ``init_from`` checkpoint's
        (read from its config, no weights), else the one ``build_nano`` makes."""
        if self.init_from:
            from mukv.models.nano import read_nano_config

            text = read_nano_config(self.init_from, "train.init_from").text_config
            return text.num_attention_heads, text.num_hidden_layers
        from mukv.models.nano import NANO_DIMS

        return {**NANO_DIMS, **self.head_dims()}["text_heads"], NANO_DIMS["text_layers"]

    def weight_at(self, name: str, progress: float) -> float:
        """``<name>_weight`` at this point of the schedule: off from ``<name>_until`` on."""
        return getattr(self, f"{name}_weight") if progress < getattr(self, f"{name}_until") else 0.0

    def attend_weight_at(self, progress: float) -> float:
        return self.weight_at("attend", progress)

    def order_weight_at(self, progress: float) -> float:
        return self.weight_at("order", progress)

    def __post_init__(self) -> None:
        """The checks that need no model (``validate_config`` runs them through this, before anything loads)."""
        head = str(self.attend_head)
        if head not in ("best", "mean") and not head.isdigit():
            raise ConfigError("train.attend_head", f"must be 'best', 'mean' or a head index, got {head!r}")
        bad = [t for t in self.attend_types if t not in QUESTION_TYPES]
        if bad:
            raise ConfigError("train.attend_types", f"unknown question types {bad}; choose from {list(QUESTION_TYPES)}")
        for name in ("attend_until", "order_until", "count_probe_until"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name}", f"is a fraction of the schedule in [0, 1], got {getattr(self, name)}")
        for name in ("motion_attend_heads", "order_attend_heads"):
            if any(h < 0 for h in getattr(self, name)):
                raise ConfigError(f"train.{name}", f"are head indices (>= 0), got {list(getattr(self, name))}")
        if self.count_layer < 0 or self.count_head < 0:
            raise ConfigError("train.count_layer" if self.count_layer < 0 else "train.count_head",
                              "must be a layer / head index (>= 0)")
        if not 0.0 <= self.subset_share <= 1.0:
            raise ConfigError("train.subset_share", f"is a share of the streams in [0, 1], got {self.subset_share}")
        for name in ("text_heads", "text_kv_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be a positive head count, got {getattr(self, name)}")
        _check_dims(self.head_dims())
        _check_indices(self, *self.model_shape())
        if self.parse_weight > 0 and not self.cell_words:
            raise ConfigError("train.parse_weight", "the asked-cell probe reads the cell words: set train.cell_words=true")


# ------------------------------------------------------------------------------------------ examples
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


def question_evidence(q) -> list[int]:
    """Video token indices (frame * 16 + cell) a question's answer has to look at (the generator's
    ``evidence_cells``: the needle of detail, the asked cell in the last frame of current, the ball's run of
    motion); empty for the other types."""
    return [f * TOKENS_PER_FRAME + c for f, c in q.meta.get("evidence_cells", [])]


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


# --------------------------------------------------------------------------------------------- model
def pixels_of(frames: np.ndarray, mean=(0.5,) * 3, std=(0.5,) * 3) -> torch.Tensor:
    """As ``VideoLLM.preprocess`` for frames already at the model's size."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


def visual_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """As ``VideoLLM.encode_frames`` (vision tower, last hidden state, projector, 2x pooling), with grad."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    feats = out.hidden_states[model.config.vision_feature_layer]
    feats = model.model.multi_modal_projector(feats)
    return model.model.apply_pooling(feats)


def rotate_batched(rope: RotaryTable, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``rope.rotate`` with per-item positions: x (B, H, L, d), pos (B, L)."""
    inv = rope.inv_freq.to(pos.device)
    freqs = pos.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


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


@dataclass
class AttentionTargets:
    """Answer-side attention supervision of one forward: at each question's answer position, the context
    entries (and, with ``question_target``, the question's own tokens) it should attend to. ``attend`` fills
    ``log_mass`` with, per supervised layer, the log of the attention mass each head puts on them,
    (B, H, n_q)."""

    layers: tuple[int, ...]
    answer_pos: torch.Tensor  # (B, n_q) index of the answer position within its question (-1: no question)
    target: torch.Tensor  # (B, n_q, C) bool over the layout's context
    head: str = "best"  # which heads are supervised: best (any one), mean (all of them), or one index ("0")
    question_target: torch.Tensor | None = None  # (B, n_q, q_len) bool over each question's own tokens
    log_mass: list[torch.Tensor] = field(default_factory=list)  # per layer, (B, H, n_q)

    def record(self, probs: torch.Tensor, allowed: torch.Tensor, q_len: int) -> None:
        """Keep the log of the attention mass each head puts on the targets (``probs`` / ``allowed`` as
        ``_answer_attention`` returns them)."""
        n_q, c = self.target.shape[1:]
        tgt = torch.zeros_like(allowed)
        tgt[..., :c] = self.target
        if self.question_target is not None:  # question j's own tokens sit at c + j * q_len ...
            for j in range(n_q):
                tgt[:, j, c + j * q_len: c + (j + 1) * q_len] = self.question_target[:, j]
        tgt = torch.where(tgt.any(-1, keepdim=True), tgt, allowed)  # no evidence: mass 1 (excluded from the loss)
        self.log_mass.append((probs * tgt[:, None]).sum(-1).clamp_min(1e-30).log())

    def loss(self) -> torch.Tensor | None:
        """-log(mass) of the best supervised layer, averaged over the questions that have evidence in context.
        Within a layer, ``head`` picks the mass: the best head's (a different head may serve each question),
        the mean over heads (every head should attend there), or one fixed head's."""
        valid = self.target.any(-1) & (self.answer_pos >= 0)
        if self.question_target is not None:
            valid = valid | (self.question_target.any(-1) & (self.answer_pos >= 0))
        if not self.log_mass or not bool(valid.any()):
            return None
        per_layer = torch.stack(self.log_mass)  # (layers, B, H, n_q)
        if self.head == "best":
            per_layer = per_layer.amax(2)
        elif self.head == "mean":  # log of the heads' mean mass: bounded by the best head's loss + log(H)
            per_layer = per_layer.logsumexp(2) - math.log(per_layer.shape[2])
        else:
            per_layer = per_layer[:, :, int(self.head)]
        return -per_layer.amax(0)[valid].mean()


@dataclass
class EncodingTargets:
    """Attention supervision inside a causal encoding (contiguous positions): query rows that should attend to
    one earlier key each (a ball token to the ball of the frame before). ``attend`` fills ``log_prob`` with,
    per supervised layer, the log attention of the best head from each row to its key, (B, R)."""

    layers: tuple[int, ...]
    rows: torch.Tensor  # (B, R) indices into [init | video]
    keys: torch.Tensor  # (B, R)
    valid: torch.Tensor  # (B, R) bool
    heads: tuple[int, ...] = ()  # the heads that may carry the pattern (() any)
    log_prob: list[torch.Tensor] = field(default_factory=list)
    # a diagnostic (experiments/nano_head_map.py): when a list, each supervised layer appends every head's
    # mean attention from the valid rows to their keys, (H,)
    head_mass: list[torch.Tensor] | None = None

    def loss(self) -> torch.Tensor | None:
        """-log(attention) of the best (layer, head) from each row to its key, averaged."""
        if not self.log_prob or not bool(self.valid.any()):
            return None
        return -torch.stack(self.log_prob).amax(0)[self.valid].mean()


def _answer_attention(qq, keys, mask, scaling: float, answer_pos: torch.Tensor,
                      q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's attention at each question's answer position, (B, H, n_q, K), and which keys that position
    may see, (B, n_q, K)."""
    b, h, _, d = qq.shape
    n_q = answer_pos.shape[1]
    rows = (torch.arange(n_q, device=qq.device)[None, :] * q_len + answer_pos.clamp(min=0))  # (B, n_q)
    qa = qq.gather(2, rows[:, None, :, None].expand(b, h, n_q, d))
    allowed = mask.gather(1, rows[..., None].expand(-1, -1, mask.shape[-1]))  # (B, n_q, K)
    return attention_weights(qa, keys, scaling, allowed[:, None]), allowed


@dataclass
class CountTargets:
    """Counting supervision of one forward: at each "count" answer position, head ``head`` of layer ``layer``
    should attend with ``target``, a distribution over the context (uniform over the rings in context and the
    n init-prompt tokens, a constant sink: its output then moves with k / (k + n) for k rings, the way a
    transformer can count; with n = 11 the steps between counts stay within 1.6x of each other, where one
    sink token would leave 0, 1/2, 2/3, 3/4, 4/5).
    ``record`` keeps the cross-entropy to it."""

    layer: int
    head: int
    answer_pos: torch.Tensor  # (B, n_q)
    target: torch.Tensor  # (B, n_q, C) float, rows sum to 1 (all zero: not a count question)
    cross_entropy: list[torch.Tensor] = field(default_factory=list)

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def record(self, probs: torch.Tensor, allowed: torch.Tensor, q_len: int) -> None:
        c = self.target.shape[-1]
        valid = (self.target.sum(-1) > 0) & (self.answer_pos >= 0)
        if bool(valid.any()):
            ce = -(self.target * probs[:, self.head, :, :c].clamp_min(1e-30).log()).sum(-1)  # (B, n_q)
            self.cross_entropy.append(ce[valid].mean())

    def loss(self) -> torch.Tensor | None:
        return self.cross_entropy[0] if self.cross_entropy else None


def count_targets(layout: Layout, examples: list[Example], qb: QuestionBatch, n_init: int, layer: int,
                  head: int) -> CountTargets:
    """Each "count" question's target distribution over ``layout``'s context: the rings it can see (a ring
    dropped by the layout cannot be counted; the answer loss still asks the true count) and the init prompt."""
    b, c = layout.ctx_idx.shape
    target = torch.zeros(b, qb.n_q, c)
    for i, ex in enumerate(examples):
        rings = [n_init + t for t in (ex.token_index(r) for r in ex.ring_tokens) if t is not None]
        seen = torch.isin(layout.ctx_idx[i], torch.tensor(rings, dtype=torch.long)) & layout.ctx_valid[i]
        seen |= (layout.ctx_idx[i] < n_init) & layout.ctx_valid[i]  # every layout's context keeps the init prompt
        for j, q in enumerate(ex.questions):
            if q.qtype == "count":
                target[i, j] = seen.float() / seen.sum()
    return CountTargets(layer, head, qb.answer_pos, target)


def _encoding_log_prob(qe, ke, scaling: float, targets: EncodingTargets, rope: RotaryTable) -> torch.Tensor:
    """log(attention) from each supervised row of a causal encoding (positions = indices) to its key, best
    head (of ``targets.heads``): (B, R)."""
    b, h, n, d = qe.shape
    rows = targets.rows.to(qe.device)
    r = rows.shape[1]
    qa = rotate_batched(rope, qe.gather(2, rows[:, None, :, None].expand(b, h, r, d)), rows)
    kk = rope.rotate(ke, torch.arange(n, device=qe.device))
    causal = torch.arange(n, device=qe.device)[None, None, :] <= rows[..., None]  # (B, R, n)
    probs = attention_weights(qa, kk, scaling, causal[:, None])  # (B, H, R, n)
    picked = probs.gather(3, targets.keys.to(qe.device)[:, None, :, None].expand(b, h, r, 1)).squeeze(-1)
    if targets.head_mass is not None:
        targets.head_mass.append(picked.detach().transpose(0, 1)[:, targets.valid.to(qe.device)].mean(1))
    if targets.heads:
        picked = picked[:, list(targets.heads)]
    return picked.clamp_min(1e-30).log().amax(1)


def layout_attention(layout: Layout, n_init: int, n_video: int, q_len: int, n_q: int, rope: RotaryTable,
                     targets: Sequence[AttentionTargets | CountTargets] = (),
                     encoding_targets: Sequence[EncodingTargets] = ()):
    """The per-layer attention callable of one training forward (sequence: init | video | questions)."""
    n_enc = n_init + n_video

    def attend(idx: int, q, k, v, scaling):
        b = q.shape[0]
        qe, ke, ve = q[:, :, :n_enc], k[:, :, :n_enc], v[:, :, :n_enc]
        for et in encoding_targets:
            if idx in et.layers and layout.encoding == "causal":
                et.log_prob.append(_encoding_log_prob(qe, ke, scaling, et, rope))
        # ---- encoding (init + video)
        if layout.encoding in ("causal", "window"):
            kv = SinkWindowKV(layout.n_local if layout.encoding == "window" else None, query_block=1 << 20,
                              block_tokens=TOKENS_PER_FRAME)  # the sinks as sliding_window's defaults
            out_init = kv.attend_and_append(qe[:, :, :n_init], ke[:, :, :n_init], ve[:, :, :n_init], scaling, rope)
            kv.set_init(kv.k, kv.v)
            out_vid = kv.attend_and_append(qe[:, :, n_init:], ke[:, :, n_init:], ve[:, :, n_init:], scaling, rope)
            enc_out = torch.cat((out_init, out_vid), dim=-2)
        else:  # blocks: each block attends to the init prompt and (causally) to itself
            dev = q.device
            init_pos = torch.arange(n_init, device=dev)
            vid_pos = n_init + layout.offset
            out_init = grouped_sdpa(rope.rotate(qe[:, :, :n_init], init_pos), rope.rotate(ke[:, :, :n_init], init_pos),
                                    ve[:, :, :n_init], scaling, torch.ones(n_init, n_init, dtype=torch.bool,
                                                                           device=dev).tril())
            qv = rope.rotate(qe[:, :, n_init:], vid_pos)
            keys = torch.cat((rope.rotate(ke[:, :, :n_init], init_pos), rope.rotate(ke[:, :, n_init:], vid_pos)), -2)
            t = torch.arange(n_video, device=dev)
            same = (layout.block_of[:, None] == layout.block_of[None, :]) & (t[None, :] <= t[:, None])
            mask = torch.cat((torch.ones(n_video, n_init, dtype=torch.bool, device=dev), same), dim=1)
            out_vid = grouped_sdpa(qv, keys, ve, scaling, mask)
            enc_out = torch.cat((out_init, out_vid), dim=-2)
        # ---- questions: the recalled context (re-rotated per layout) + their own tokens, causally
        hk, d = ke.shape[1], ke.shape[-1]
        gather = layout.ctx_idx[:, None, :, None].expand(b, hk, -1, d)
        kc = rotate_batched(rope, ke.gather(2, gather), layout.ctx_pos)
        vc = ve.gather(2, gather)
        qpos = (layout.q_start[:, None] + torch.arange(q_len, device=q.device)[None, :]).repeat(1, n_q)
        qq = rotate_batched(rope, q[:, :, n_enc:], qpos)
        kq = rotate_batched(rope, k[:, :, n_enc:], qpos)
        c = kc.shape[-2]
        j = torch.arange(n_q * q_len, device=q.device)
        own = ((j[:, None] // q_len) == (j[None, :] // q_len)) & (j[None, :] <= j[:, None])
        mask = torch.cat((layout.ctx_valid[:, None, :].expand(b, n_q * q_len, c), own.expand(b, -1, -1)), dim=-1)
        question_keys = torch.cat((kc, kq), -2)  # what the question tokens see: the context, then their own
        out_q = grouped_sdpa(qq, question_keys, torch.cat((vc, v[:, :, n_enc:]), -2), scaling, mask[:, None])
        # the answer positions' attention, once per layer and answer-position tensor (the supervised signals of
        # one forward share the batch's), for every target supervising this layer
        answer_attention: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for t in targets:
            if idx in t.layers:
                key = id(t.answer_pos)
                if key not in answer_attention:
                    answer_attention[key] = _answer_attention(qq, question_keys, mask, scaling, t.answer_pos,
                                                                q_len)
                t.record(*answer_attention[key], q_len)
        return torch.cat((enc_out, out_q), dim=-2)

    return attend


# ------------------------------------------------------------------------------------------- layouts
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


# ------------------------------------------------------------------------------------------- forward
class QuestionBatch:
    """Questions of a batch, padded to one length: token ids, loss targets, and answer positions."""

    def __init__(self, tokenizer, examples: list[Example], template: str = DEFAULT_QUESTION_TEMPLATE) -> None:
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = tokenizer.pad_token_id
        self.n_q = max(len(ex.questions) for ex in examples)
        seqs, self.types = [], []
        for ex in examples:
            row = []
            for q in ex.questions:
                prompt = tokenizer(template.format(question=q.question), add_special_tokens=False).input_ids
                answer = tokenizer(q.answer, add_special_tokens=False).input_ids + [eos]
                row.append((prompt, answer, q.qtype))
            seqs.append(row)
        self.q_len = max(len(p) + len(a) for row in seqs for p, a, _ in row)
        b = len(examples)
        self.ids = torch.full((b, self.n_q, self.q_len), pad, dtype=torch.long)
        self.targets = torch.full((b, self.n_q, self.q_len), -100, dtype=torch.long)
        self.answer_pos = torch.full((b, self.n_q), -1, dtype=torch.long)  # where the first answer token is predicted
        self.answer_tok = torch.full((b, self.n_q), -1, dtype=torch.long)
        for i, row in enumerate(seqs):
            tys = []
            for j, (p, a, qt) in enumerate(row):
                seq = p + a
                self.ids[i, j, : len(seq)] = torch.tensor(seq)
                self.targets[i, j, len(p) - 1: len(seq) - 1] = torch.tensor(a)
                self.answer_pos[i, j] = len(p) - 1
                self.answer_tok[i, j] = a[0]
                tys.append(qt)
            self.types.append(tys)


def forward_layout(model, rope: RotaryTable, init_ids: list[int], visual: torch.Tensor, qb: QuestionBatch,
                   layout: Layout, targets: Sequence[AttentionTargets | CountTargets] = (),
                   hidden_out: list | None = None, encoding_targets: Sequence[EncodingTargets] = ()) -> torch.Tensor:
    """Logits (B, n_q, q_len, V) of the question tokens under ``layout``; ``visual`` is (B, T, D). With
    ``targets`` / ``encoding_targets`` the forward records the attention supervision; ``hidden_out``
    receives the hidden states of every layer (transformers' ``hidden_states`` tuple)."""
    lm = model.model.language_model
    b, n_video = visual.shape[:2]
    embed = lm.embed_tokens
    init = embed(torch.tensor(init_ids).view(1, -1)).expand(b, -1, -1)
    qe = embed(qb.ids.view(b, -1))
    embeds = torch.cat((init, visual.to(init.dtype), qe), dim=1)
    attend = layout_attention(layout, len(init_ids), n_video, qb.q_len, qb.n_q, rope, targets, encoding_targets)
    pos = torch.zeros(embeds.shape[:2], dtype=torch.long)
    out = lm(inputs_embeds=embeds, position_ids=pos, use_cache=False, mukv_attention=attend,
             attention_mask=attention_hook.handled_mask(embeds.device), output_hidden_states=hidden_out is not None)
    if hidden_out is not None:
        hidden_out.extend(out.hidden_states)
    hq = out.last_hidden_state[:, len(init_ids) + n_video:]
    return model.lm_head(hq).view(b, qb.n_q, qb.q_len, -1)


def attention_targets(layout: Layout, examples: list[Example], qb: QuestionBatch, n_init: int,
                      layers: tuple[int, ...], head: str = "best",
                      types: tuple[str, ...] = QUESTION_TYPES) -> AttentionTargets:
    """Each question's evidence tokens (``question_evidence``) as a mask over ``layout``'s context (questions
    of other ``types`` are not supervised)."""
    b, c = layout.ctx_idx.shape
    target = torch.zeros(b, qb.n_q, c, dtype=torch.bool)
    for i, ex in enumerate(examples):
        for j, q in enumerate(ex.questions):
            if q.qtype not in types:
                continue
            toks = [ex.token_index(t) for t in question_evidence(q)]
            toks = [n_init + t for t in toks if t is not None]
            if toks:
                target[i, j] = torch.isin(layout.ctx_idx[i], torch.tensor(toks)) & layout.ctx_valid[i]
    return AttentionTargets(layers, qb.answer_pos, target, head)


def motion_runs(ex: Example) -> list[tuple[list[int | None], str]]:
    """Each motion question's ball tokens in this example's frames (None: frame dropped) and its direction."""
    return [([ex.token_index(t) for t in question_evidence(q)], q.answer) for q in ex.questions
            if q.qtype == "motion"]


def pair_targets(pairs: list[list[tuple[int, int]]]) -> tuple[torch.Tensor, ...]:
    """(rows, keys, valid) of per-example (query row, key) index pairs, padded to one length."""
    r = max(1, max(len(p) for p in pairs))
    rows = torch.zeros(len(pairs), r, dtype=torch.long)
    keys = torch.zeros(len(pairs), r, dtype=torch.long)
    valid = torch.zeros(len(pairs), r, dtype=torch.bool)
    for i, item in enumerate(pairs):
        for j, (a, b) in enumerate(item):
            rows[i, j], keys[i, j], valid[i, j] = a, b, True
    return rows, keys, valid


def previous_ball_targets(examples: list[Example], n_init: int) -> tuple[torch.Tensor, ...]:
    """(rows, keys, valid) of the ball tokens of frames 2-4 of each motion run and the ball token of the
    frame before each, as indices into [init | video] (runs whose frames were dropped are left out)."""
    pairs: list[list[tuple[int, int]]] = []
    for ex in examples:
        item = []
        for run, _ in motion_runs(ex):
            item += [(n_init + a, n_init + b) for b, a in zip(run[:-1], run[1:], strict=True)
                     if a is not None and b is not None]
        pairs.append(item)
    return pair_targets(pairs)


def shown_needles(ex: Example) -> list[tuple[int, str]]:
    """(token in this example's frames, shape) of each needle whose frame is kept, in time order."""
    return [(t, shape) for t, shape in ((ex.token_index(t), shape) for t, shape in ex.needle_tokens) if t is not None]


def earlier_needle_targets(examples: list[Example], n_init: int) -> tuple[torch.Tensor, ...]:
    """(rows, keys, valid): each needle token with each needle token before it, as indices into [init | video]."""
    pairs = []
    for ex in examples:
        shown = shown_needles(ex)
        pairs.append([(n_init + t, n_init + u) for k, (t, _) in enumerate(shown) for u, _ in shown[:k]])
    return pair_targets(pairs)


def word_scores(proj: torch.nn.Linear, h: torch.Tensor, words: torch.nn.Embedding, ids: list[int]) -> torch.Tensor:
    """A probe's logits over answer words: the layer-normed hidden state through ``proj``, dotted with the
    embeddings of the words ``ids`` (what the order, motion, asked-cell and count probes score against)."""
    return proj(F.layer_norm(h, h.shape[-1:])) @ words.weight[ids].T


class OrderProbe(torch.nn.Module):
    """Auxiliary training head (not part of the checkpoint): puts into each needle's token which needles came
    before it. Under a causal encoding a needle token can attend to the needles before it (``attend_layers``
    supervises that); the probe reads the hidden state after layer ``layer`` there and scores it, through a
    learned map, against the needle words' embeddings, one yes / no per needle shape. "Which came first, the
    X or the Y?" is then answered by copying the needle word the later of the two carries, as a detail
    answer copies a colour."""

    def __init__(self, hidden: int, layer: int, attend_layers: tuple[int, ...], words: torch.nn.Embedding,
                 needle_ids: list[int], attend_heads: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.layer, self.attend_layers, self.attend_heads = layer, tuple(attend_layers), tuple(attend_heads)
        self.words = [words]  # a list: not a submodule (the model owns it)
        self.needle_ids = needle_ids
        self.head = torch.nn.Linear(hidden, hidden)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return word_scores(self.head, h, self.words[0], self.needle_ids)

    def loss(self, hidden: tuple[torch.Tensor, ...], examples: list[Example], n_init: int) -> torch.Tensor | None:
        """Binary cross-entropy, per needle shape, of "shown before this needle" at every needle token
        (None: no needle in the batch)."""
        rows, cols, labels = [], [], []
        for i, ex in enumerate(examples):
            shown = shown_needles(ex)
            for k, (t, _) in enumerate(shown):
                before = {shape for _, shape in shown[:k]}
                rows.append(i)
                cols.append(n_init + t)
                labels.append([float(s in before) for s in NEEDLE_SHAPES])
        if not rows:
            return None
        h = hidden[self.layer][torch.tensor(rows), torch.tensor(cols)]
        return F.binary_cross_entropy_with_logits(self.logits(h), torch.tensor(labels))


def make_order_probe(model, tokenizer, cfg: TrainSettings) -> OrderProbe | None:
    """The earlier-needles probe ``cfg`` asks for (None with ``order_weight`` 0)."""
    if cfg.order_weight <= 0:
        return None
    return OrderProbe(model.config.text_config.hidden_size, cfg.order_layer, tuple(cfg.order_attend_layers),
                      model.get_input_embeddings(), tokenizer.convert_tokens_to_ids(list(NEEDLE_SHAPES)),
                      tuple(cfg.order_attend_heads))


class MotionProbe(torch.nn.Module):
    """Auxiliary training head (not part of the checkpoint): puts a ball run's direction into its ball tokens.

    A ball run crosses a row or column one cell per frame. Under a causal encoding, the ball token of each
    frame after the first can attend to the ball of the frame before and read its cell (the visual tokens
    carry their row and column, see :class:`CellProbe`); the direction is the step between the two cells.
    The probe reads the language model's hidden state after layer ``layer`` at those ball tokens: with
    ``words`` (``TrainSettings.motion_words``, the recipe) a learned map scored by dot product against the
    four direction words' embeddings, so the direction the ball tokens learn is tied to the answer words;
    without, a free linear head. ``attend_layers`` supervises the attention that finds the previous ball
    (some head of those layers puts its attention on it). The answer then only has to find the ball and copy, as it does for a
    needle's colour (the answer-side attention is ``TrainSettings.attend_weight``'s).

    Without it the shipped recipe answered motion questions at chance, "down" two times in three, with the
    four direction embeddings at cosine 0.99. A cosine to those (collapsed) word embeddings, as the
    colour / shape probe uses, did not learn in 60 steps from that checkpoint; the linear head did, and the
    dot product against the words (with ``answer_word_separation`` keeping them apart) took motion to 100%."""

    def __init__(self, hidden: int, layer: int, attend_layers: tuple[int, ...] = (),
                 words: torch.nn.Embedding | None = None, direction_ids: list[int] | None = None,
                 attend_heads: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.layer, self.attend_layers, self.attend_heads = layer, tuple(attend_layers), tuple(attend_heads)
        self.words = [words] if words is not None else None  # a list: not a submodule (the model owns it)
        self.direction_ids = direction_ids
        self.head = torch.nn.Linear(hidden, hidden if words is not None else len(DIRECTIONS))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.words is None:
            return self.head(F.layer_norm(h, h.shape[-1:]))
        return word_scores(self.head, h, self.words[0], self.direction_ids)

    def loss(self, hidden: tuple[torch.Tensor, ...], examples: list[Example], n_init: int) -> torch.Tensor | None:
        """Cross-entropy over the directions at the run's ball tokens after its first frame (None: no run)."""
        rows, cols, labels = [], [], []
        for i, ex in enumerate(examples):
            for run, direction in motion_runs(ex):
                for t in run[1:]:
                    if t is not None:
                        rows.append(i)
                        cols.append(n_init + t)
                        labels.append(DIRECTIONS.index(direction))
        if not rows:
            return None
        h = hidden[self.layer][torch.tensor(rows), torch.tensor(cols)]
        return F.cross_entropy(self.logits(h), torch.tensor(labels))


def make_motion_probe(model, tokenizer, cfg: TrainSettings) -> MotionProbe | None:
    """The direction-word probe ``cfg`` asks for (None with ``motion_weight`` 0)."""
    if cfg.motion_weight <= 0:
        return None
    hidden = model.config.text_config.hidden_size
    heads = tuple(cfg.motion_attend_heads)
    if not cfg.motion_words:
        return MotionProbe(hidden, cfg.motion_layer, tuple(cfg.motion_attend_layers), attend_heads=heads)
    return MotionProbe(hidden, cfg.motion_layer, tuple(cfg.motion_attend_layers), model.get_input_embeddings(),
                       tokenizer.convert_tokens_to_ids(list(DIRECTIONS)), heads)


def answer_positions(examples: list[Example], qb: QuestionBatch, n_context: int,
                     qtype: str) -> tuple[torch.Tensor, torch.Tensor, list] | None:
    """(batch rows, sequence positions, questions) of every ``qtype`` question's answer position in a forward
    whose questions start at ``n_context`` (None: no such question in the batch)."""
    items, cols, questions = [], [], []
    for i, ex in enumerate(examples):
        for j, q in enumerate(ex.questions):
            if q.qtype == qtype:
                items.append(i)
                cols.append(n_context + j * qb.q_len + int(qb.answer_pos[i, j]))
                questions.append(q)
    if not items:
        return None
    return torch.tensor(items), torch.tensor(cols), questions


class CountProbe(torch.nn.Module):
    """Counting readout: at each "count" answer position, the hidden state after ``layer`` layers names the
    number of rings through one learned map against the digit words' embeddings.

    The counting head (``CountTargets``) matched its attention target in every run, yet with the order probe
    in the recipe count answers fell from 99% to 60-68% in range, over-counting on streams without needles or
    balls: the error sits in how the later layers read the head's output. This puts that reading one layer
    after the head, on the words the answer must produce."""

    def __init__(self, hidden: int, layer: int, words: torch.nn.Embedding, digit_ids: list[int]) -> None:
        super().__init__()
        self.layer = layer
        self.words = [words]  # a list: not a submodule (the model owns it)
        self.digit_ids = digit_ids
        self.map = torch.nn.Linear(hidden, hidden, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return word_scores(self.map, h, self.words[0], self.digit_ids)

    def loss(self, hidden: tuple[torch.Tensor, ...], examples: list[Example], qb: QuestionBatch,
             n_context: int) -> torch.Tensor | None:
        """Cross-entropy to the true count (None: no count question in the batch)."""
        found = answer_positions(examples, qb, n_context, "count")
        if found is None:
            return None
        items, cols, questions = found
        return F.cross_entropy(self.logits(hidden[self.layer][items, cols]),
                               torch.tensor([int(q.answer) for q in questions]))


def make_count_probe(model, tokenizer, cfg: TrainSettings) -> CountProbe | None:
    """The counting readout ``cfg`` asks for (None with ``count_probe_weight`` 0)."""
    if cfg.count_probe_weight <= 0:
        return None
    digits = tokenizer.convert_tokens_to_ids([str(n) for n in range(MAX_RINGS + 1)])
    return CountProbe(model.config.text_config.hidden_size, cfg.count_probe_layer, model.get_input_embeddings(), digits)


class AskedCellProbe(torch.nn.Module):
    """Auxiliary training head (not part of the checkpoint): at each "current" question's answer position, the
    hidden state after ``layer`` layers (``hidden_states[layer]``) names the asked row and column, scored
    through one learned map each against the "row r" / "column c" word embeddings (``cell_words``).

    The question gives the cell in words; the answer has to find that cell's token in the last frame. The
    shipped recipe never moved the cell to the answer position (a linear probe there finds it at chance in
    every layer; layer 0 attends to the word "row", not the digit after it), so no lookup could form. With the
    cell words and this probe, fine-tuning the shipped checkpoint named the cell in 100% of held-out questions
    after 250 steps (``experiments/nano_current_pilot.py``)."""

    def __init__(self, hidden: int, layer: int, words: torch.nn.Embedding, row_ids: list[int],
                 col_ids: list[int], attend_layers: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.layer, self.attend_layers = layer, tuple(attend_layers)
        self.words = [words]  # a list: not a submodule (the model owns it)
        self.row_ids, self.col_ids = row_ids, col_ids
        self.row = torch.nn.Linear(hidden, hidden, bias=False)
        self.col = torch.nn.Linear(hidden, hidden, bias=False)

    def logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (word_scores(self.row, h, self.words[0], self.row_ids),
                word_scores(self.col, h, self.words[0], self.col_ids))

    def attention_targets(self, layout: Layout, examples: list[Example], qb: QuestionBatch) -> AttentionTargets:
        """Some head of ``attend_layers``, at each current question's answer position, attends to the
        question's "row r" and "column c" tokens (where the probe's answer is read from)."""
        current = torch.tensor([[q.qtype == "current" for q in ex.questions] + [False] * (qb.n_q - len(ex.questions))
                                for ex in examples])
        words = torch.isin(qb.ids, torch.tensor(self.row_ids + self.col_ids)) & current[..., None]
        no_context = torch.zeros(len(examples), qb.n_q, layout.ctx_idx.shape[1], dtype=torch.bool)
        return AttentionTargets(self.attend_layers, qb.answer_pos, no_context, "best", words)

    def read(self, hidden: tuple[torch.Tensor, ...], examples: list[Example], qb: QuestionBatch,
             n_context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(row logits, column logits, asked cell) at every current question's answer position (None: none
        in the batch); ``n_context`` is where the questions start in the forward's sequence."""
        found = answer_positions(examples, qb, n_context, "current")
        if found is None:
            return None
        items, cols, questions = found
        return (*self.logits(hidden[self.layer][items, cols]), torch.tensor([q.meta["cell"] for q in questions]))

    def loss(self, hidden: tuple[torch.Tensor, ...], examples: list[Example], qb: QuestionBatch,
             n_context: int) -> torch.Tensor | None:
        """Cross-entropy over the rows plus over the columns (None: no current question in the batch)."""
        read = self.read(hidden, examples, qb, n_context)
        if read is None:
            return None
        row_logits, col_logits, cell = read
        return F.cross_entropy(row_logits, cell // GRID) + F.cross_entropy(col_logits, cell % GRID)


def make_parse_probe(model, tokenizer, cfg: TrainSettings) -> AskedCellProbe | None:
    """The asked-cell probe ``cfg`` asks for (None with ``parse_weight`` 0)."""
    if cfg.parse_weight <= 0:
        return None
    from mukv.models.nano import cell_word_ids

    return AskedCellProbe(model.config.text_config.hidden_size, cfg.parse_layer, model.get_input_embeddings(),
                          *cell_word_ids(tokenizer), tuple(cfg.parse_attend_layers))


ANSWER_SETS: tuple[tuple[str, ...], ...] = (COLOUR_NAMES, OBJECT_SHAPES, NEEDLE_SHAPES, DIRECTIONS,
                                            tuple(str(n) for n in range(MAX_RINGS + 1)))


def answer_word_separation(words: torch.nn.Embedding, sets: list[list[int]], margin: float) -> torch.Tensor:
    """Mean over the pairs of each answer set of relu(cosine - margin)^2: zero while the set's words stay apart.

    The answer is read through the tied word embeddings, and words the model cannot yet tell apart get the
    same gradient, so they drift together; once together (up / down at cosine 0.98, the count digits at 0.60
    in the shipped checkpoint of 2026-11-27) the answer cannot name one rather than the other even when the
    hidden state knows it. This keeps the words distinct while the rest learns."""
    losses = []
    for ids in sets:
        e = F.normalize(words.weight[ids], dim=-1)
        cos = e @ e.T
        off = ~torch.eye(len(ids), dtype=torch.bool)
        losses.append(F.relu(cos[off] - margin).pow(2).mean())
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------------------------- training
def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * min(1.0, max(0.0, t))


def step_types(cfg: TrainSettings, progress: float,
               rng: random.Random | None = None) -> tuple[tuple[str, ...], int | None]:
    """Question types (and ring count) of this step: the needle colour alone first (one needle, no rings:
    the vision tower and the content-addressed attention must form before anything else can be learned),
    then count and current, then all five types."""
    if progress < cfg.detail_only_until:
        return ("detail",), 0
    if progress < cfg.all_types_from:
        return ("detail", "count", "current"), None
    if rng is not None and rng.random() < cfg.detail_share:
        return ("detail",), None
    return QUESTION_TYPES, None


def stream_types(cfg: TrainSettings, types: tuple[str, ...], rng: random.Random) -> tuple[str, ...]:
    """The types one training stream carries: the step's, or (a ``subset_share`` of the streams of all-type
    steps) a random non-empty subset of them, in their order."""
    if types != QUESTION_TYPES or cfg.subset_share <= 0 or rng.random() >= cfg.subset_share:
        return types
    while True:
        kept = tuple(t for t in types if rng.random() < 0.5)
        if kept:
            return kept


def sample_step(cfg: TrainSettings, progress: float, rng: random.Random) -> tuple[int, float, str]:
    """(frames, mean gap seconds, layout) for this step's batch."""
    if progress < cfg.short_phase:
        n = rng.randint(cfg.min_frames, min(4, cfg.max_frames))
    else:
        t = (progress - cfg.short_phase) / max(1e-9, cfg.ramp_end - cfg.short_phase)
        hi = int(round(_lerp(4, cfg.max_frames, t)))
        if cfg.mid_frames and hi > cfg.mid_frames:
            hi = hi if rng.random() < cfg.long_share else cfg.mid_frames
        n = rng.randint(cfg.min_frames, max(cfg.min_frames, hi))
    # no distractors at first, then their density ramps up to the benchmark's (a 4 s mean gap)
    gap = 1e6 if progress < cfg.empty_until else math.exp(
        _lerp(math.log(60.0), math.log(4.0), (progress - cfg.empty_until) / (cfg.ramp_end - cfg.empty_until)))
    if progress < cfg.full_only_until:
        layout = "full"
    else:
        names, w = zip(*cfg.layout_weights.items(), strict=True)
        layout = rng.choices(names, weights=w)[0]
    return n, gap, layout


def _frame_subsets(examples: list[Example], n_frames: int, rng: random.Random) -> tuple[int, list[list[int]]]:
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


def build_layout(name: str, examples: list[Example], n_init: int, n_frames: int, rng: random.Random):
    """(layout, frames kept per example): ``uniform`` re-encodes a subset, so it changes the frames."""
    b = len(examples)
    if name == "uniform":  # init + a subset of frames encoded fresh, contiguous (full on the subset)
        k, subsets = _frame_subsets(examples, n_frames, rng)
        return full_layout(b, n_init, k * TOKENS_PER_FRAME), [frames[:k] for frames in subsets]
    n_video = n_frames * TOKENS_PER_FRAME
    if name == "full":
        return full_layout(b, n_init, n_video), None
    if name == "window":
        # the window holds at least the last frames that carry evidence for "current"
        n_local = rng.randint(TOKENS_PER_FRAME, max(TOKENS_PER_FRAME, n_init + n_video))
        return window_layout(b, n_init, n_video, n_local), None
    if name == "rekv":
        return subset_layout(b, n_init, _frame_subsets(examples, n_frames, rng)[1]), None
    if name == "mukv":
        return blocks_layout(b, n_init, n_frames, examples, rng), None
    raise ValueError(name)


def _remap_current(ex: Example, kept: list[int]) -> Example:
    """Frames dropped by ``uniform``: the example keeps its questions (their evidence frames are kept)."""
    return Example(ex.frames[kept], ex.questions, ex.evidence_frames, ex.evidence_tokens,
                   None if ex.cell_colour is None else ex.cell_colour[kept],
                   None if ex.cell_shape is None else ex.cell_shape[kept], list(kept), ex.ring_tokens,
                   ex.needle_tokens)


class CellProbe(torch.nn.Module):
    """Auxiliary training head (not part of the checkpoint): each visual token's cell colour and shape, and
    optionally which cell it is.

    Dense per-cell supervision forms the vision tower in a few hundred steps; without it the answer loss
    alone leaves the model at chance for a long time (its only path to the pixels is through attention
    that is uniform at initialisation). The cell head (``cells``) asks each token to say where in the frame
    it lies: without it a linear probe finds the cell in 11% of tokens (chance 6%) while shape and colour are
    read perfectly, so "what is at row r column c" and a ball's direction could only come from position
    offsets, which the reordered layouts of ReKV and MuKV scramble.

    ``words`` (the language model's word embeddings) grounds the answer words: colour and shape are then
    scored by the cosine between the visual token and the embedding of the colour / shape *name*, and the
    cell by the row and column digits' embeddings (through one learned map each). Without it the shipped
    recipe fell into a symmetric trap: the embeddings of answer words the model had not yet learned to tell
    apart drifted together (circle / square / triangle, the digits, the directions reached cosine 0.99;
    cross / diamond 0.88), and the model answered "What colour was the cross?" and "... the diamond?" the
    same way in every stream. Tying the probe's classes to the words keeps them as far apart as what they
    name, and makes "copy the attended token" and "find the token like the asked word" one circuit for all
    shapes rather than one per shape."""

    def __init__(self, hidden: int, cells: bool = False, words: torch.nn.Embedding | None = None,
                 colour_ids: list[int] | None = None, shape_ids: list[int] | None = None,
                 row_ids: list[int] | None = None, col_ids: list[int] | None = None) -> None:
        super().__init__()
        self.words = [words] if words is not None else None  # a list: not a submodule (the model owns it)
        self.row = self.col = None  # word-grounded cell heads (words and cells)
        if words is None:
            self.colour = torch.nn.Linear(hidden, len(COLOUR_NAMES) + 1)
            self.shape = torch.nn.Linear(hidden, len(SHAPES) + 1)
            self.cell = torch.nn.Linear(hidden, TOKENS_PER_FRAME) if cells else None
        else:
            self.colour_ids, self.shape_ids = colour_ids, shape_ids
            self.row_ids, self.col_ids = row_ids, col_ids
            self.empty = torch.nn.Parameter(torch.randn(2, hidden) * 0.02)  # "no object" classes
            self.scale = torch.nn.Parameter(torch.tensor(10.0))
            self.cell = None
            if cells:
                self.row = torch.nn.Linear(hidden, hidden, bias=False)
                self.col = torch.nn.Linear(hidden, hidden, bias=False)

    def _word_logits(self, v: torch.Tensor, ids: list[int], empty: int) -> torch.Tensor:
        w = torch.cat((self.words[0].weight[ids], self.empty[empty: empty + 1]))
        return self.scale * F.normalize(v, dim=-1) @ F.normalize(w, dim=-1).T

    def loss(self, vis: torch.Tensor, examples: list[Example]) -> torch.Tensor:
        col = torch.from_numpy(np.concatenate([ex.cell_colour for ex in examples])).reshape(-1)
        shp = torch.from_numpy(np.concatenate([ex.cell_shape for ex in examples])).reshape(-1)
        v = vis.reshape(-1, vis.shape[-1])
        cell = torch.arange(TOKENS_PER_FRAME).repeat(v.shape[0] // TOKENS_PER_FRAME)  # raster order per frame
        if self.words is None:
            loss = F.cross_entropy(self.colour(v), col) + F.cross_entropy(self.shape(v), shp)
            if self.cell is not None:
                loss = loss + F.cross_entropy(self.cell(v), cell)
            return loss
        loss = (F.cross_entropy(self._word_logits(v, self.colour_ids, 0), col)
                + F.cross_entropy(self._word_logits(v, self.shape_ids, 1), shp))
        if self.row is not None:
            w = self.words[0].weight  # the words of "row r column c": the digits, or the cell words
            loss = loss + F.cross_entropy(self.row(v) @ w[self.row_ids].T, cell // GRID)
            loss = loss + F.cross_entropy(self.col(v) @ w[self.col_ids].T, cell % GRID)
        return loss


def make_probe(model, tokenizer, cfg: TrainSettings) -> CellProbe:
    """The auxiliary probe ``cfg`` asks for (word-grounded with ``probe_words``)."""
    hidden = model.config.text_config.hidden_size
    if not cfg.probe_words:
        return CellProbe(hidden, cells=cfg.probe_cells)
    ids = tokenizer.convert_tokens_to_ids
    if cfg.cell_words:  # rows against "row 1" .. "row 4", columns against "column 1" .. "column 4"
        from mukv.models.nano import cell_word_ids

        row_ids, col_ids = cell_word_ids(tokenizer)
    else:  # both against the digits "1" .. "4"
        row_ids = col_ids = ids([str(r + 1) for r in range(GRID)])
    return CellProbe(hidden, cells=cfg.probe_cells, words=model.get_input_embeddings(),
                     colour_ids=ids(list(COLOUR_NAMES)), shape_ids=ids(list(SHAPES)), row_ids=row_ids,
                     col_ids=col_ids)


@dataclass
class AuxLosses:
    """The auxiliary training signals of one step, each with its weight (0: off)."""

    probe: CellProbe | None = None
    probe_weight: float = 0.0
    attend_layers: tuple[int, ...] = ()
    attend_weight: float = 0.0
    attend_head: str = "best"
    attend_types: tuple[str, ...] = QUESTION_TYPES
    count_weight: float = 0.0
    count_layer: int = 1
    count_head: int = 0
    parse: AskedCellProbe | None = None
    parse_weight: float = 0.0
    motion: MotionProbe | None = None
    motion_weight: float = 0.0
    order: OrderProbe | None = None
    order_weight: float = 0.0
    count_probe: CountProbe | None = None
    count_probe_weight: float = 0.0
    answer_sets: list[list[int]] | None = None  # token ids of each answer set (answer_word_separation)
    separate_weight: float = 0.0
    separate_margin: float = 0.2


def batch_loss(model, rope, tokenizer, init_ids, examples: list[Example], layout_name: str,
               rng: random.Random, aux: AuxLosses | None = None,
               parts: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """The answer loss of one batch under ``layout_name`` plus the weighted ``aux`` losses (each one's value
    goes into ``parts`` when given), and first-answer-token accuracy per question type."""
    aux = aux or AuxLosses()
    n_frames = len(examples[0].frames)
    layout, kept = build_layout(layout_name, examples, len(init_ids), n_frames, rng)
    if kept is not None:
        examples = [_remap_current(ex, k) for ex, k in zip(examples, kept, strict=True)]
    frames = np.concatenate([ex.frames for ex in examples])
    vis = visual_tokens(model, pixels_of(frames))
    vis = vis.reshape(len(examples), -1, vis.shape[-1])
    qb = QuestionBatch(tokenizer, examples)
    targets = (attention_targets(layout, examples, qb, len(init_ids), aux.attend_layers, aux.attend_head,
                                 aux.attend_types) if aux.attend_weight > 0 else None)
    counting = (count_targets(layout, examples, qb, len(init_ids), aux.count_layer, aux.count_head)
                if aux.count_weight > 0 else None)
    parse = aux.parse if aux.parse is not None and aux.parse_weight > 0 else None
    parse_targets = parse.attention_targets(layout, examples, qb) if parse is not None and parse.attend_layers else None
    motion = aux.motion if aux.motion is not None and aux.motion_weight > 0 and layout.encoding == "causal" else None
    previous_ball = (EncodingTargets(motion.attend_layers, *previous_ball_targets(examples, len(init_ids)),
                                     heads=motion.attend_heads)
                     if motion is not None and motion.attend_layers else None)
    order = aux.order if aux.order is not None and aux.order_weight > 0 and layout.encoding == "causal" else None
    earlier_needle = (EncodingTargets(order.attend_layers, *earlier_needle_targets(examples, len(init_ids)),
                                      heads=order.attend_heads)
                      if order is not None and order.attend_layers else None)
    count_probe = aux.count_probe if aux.count_probe is not None and aux.count_probe_weight > 0 else None
    hidden: list | None = [] if any(p is not None for p in (motion, parse, order, count_probe)) else None
    logits = forward_layout(model, rope, init_ids, vis, qb, layout,
                            [t for t in (targets, parse_targets, counting) if t is not None], hidden,
                            [t for t in (previous_ball, earlier_needle) if t is not None])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), qb.targets.reshape(-1), ignore_index=-100)
    extra = {}
    if aux.probe is not None and aux.probe_weight > 0:
        extra["probe"] = (aux.probe_weight, aux.probe.loss(vis, examples))
    if targets is not None and aux.attend_weight > 0:
        extra["attend"] = (aux.attend_weight, targets.loss())
    if counting is not None:
        extra["count"] = (aux.count_weight, counting.loss())
    if motion is not None:
        extra["motion"] = (aux.motion_weight, motion.loss(tuple(hidden), examples, len(init_ids)))
        if previous_ball is not None:
            extra["previous_ball"] = (aux.motion_weight, previous_ball.loss())
    if order is not None:
        extra["order"] = (aux.order_weight, order.loss(tuple(hidden), examples, len(init_ids)))
        if earlier_needle is not None:
            extra["earlier_needle"] = (aux.order_weight, earlier_needle.loss())
    if parse is not None:
        extra["parse"] = (aux.parse_weight, parse.loss(tuple(hidden), examples, qb, len(init_ids) + vis.shape[1]))
        if parse_targets is not None:
            extra["parse_attend"] = (aux.parse_weight, parse_targets.loss())
    if count_probe is not None:
        extra["count_probe"] = (aux.count_probe_weight,
                                count_probe.loss(tuple(hidden), examples, qb, len(init_ids) + vis.shape[1]))
    if aux.answer_sets and aux.separate_weight > 0:
        extra["separate"] = (aux.separate_weight,
                             answer_word_separation(model.get_input_embeddings(), aux.answer_sets, aux.separate_margin))
    for name, (w, value) in extra.items():
        if value is not None:
            loss = loss + w * value
            if parts is not None:
                parts[name] = float(value.detach())
    with torch.no_grad():
        first = logits.gather(2, qb.answer_pos.clamp(min=0)[..., None, None].expand(-1, -1, 1, logits.shape[-1])).squeeze(2)
        right = (first.argmax(-1) == qb.answer_tok)
    stats: dict[str, list[int]] = {}
    for i, tys in enumerate(qb.types):
        for j, t in enumerate(tys):
            s = stats.setdefault(t, [0, 0])
            s[0] += int(right[i, j])
            s[1] += 1
    return loss, {k: (v[0], v[1]) for k, v in stats.items()}


@torch.no_grad()
def validate(model, rope, tokenizer, init_ids, cfg: TrainSettings, n_frames: int, layout: str = "full",
             batch: int = 16) -> dict[str, float]:
    """First-answer-token accuracy per type on validation streams (training seed range, never trained on)."""
    model.eval()
    rng = random.Random(1234)
    tot: dict[str, list[int]] = {}
    for a in range(0, cfg.val_videos, batch):
        exs = [make_example(VAL_SEED_BASE + a + i, n_frames, cfg.sample_fps, 4.0)
               for i in range(min(batch, cfg.val_videos - a))]
        _, st = batch_loss(model, rope, tokenizer, init_ids, exs, layout, rng)
        for k, (r, n) in st.items():
            t = tot.setdefault(k, [0, 0])
            t[0] += r
            t[1] += n
    model.train()
    acc = {k: r / n for k, (r, n) in tot.items()}
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc


def _check_indices(cfg: TrainSettings, heads: int, layers: int) -> None:
    """The head and layer indices the supervisions name exist in a model of ``heads`` x ``layers``."""
    if str(cfg.attend_head).isdigit() and int(cfg.attend_head) >= heads:  # the format is checked before
        raise ConfigError("train.attend_head", f"must be a head index below {heads}, got {cfg.attend_head!r}")
    if cfg.count_weight > 0 and cfg.count_head >= heads:
        raise ConfigError("train.count_head", f"must be a head index below {heads}, got {cfg.count_head}")
    for name in ("motion_attend_heads", "order_attend_heads"):
        if any(h >= heads for h in getattr(cfg, name)):
            raise ConfigError(f"train.{name}", f"must be head indices below {heads}, got {list(getattr(cfg, name))}")
    for name, on, layer in (("count_layer", cfg.count_weight > 0, cfg.count_layer),
                            ("order_layer", cfg.order_weight > 0, cfg.order_layer),
                            ("count_probe_layer", cfg.count_probe_weight > 0, cfg.count_probe_layer)):
        if on and not 0 <= layer < layers:
            raise ConfigError(f"train.{name}", f"must be a layer index below {layers}, got {layer}")


def _check_dims(dims: dict) -> None:
    """Head counts that the nano language model can be built with (checked before it is)."""
    from mukv.models.nano import NANO_DIMS

    d = {**NANO_DIMS, **dims}
    if d["text_hidden"] % d["text_heads"]:
        raise ConfigError("train.text_heads", f"must divide the hidden size {d['text_hidden']}, got {d['text_heads']}")
    if d["text_heads"] % d["text_kv_heads"]:
        raise ConfigError("train.text_kv_heads", f"must divide train.text_heads ({d['text_heads']}), got {d['text_kv_heads']}")


def train_nano(cfg: TrainSettings, out_dir: str | Path, publish_dir: str | Path | None = None) -> dict:
    """Train (from scratch, or on from ``init_from``); checkpoints go to ``out_dir`` (``last/`` and ``best/``),
    the best is copied to ``publish_dir`` when given. Returns the training record."""
    from mukv.models.nano import build_nano, load_nano_checkpoint, save_nano

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.bf16 is None:
        from mukv.models.loading import fast_bf16

        cfg = replace(cfg, bf16=fast_bf16("cpu"))
        log.info("train.bf16 auto -> %s", cfg.bf16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    if cfg.init_from:
        model, tokenizer = load_nano_checkpoint(cfg.init_from, field="train.init_from")
    else:
        model, tokenizer = build_nano(cfg.seed, cfg.cell_words, **cfg.head_dims())
    model.model.language_model.config._attn_implementation = attention_hook.register()
    model.train()
    rope = RotaryTable(model.model.language_model.rotary_emb.inv_freq)
    init_ids = tokenizer(DEFAULT_INIT_PROMPT, add_special_tokens=False).input_ids
    probe = make_probe(model, tokenizer, cfg)
    motion_probe = make_motion_probe(model, tokenizer, cfg)
    order_probe = make_order_probe(model, tokenizer, cfg)
    parse_probe = make_parse_probe(model, tokenizer, cfg)
    count_probe = make_count_probe(model, tokenizer, cfg)
    answer_sets = [tokenizer.convert_tokens_to_ids(list(words)) for words in ANSWER_SETS]
    params = list(model.named_parameters()) + list(probe.named_parameters())
    for extra_probe in (motion_probe, parse_probe, order_probe, count_probe):
        if extra_probe is not None:
            params += list(extra_probe.named_parameters())
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("nano: %.2fM parameters; %s", n_params / 1e6, asdict(cfg))
    history: list[dict] = []
    best = -1.0
    t0 = last_save = time.time()
    step, progress = 0, 0.0
    run_stats: dict[str, list[int]] = {}
    run_loss: list[float] = []
    run_parts: dict[str, list[float]] = {}
    record = {"settings": asdict(cfg), "parameters": n_params, "history": history}

    def save(tag: str, val: dict | None) -> None:
        nonlocal best
        rec = {**record, "steps": step, "progress": progress, "minutes": (time.time() - t0) / 60, "val": val}
        save_nano(model, tokenizer, out / "last", rec)
        if val is not None and val["mean"] >= best:
            best = val["mean"]
            save_nano(model, tokenizer, out / "best", {**rec, "best": True})
            if publish_dir is not None:
                _publish(out / "best", Path(publish_dir))
        log.info("saved %s checkpoint at step %d (val %s)", tag, step, val)

    while progress < 1.0:
        progress = max(step / cfg.steps, (time.time() - t0) / 60 / cfg.max_minutes)
        lr = cfg.lr * (min(1.0, progress / cfg.warmup) if progress < cfg.warmup else
                       0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (progress - cfg.warmup) / (1 - cfg.warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        n_frames, gap, layout = sample_step(cfg, progress, rng)
        seeds = [TRAIN_SEED_BASE + cfg.seed * 10_000_000 + step * cfg.batch_size + i for i in range(cfg.batch_size)]
        types, rings = step_types(cfg, progress, rng)
        examples = [make_example(s, n_frames, cfg.sample_fps, gap, types=stream_types(cfg, types, rng), rings=rings,
                                 questions=cfg.questions_per_stream or None) for s in seeds]
        aux = AuxLosses(probe=probe, probe_weight=cfg.aux_weight * (1.0 if progress < cfg.ramp_end else 0.25),
                        attend_layers=tuple(cfg.attend_layers),
                        attend_weight=cfg.attend_weight_at(progress),
                        attend_head=cfg.attend_head, count_weight=cfg.count_weight, count_layer=cfg.count_layer,
                        count_head=cfg.count_head, attend_types=tuple(cfg.attend_types), parse=parse_probe,
                        parse_weight=cfg.parse_weight, motion=motion_probe, motion_weight=cfg.motion_weight,
                        order=order_probe, order_weight=cfg.order_weight_at(progress),
                        count_probe=count_probe, count_probe_weight=cfg.weight_at("count_probe", progress),
                        answer_sets=answer_sets, separate_weight=cfg.separate_weight,
                        separate_margin=cfg.separate_margin)
        parts: dict[str, float] = {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, stats = batch_loss(model, rope, tokenizer, init_ids, examples, layout, rng, aux, parts)
        for k, v in parts.items():
            run_parts.setdefault(k, []).append(v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
        opt.step()
        step += 1
        run_loss.append(float(loss.detach()))
        for k, (r, n) in stats.items():
            s = run_stats.setdefault(k, [0, 0])
            s[0] += r
            s[1] += n
        if step % 25 == 0:
            accs = {k: round(r / max(1, n), 3) for k, (r, n) in run_stats.items()}
            entry = {"step": step, "progress": round(progress, 4), "min": round((time.time() - t0) / 60, 2),
                     "lr": round(lr, 6), "loss": round(float(np.mean(run_loss)), 4), "frames_max": n_frames,
                     "train_acc": accs, "aux": {k: round(float(np.mean(v)), 4) for k, v in run_parts.items()}}
            history.append(entry)
            log.info("%s", json.dumps(entry))
            run_stats, run_loss, run_parts = {}, [], {}
        if time.time() - last_save > cfg.save_every_s:
            save("periodic", validate(model, rope, tokenizer, init_ids, cfg, cfg.max_frames))
            last_save = time.time()
    val = validate(model, rope, tokenizer, init_ids, cfg, cfg.max_frames)
    save("final", val)
    return {**record, "steps": step, "val": val, "best_val_mean": best}


def _publish(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder over ``dst`` (the shipped asset folder), file by file."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)
