"""Training signals: what the loss adds to the answer loss, each a small class with its own config.

A signal's config is a dataclass with ``weight`` (0: off), ``until`` (the fraction of the schedule from which
it is off; null: never) and its own knobs; it is the one definition of those knobs (``recipe.py`` generates
the Hydra schema ``signals.<name>.*`` from it). Per training step the loop keeps the signals whose
``weight_at(progress)`` is positive; for each batch a signal says what the forward must record
(``targets``: attention recorders of ``forward.py``) and then returns its named loss terms (``loss``), which
the loop adds with its weight.

This module holds the interface, the attention targets at the answer positions (``attend``, ``count``) and
the answer-word regulariser (``separate``); ``probes.py`` holds the probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from mukv.data.synthetic import COLOUR_NAMES, DIRECTIONS, MAX_RINGS, NEEDLE_SHAPES, OBJECT_SHAPES, QUESTION_TYPES
from mukv.errors import ConfigError
from mukv_nano.examples import Example, question_evidence
from mukv_nano.forward import AttentionTargets, Batch, CountTargets, QuestionBatch
from mukv_nano.layouts import Layout

if TYPE_CHECKING:
    from mukv_nano.curriculum import Curriculum
    from mukv_nano.recipe import NetConfig


@dataclass
class SignalConfig:
    """The knobs every signal has."""

    weight: float = 0.0  # its weight in the loss (0: off, the signal is not even built)
    until: float | None = None  # off from this fraction of the schedule on (null: to the end)


@dataclass(frozen=True)
class ModelShape:
    """What the checks of a signal's layer / head indices need to know of the model the run trains."""

    heads: int
    layers: int
    cell_words: bool


class Signal(torch.nn.Module):
    """One training signal. A ``torch.nn.Module`` so that a probe's parameters are the signal's (the loop
    trains them with the model and drops them from the checkpoint); the model's own modules (its word
    embeddings) are held in lists, never as submodules, so that they are not trained twice."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[SignalConfig]] = SignalConfig
    reads_hidden: ClassVar[bool] = False  # needs every layer's hidden states from the forward
    causal_only: ClassVar[bool] = False  # supervises inside a causal encoding: off under other layouts

    def __init__(self, cfg: SignalConfig, model, tokenizer, net: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg

    @classmethod
    def knob(cls, name: str) -> str:
        """The Hydra path of one of this signal's knobs (what a ``ConfigError`` names)."""
        return f"signals.{cls.name}.{name}"

    @classmethod
    def check(cls, cfg: SignalConfig, shape: ModelShape) -> None:
        """Refuse, by name, values that cannot work, before any model loads."""
        if cfg.until is not None and not 0.0 <= cfg.until <= 1.0:
            raise ConfigError(cls.knob("until"), f"is a fraction of the schedule in [0, 1], got {cfg.until}")

    def weight_at(self, progress: float, curriculum: Curriculum) -> float:
        """The weight at this point of the schedule: off from ``until`` on."""
        until = self.cfg.until
        return self.cfg.weight if until is None or progress < until else 0.0

    def applies(self, layout: Layout) -> bool:
        return not self.causal_only or layout.encoding == "causal"

    def targets(self, batch: Batch) -> tuple:
        """The attention recorders the forward fills for this signal (``forward.py``); none by default."""
        return ()

    def loss(self, batch: Batch, targets: tuple) -> dict[str, torch.Tensor | None]:
        """Named loss terms (None: nothing to supervise in this batch), each added with ``weight_at``."""
        raise NotImplementedError


def _check_heads(cls: type[Signal], name: str, heads: list[int], shape: ModelShape) -> None:
    if any(h < 0 for h in heads):
        raise ConfigError(cls.knob(name), f"are head indices (>= 0), got {list(heads)}")
    if any(h >= shape.heads for h in heads):
        raise ConfigError(cls.knob(name), f"must be head indices below {shape.heads}, got {list(heads)}")


def _check_layer(cls: type[Signal], name: str, layer: int, shape: ModelShape) -> None:
    if not 0 <= layer < shape.layers:
        raise ConfigError(cls.knob(name), f"must be a layer index below {shape.layers}, got {layer}")


# ---------------------------------------------------------------------------------- answer attention
@dataclass
class AttendConfig(SignalConfig):
    weight: float = 1.0
    # ... only until this progress: released halfway, detail and motion came back (to 99 / 100% in range)
    # with current kept at 99%; to the end (nano_recipe=current) detail fell to 78%, motion and count to chance
    until: float | None = 0.5
    layers: list[int] = field(default_factory=lambda: [2, 3])  # the best of these layers is supervised
    head: str = "mean"  # best: any one head of a layer; mean: the heads' mean mass; "0", "1", ...: that head
    types: list[str] = field(default_factory=lambda: ["current"])  # the question types supervised


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


class AnswerAttention(Signal):
    """At the answer position of each question of ``types`` (detail / current / motion: the types whose
    evidence is a few tokens), the heads of the best of ``layers`` put their attention on the question's
    evidence tokens (the needle, the asked cell in the last frame, the ball's run): -log of that mass.

    The recipe supervises "current" only, the heads' mean of layer 2 or 3 (with the cell words and the
    asked-cell probe), until halfway. On every type at 1.0 (``best``) from scratch the heads found the
    needle, but detail training accuracy stalled at 43% (93% without it at the same step)."""

    name = "attend"
    Config = AttendConfig

    @classmethod
    def check(cls, cfg: AttendConfig, shape: ModelShape) -> None:
        head = str(cfg.head)
        if head not in ("best", "mean") and not head.isdigit():
            raise ConfigError(cls.knob("head"), f"must be 'best', 'mean' or a head index, got {head!r}")
        bad = [t for t in cfg.types if t not in QUESTION_TYPES]
        if bad:
            raise ConfigError(cls.knob("types"), f"unknown question types {bad}; choose from {list(QUESTION_TYPES)}")
        super().check(cfg, shape)
        if head.isdigit() and int(head) >= shape.heads:
            raise ConfigError(cls.knob("head"), f"must be a head index below {shape.heads}, got {cfg.head!r}")

    def targets(self, batch: Batch) -> tuple[AttentionTargets]:
        return (attention_targets(batch.layout, batch.examples, batch.qb, batch.n_init, tuple(self.cfg.layers),
                                  self.cfg.head, tuple(self.cfg.types)),)

    def loss(self, batch: Batch, targets: tuple[AttentionTargets]) -> dict[str, torch.Tensor | None]:
        return {"attend": targets[0].loss()}


# ------------------------------------------------------------------------------------ counting head
@dataclass
class CountConfig(SignalConfig):
    weight: float = 1.0
    layer: int = 1
    head: int = 3


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


class CountingHead(Signal):
    """At each "count" answer position, head ``head`` of layer ``layer`` spreads its attention uniformly over
    the ring tokens in context and the init prompt's n tokens (a constant sink; cross-entropy to that
    distribution). Its output then moves with k / (k + n) for k rings, which the later layers read out, the
    way a transformer can count; with n = 11 the steps between counts stay within 1.6x of each other, where
    one sink token would leave 0, 1/2, 2/3, 3/4, 4/5. Without it count training accuracy stayed at chance in
    every recipe; with it, count is 99% in range."""

    name = "count"
    Config = CountConfig

    @classmethod
    def check(cls, cfg: CountConfig, shape: ModelShape) -> None:
        super().check(cfg, shape)
        if cfg.layer < 0 or cfg.head < 0:
            raise ConfigError(cls.knob("layer" if cfg.layer < 0 else "head"), "must be a layer / head index (>= 0)")
        if cfg.weight > 0:
            if cfg.head >= shape.heads:
                raise ConfigError(cls.knob("head"), f"must be a head index below {shape.heads}, got {cfg.head}")
            _check_layer(cls, "layer", cfg.layer, shape)

    def targets(self, batch: Batch) -> tuple[CountTargets]:
        return (count_targets(batch.layout, batch.examples, batch.qb, batch.n_init, self.cfg.layer, self.cfg.head),)

    def loss(self, batch: Batch, targets: tuple[CountTargets]) -> dict[str, torch.Tensor | None]:
        return {"count": targets[0].loss()}


# --------------------------------------------------------------------------- answer-word separation
@dataclass
class SeparateConfig(SignalConfig):
    weight: float = 1.0
    margin: float = 0.2  # pairs of one answer set above this cosine are penalised


ANSWER_SETS: tuple[tuple[str, ...], ...] = (COLOUR_NAMES, OBJECT_SHAPES, NEEDLE_SHAPES, DIRECTIONS,
                                            tuple(str(n) for n in range(MAX_RINGS + 1)))


def answer_word_separation(words: torch.nn.Embedding, sets: list[list[int]], margin: float) -> torch.Tensor:
    """Mean over the pairs of each answer set of relu(cosine - margin)^2: zero while the set's words stay apart."""
    losses = []
    for ids in sets:
        e = F.normalize(words.weight[ids], dim=-1)
        cos = e @ e.T
        off = ~torch.eye(len(ids), dtype=torch.bool)
        losses.append(F.relu(cos[off] - margin).pow(2).mean())
    return torch.stack(losses).mean()


class AnswerWordSeparation(Signal):
    """A regulariser: within each answer set (colours, object shapes, needle shapes, directions, count digits)
    every pair of word embeddings above cosine ``margin`` is penalised.

    The answer is read through the tied word embeddings, and words the model cannot yet tell apart get the
    same gradient, so they drift together; once together (up / down at cosine 0.98, the count digits at 0.60
    in the shipped checkpoint of 2026-11-27) the answer cannot name one rather than the other even when the
    hidden state knows it. This keeps the words distinct while the rest learns."""

    name = "separate"
    Config = SeparateConfig

    def __init__(self, cfg: SeparateConfig, model, tokenizer, net: NetConfig) -> None:
        super().__init__(cfg, model, tokenizer, net)
        self.words = [model.get_input_embeddings()]  # a list: not a submodule (the model owns it)
        self.answer_sets = [tokenizer.convert_tokens_to_ids(list(words)) for words in ANSWER_SETS]

    def loss(self, batch: Batch, targets: tuple) -> dict[str, torch.Tensor | None]:
        return {"separate": answer_word_separation(self.words[0], self.answer_sets, self.cfg.margin)}
