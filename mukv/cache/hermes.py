"""HERMES (arXiv 2601.14724): query-agnostic, layer-wise eviction of the video KV, as its released code.

Frames are prefilled over the init prompt and every kept token, each layer at its own next position (the
position after the last token it holds). Once a layer holds more than ``kv_size`` tokens (init prompt
included, as the code counts them), fixed pseudo-questions are run over the cache (not kept) and every layer
is cut back to ``kv_size`` video tokens, the same for all its heads, the init prompt always kept:

* *Scores by depth.* The layers are three tiers: the first ``short_ratio`` (short-term) score by recency alone,
  ``exp(-k dt)`` with ``dt`` the token's distance from the newest in cache order over the cache length and
  ``k`` 20; the last ``long_ratio`` (long-term) by the attention the global pseudo-question pays each token
  (averaged over heads and question tokens); the middle ones mix recency (weight 1 -> 0.1, ``k`` 20 -> 0.5 with
  depth) with the attention of the mixed pseudo-question (local + global). Each signal is min-max normalised.
* *Consistency.* From the second-to-last layer down, a layer's score becomes ``(1 - gamma)`` of its own plus
  ``gamma`` of the next layer's (already mixed), gamma 0.1 / 0.3 / 0.4 for short / middle / long layers,
  matching tokens by their index in the cache (linearly interpolated where lengths differ).
* *Summary.* A long-term layer keeps ``kv_size - 1`` tokens and folds all it drops into one summary token: the
  mean of their values and of their keys re-rotated to the position after the last kept token.
* *Positions.* Kept tokens keep their positions, so a layer's next tokens go after its last kept token (and
  its summary); when a position would pass the model's maximum minus ``compact_margin``, every layer's kept
  tokens are re-indexed to contiguous positions after the init prompt and their keys re-rotated.
* *Pseudo-questions.* The local one asks for the current scene, the global one for the narrative; after a
  question has been answered both are prefixed with that question and its answer (``history_prompts``).

The answer attends to everything kept, each layer from its own next position. The release is incomplete (its
``Abstract_Hermes`` base and run scripts are not published); what had to be decided without a reference is in
the README (section HERMES): when compression runs (after every ``compress_every`` frames), the default
``kv_size``, and which of the release's two scoring paths is reproduced (the eager forward's attention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mukv.cache.base import AnswerContext, register_cache
from mukv.cache.kept_kv import KeptKVCache
from mukv.cache.kernels import attention_weights, prefix_causal_mask, scalar
from mukv.errors import ConfigError
from mukv.models.rope import RotaryTable

RECENCY_K = 20.0  # the short-term layers' recency decay (published); the middle layers go from 20 to 0.5
MID_K_DROP, MID_ALPHA_DROP = 19.5, 0.9  # over the middle layers: k 20 -> 0.5, recency weight 1 -> 0.1
OPTION_MARKER = r"[A-Z]\) "  # removed from a remembered answer (published)
SUMMARY_TOKEN = -1  # video index of a summary token in ``tokens``


@dataclass(frozen=True)
class LayerTier:
    """How one layer scores: which pseudo-question's attention (``local`` / ``mixed`` / ``global``), the weight
    of recency against it, the recency decay, and gamma, the share of the next layer's score it takes."""

    name: str  # short | mid | long
    prompt: str  # local | mixed | global
    recency_weight: float
    recency_k: float
    gamma: float


def layer_tiers(num_layers: int, short_ratio: float, long_ratio: float,
                gammas: tuple[float, float, float]) -> list[LayerTier]:
    """The published memory hierarchy: layers below ``int(L x short_ratio)`` short-term, from
    ``int(L x (1 - long_ratio))`` on long-term, the middle ones interpolated by depth."""
    short_end, long_start = int(num_layers * short_ratio), int(num_layers * (1 - long_ratio))
    tiers = []
    for i in range(num_layers):
        if i < short_end:
            tiers.append(LayerTier("short", "local", 1.0, RECENCY_K, gammas[0]))
        elif i >= long_start:
            tiers.append(LayerTier("long", "global", 0.0, 0.0, gammas[2]))
        else:
            progress = (i - short_end) / (long_start - short_end)
            tiers.append(LayerTier("mid", "mixed", 1.0 - MID_ALPHA_DROP * progress,
                                   RECENCY_K - MID_K_DROP * progress, gammas[1]))
    return tiers


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Each row min-max normalised (the release normalises one layer's scores at a time)."""
    low = x.amin(-1, keepdim=True)
    return (x - low) / (x.amax(-1, keepdim=True) - low + scalar(1e-6))  # x in fp32


def tier_score(attention: torch.Tensor, tier: LayerTier) -> torch.Tensor:
    """One layer's raw score of its ``n`` cached tokens (cache order, oldest first) from the attention its
    pseudo-question pays them: min-max normalised attention and recency, weighted by the tier."""
    return tier_scores(attention[None], [tier])[0]


def tier_scores(attention: torch.Tensor, tiers: list[LayerTier]) -> torch.Tensor:
    """``tier_score`` of every layer at once: attention (layers, n), one tier per layer (the same values as one
    layer at a time, in one set of operator calls instead of one per layer)."""
    n = attention.shape[-1]
    device = attention.device
    distance = (n - 1 - torch.arange(n, device=device, dtype=torch.float32)) / max(n - 1, 1)
    knobs = torch.tensor([[-t.recency_k, 1 - t.recency_weight, t.recency_weight] for t in tiers],
                         dtype=torch.float32, device=device)  # (layers, 3): as fp32 as a Python float multiplies
    minus_k, attention_weight, recency_weight = knobs.unbind(-1)
    recency = torch.exp(minus_k[:, None] * distance)
    return _min_max(attention.float()) * attention_weight[:, None] + _min_max(recency) * recency_weight[:, None]


def consistent_scores(scores: list[torch.Tensor], tiers: list[LayerTier]) -> list[torch.Tensor]:
    """Each layer's score mixed with the next layer's, from the second-to-last layer down (cascading)."""
    out = list(scores)  # each layer's entry is replaced, never written into
    for i in range(len(out) - 2, -1, -1):
        below = out[i + 1]
        if below.shape[0] != out[i].shape[0]:
            below = torch.nn.functional.interpolate(below.view(1, 1, -1), size=out[i].shape[0], mode="linear",
                                                    align_corners=False).view(-1)
        out[i] = scalar(1 - tiers[i].gamma) * out[i] + scalar(tiers[i].gamma) * below  # fp32 scores
    return out


def history_prompts(local: str, global_: str, question: str, answer: str) -> tuple[str, str]:
    """The pseudo-questions after a conversation turn, as the release builds them (option-letter markers such
    as ``B) `` removed from the answer)."""
    turn = f"Question: {question} Answer: {re.sub(OPTION_MARKER, '', answer)}"
    return f"Find recent details related to: {turn}. {local}", f"Context summary: {turn}. {global_}"


@dataclass
class HermesRecall:
    """What an answer context held (``AnswerContext.detail``)."""

    compressions: int  # times the layers were cut back so far in this video
    compactions: int  # times positions were re-indexed (near the model's maximum)
    held_tokens: int  # video tokens (and summary) each layer holds
    layer_positions: list[int]  # each layer's next position


@register_cache("hermes")
@dataclass
class Hermes(KeptKVCache):
    """Layer-wise eviction by a recency-to-attention hierarchy over depth (see the module docstring)."""

    display_order = 55

    kv_frames: int = 32  # kv_size in frames' worth of tokens (no published default: this project's, as InfiniPot-V)
    kv_size: int | None = None  # video tokens each layer keeps (the release's kv_size); None: kv_frames' worth
    compress_every: int = 1  # frames between compressions (not published: after every frame keeps the budget strict)
    short_ratio: float = 0.1  # share of layers, first, scored by recency (published load_model: 0.1)
    long_ratio: float = 0.3  # share of layers, last, scored by attention and summarised (published: 0.3)
    gamma_short: float = 0.1  # share of the next layer's score in a short-term layer's (published)
    gamma_mid: float = 0.3
    gamma_long: float = 0.4
    history_prompts: bool = True  # prefix the pseudo-questions with the last question and answer (published)
    compact_margin: int = 1024  # re-index positions once one passes the model's maximum minus this (published)
    local_prompt: str = ("Describe the current scene in detail, focusing on specific objects, fine-grained actions, "
                         "and spatial relationships.")
    global_prompt: str = ("Summarize the video narrative, identifying main characters, key events, timeline "
                          "changes, and the overall theme.")

    @classmethod
    def budget_knobs(cls, frames: int, tokens_per_frame: int) -> dict:
        return {"kv_frames": int(frames), "kv_size": None}

    @classmethod
    def video_tokens(cls, knobs: dict, tokens_per_frame: int) -> int:
        size = knobs["kv_size"] if knobs["kv_size"] is not None else knobs["kv_frames"] * tokens_per_frame
        # between compressions up to compress_every - 1 more frames
        return int(size) + (int(knobs["compress_every"]) - 1) * tokens_per_frame

    def check_knobs(self, geometry) -> None:
        if self.kv_frames < 1:
            raise ConfigError("cache.kv_frames", f"must be at least 1 frame, got {self.kv_frames}")
        if self.kv_size is not None and self.kv_size < 2:
            raise ConfigError("cache.kv_size", f"must be at least 2 tokens (a long-term layer keeps kv_size - 1 "
                                               f"and a summary), got {self.kv_size}")
        if self.compress_every < 1:
            raise ConfigError("cache.compress_every", f"must be at least 1 frame, got {self.compress_every}")
        for name in ("short_ratio", "long_ratio", "gamma_short", "gamma_mid", "gamma_long"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"cache.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        if self.short_ratio + self.long_ratio > 1:
            raise ConfigError("cache.long_ratio", f"short_ratio + long_ratio must be at most 1, got "
                                                  f"{self.short_ratio} + {self.long_ratio}")
        if self.compact_margin < 0:
            raise ConfigError("cache.compact_margin", f"must be at least 0, got {self.compact_margin}")
        for name in ("local_prompt", "global_prompt"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"cache.{name}", "must be a non-empty pseudo-question")

    @property
    def layer_budget(self) -> int:
        return self.kv_size if self.kv_size is not None else self.kv_frames * self.geometry.tokens_per_frame

    # ---------------------------------------------------------------------------------- streaming
    def start_video(self, init_ids: list[int]) -> None:
        super().start_video(init_ids)
        n = self.geometry.num_layers
        device = self.init_k[0].device
        # every layer's kept tokens' positions (layers, held): each layer holds as many tokens (see ``_shrink``)
        self.positions = torch.empty(n, 0, dtype=torch.long, device=device)
        # each layer's next position, on the device (the host never waits for it while the stream plays), and an
        # upper bound of it on the host, exact after a compaction, for the compaction check
        self.next_pos = torch.full((n,), self.n_init, dtype=torch.long, device=device)
        self.next_bound = [self.n_init] * n
        self.tiers = layer_tiers(n, self.short_ratio, self.long_ratio,
                                 (self.gamma_short, self.gamma_mid, self.gamma_long))
        self.compressions = self.compactions = 0
        self.last_turn: tuple[str, str] | None = None
        text = self.llm.config.get_text_config() if hasattr(self.llm.config, "get_text_config") else self.llm.config
        self.max_positions = getattr(text, "max_position_embeddings", None)

    @property
    def next_positions(self) -> list[int]:
        """Each layer's next position (a read of the device's values: for answers and inspection)."""
        return self.next_pos.tolist()

    def prefill_position(self, layer: int, first_token: int) -> int:
        return int(self.next_pos[layer])

    def answer_positions(self) -> list[int]:
        return self.next_positions  # one read for every layer

    def rotations(self, first_token: int, length: int, device: torch.device):
        """Every layer's rotation table from its next position, built at once on the device (no read)."""
        positions = self.next_pos[:, None] + torch.arange(length, device=device)  # (layers, length)
        tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        rows: dict[tuple[torch.dtype, int], tuple[torch.Tensor, torch.Tensor]] = {}  # a layer's, for q and k

        def rotate(idx: int, x: torch.Tensor) -> torch.Tensor:
            row = rows.get((x.dtype, idx))
            if row is None:
                if x.dtype not in tables:
                    tables[x.dtype] = self.llm.rope.tables(positions, x.dtype)
                cos, sin = tables[x.dtype]
                row = rows[x.dtype, idx] = (cos[idx], sin[idx])
            return RotaryTable.apply(x, *row)

        return rotate

    def ingest(self, visual: torch.Tensor, first_frame: int) -> None:
        tpf, done = self.geometry.tokens_per_frame, 0
        while done < visual.shape[0]:
            frame = first_frame + done
            n = min(self.compress_every - frame % self.compress_every, visual.shape[0] - done)
            self.prefill(visual[done:done + n], frame)
            added = self.next_pos[:, None] + torch.arange(n * tpf, device=self.next_pos.device)  # (layers, n x tpf)
            self.positions = torch.cat((self.positions, added), dim=-1)
            self.next_pos = self.next_pos + n * tpf
            self.next_bound = [b + n * tpf for b in self.next_bound]
            done += n
            if (frame + n) % self.compress_every == 0 and self.n_init + self.held_tokens > self.layer_budget:
                self.compress()

    def observe_answer(self, question: str, answer: str) -> None:
        self.last_turn = (question, answer)

    def pseudo_questions(self) -> dict[str, str]:
        local, global_ = self.local_prompt, self.global_prompt
        if self.history_prompts and self.last_turn is not None:
            local, global_ = history_prompts(local, global_, *self.last_turn)
        return {"local": local, "global": global_, "mixed": f"{local}; {global_}"}

    def pseudo_attention(self, text: str, layers: set[int]) -> dict[int, torch.Tensor]:
        """The attention the pseudo-question ``text`` (tokenized alone, at each layer's next position) pays each
        cached token after the init prompt, averaged over heads and its tokens, in ``layers``; its KV is not kept."""
        out: dict[int, torch.Tensor] = {}

        def observe(idx: int, q, q_rot, keys, vals, scaling):
            if idx in layers:
                probs = attention_weights(q_rot, keys, scaling, prefix_causal_mask(q.shape[-2], keys.shape[-2],
                                                                                   q.device))[0]
                out[idx] = probs.mean(0)[:, self.n_init:keys.shape[-2] - q.shape[-2]].mean(0)

        # the layers after the last one read compute what nobody reads (the mixed prompt's tier ends at the long
        # layers): the probe stops there (the same attention in the layers read)
        self.probe(self.llm.tokenize(text), observe, num_layers=max(layers) + 1)
        return out

    def compress(self) -> None:
        """Cut every layer back to ``kv_size`` video tokens (long-term layers: ``kv_size - 1`` and a summary)."""
        prompts = self.pseudo_questions()
        attention: dict[int, torch.Tensor] = {}
        for name in ("local", "global", "mixed"):
            layers = {i for i, t in enumerate(self.tiers) if t.prompt == name and t.recency_weight < 1}
            if layers:  # short-term layers (recency alone) need no attention
                attention.update(self.pseudo_attention(prompts[name], layers))
        held = self.held_tokens  # every layer holds as many
        no_attention = torch.zeros(held, device=self.keys[0].device)  # recency alone
        raw = tier_scores(torch.stack([attention.get(i, no_attention) for i in range(len(self.tiers))]), self.tiers)
        scores = consistent_scores(list(raw.unbind(0)), self.tiers)
        compact = False
        if self.max_positions is not None and max(self.next_bound) - 1 > self.max_positions - self.compact_margin:
            self.next_bound = self.next_positions  # near the limit only: read the exact positions
            compact = max(self.next_bound) - 1 > self.max_positions - self.compact_margin
        kept = []  # every layer's kept video indices and positions (as many in each: see ``_shrink``)
        for idx, tier in enumerate(self.tiers):
            budget = min(self.layer_budget - (tier.name == "long"), held)
            picked = scores[idx].topk(budget, sorted=False).indices.sort().values
            summary = tier.name == "long" and budget < held  # one more token, after the last kept one
            kept.append(self._shrink(idx, picked, held, summarise=tier.name == "long", compact=compact))
            # the next position is after the last kept token (or the summary): at most one past the old one
            self.next_bound[idx] = self.n_init + budget + summary if compact else self.next_bound[idx] + summary
        self.tokens = torch.stack([tokens for tokens, _ in kept])
        self.positions = torch.stack([positions for _, positions in kept])
        # every layer's next position, on the device: the next prefill rotates from it without a read
        self.next_pos = self.positions[:, -1] + 1 if self.positions.shape[-1] else \
            torch.full_like(self.next_pos, self.n_init)
        self.compressions += 1
        self.compactions += int(compact)

    def _shrink(self, idx: int, picked: torch.Tensor, held: int, summarise: bool,
                compact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep ``picked`` (sorted indices of the ``held`` tokens) in layer ``idx``; ``summarise``: the dropped ones
        become one summary token after the last kept one. Returns the layer's kept video indices (kv_heads, n)
        and positions (n,), as many in every layer: ``min(kv_size, held)`` (a long-term layer ``kv_size - 1``
        and the summary whenever it drops any). No value is read by the host (sizes are known)."""
        rope, keys, values = self.llm.rope, self.keys[idx], self.values[idx]
        positions, tokens = self.positions[idx], self.tokens[idx]
        kept_pos = torch.arange(self.n_init, self.n_init + picked.numel(), device=positions.device) if compact \
            else positions[picked]
        kept_k = keys[:, :, picked]
        if compact:
            kept_k = rope.rotate(kept_k, (kept_pos - positions[picked]).float())
        parts_k, parts_v = [kept_k], [values[:, :, picked]]
        parts_pos, parts_tok = [kept_pos], [tokens[:, picked]]
        n_drop = held - picked.numel()
        if summarise and n_drop > 0:
            dropped = torch.ones(held, dtype=torch.uint8, device=keys.device)
            dropped[picked] = 0
            gone = dropped.sort(descending=True, stable=True).indices[:n_drop]  # the dropped indices, in order
            at = kept_pos[-1:] + 1 if picked.numel() else positions.new_full((1,), self.n_init)
            moved = rope.rotate(keys[:, :, gone], (at - positions[gone]).float())
            parts_k.append(moved.mean(-2, keepdim=True))
            parts_v.append(values[:, :, gone].mean(-2, keepdim=True))
            parts_pos.append(at)
            parts_tok.append(torch.full((tokens.shape[0], 1), SUMMARY_TOKEN, device=tokens.device))
        if len(parts_k) == 1:  # no summary: the gathered tensors are the layer's (no copy by a cat of one)
            self.keys[idx], self.values[idx] = kept_k, parts_v[0]
            return parts_tok[0], kept_pos
        self.keys[idx], self.values[idx] = torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)
        return torch.cat(parts_tok, dim=-1), torch.cat(parts_pos)

    # ---------------------------------------------------------------------------------- recall
    def recall(self, question: str) -> AnswerContext[HermesRecall]:
        """Everything kept (query-agnostic: ``question`` is not read), each layer from its own next position."""
        return self.kept_context(HermesRecall(self.compressions, self.compactions, self.held_tokens,
                                              list(self.next_positions)))
