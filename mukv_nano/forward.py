"""One training forward: the language model under a layout, through the streaming methods' attention hook.

The language model runs with position ids 0 and a per-layer attention callable (``mukv.models.attention_hook``,
the hook the streaming methods use), which computes in one forward over [init prompt | video | questions]:

* the **encoding** of the init prompt and the video tokens: ``causal`` (contiguous positions), ``window``
  (the sink + sliding-window encoding; it *is* :class:`SinkWindowKV`) or ``blocks`` (each block attends to
  the init prompt and itself, at positions init_len + offset);
* the **answer context** of every batch item (the layout's ``ctx_idx`` / ``ctx_pos``) and the position of
  its first prompt token;
* the **questions**: each question's tokens attend to the context and causally to themselves only (several
  questions share one encoded stream; a question's KV is never seen by another, as the engine never keeps
  it).

Signals ask the forward to record attention (the recorders below): at the answer positions
(:class:`AttentionTargets`, :class:`CountTargets`) or inside a causal encoding (:class:`EncodingTargets`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mukv.cache.attention import SinkWindowKV
from mukv.cache.kernels import attention_weights, grouped_sdpa
from mukv.models import attention_hook
from mukv.models.adapter import DEFAULT_QUESTION_TEMPLATE
from mukv.models.rope import RotaryTable
from mukv_nano.examples import TOKENS_PER_FRAME, Example
from mukv_nano.layouts import Layout


# ------------------------------------------------------------------------------------------- inputs
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


@dataclass
class Batch:
    """What the signals read: the batch's examples (frames as the layout kept them), questions, layout, where
    the video (``n_init``) and the questions (``n_context``) start in the forward's sequence, the visual tokens
    and, after the forward, every layer's hidden states (when a signal asked for them)."""

    examples: list[Example]
    qb: QuestionBatch
    layout: Layout | None = None
    n_init: int = 0
    n_context: int = 0
    visual: torch.Tensor | None = None  # (B, T, D)
    hidden: tuple[torch.Tensor, ...] | None = None


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


# ---------------------------------------------------------------------------------------- recorders
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
        ``answer_attention`` returns them)."""
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
class CountTargets:
    """Counting supervision of one forward: at each "count" answer position, head ``head`` of layer ``layer``
    should attend with ``target``, a distribution over the context (see ``signals.CountingHead``).
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


def answer_attention(qq, keys, mask, scaling: float, answer_pos: torch.Tensor,
                     q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's attention at each question's answer position, (B, H, n_q, K), and which keys that position
    may see, (B, n_q, K)."""
    b, h, _, d = qq.shape
    n_q = answer_pos.shape[1]
    rows = (torch.arange(n_q, device=qq.device)[None, :] * q_len + answer_pos.clamp(min=0))  # (B, n_q)
    qa = qq.gather(2, rows[:, None, :, None].expand(b, h, n_q, d))
    allowed = mask.gather(1, rows[..., None].expand(-1, -1, mask.shape[-1]))  # (B, n_q, K)
    return attention_weights(qa, keys, scaling, allowed[:, None]), allowed


def rotate_batched(rope: RotaryTable, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``rope.rotate`` with per-item positions: x (B, H, L, d), pos (B, L)."""
    inv = rope.inv_freq.to(pos.device)
    freqs = pos.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def encoding_log_prob(qe, ke, scaling: float, targets: EncodingTargets, rope: RotaryTable) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------------ forward
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
                et.log_prob.append(encoding_log_prob(qe, ke, scaling, et, rope))
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
        answer_probs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for t in targets:
            if idx in t.layers:
                key = id(t.answer_pos)
                if key not in answer_probs:
                    answer_probs[key] = answer_attention(qq, question_keys, mask, scaling, t.answer_pos, q_len)
                t.record(*answer_probs[key], q_len)
        return torch.cat((enc_out, out_q), dim=-2)

    return attend


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
