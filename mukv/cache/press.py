"""Text-LLM presses as per-block compressors of the video KV (kvpress's scorers, written from their definitions).

NVIDIA's ``kvpress`` compresses a text prefill once, keeping per KV head the tokens its press scores highest.
Here every block of ``block_frames`` frames is prefilled at its original positions over the init prompt and
everything kept (``KeptKVCache``), then cut to ``int(n x keep_ratio)`` of its ``n`` tokens by the press's scores;
earlier blocks are not touched again, so the cache grows at ``keep_ratio`` of the stream (no fixed budget) and
the answer attends to everything kept. ``kvpress`` itself requires transformers < 5.3 and is not installed (it
would downgrade the project's transformers); each press is its ``score`` written again from kvpress's
definition, in its own file.

One token set for all heads of a layer (kvpress keeps per head): the press's per-KV-head scores are averaged over
the KV heads, and the layer keeps the block's top tokens of that mean, in time order (layers choose apart).
Keys are scored as the model's cache holds them, rotated at their positions (KNorm does not care; SnapKV, TOVA
and ExpectedAttention need it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mukv.cache.base import AnswerContext
from mukv.cache.kept_kv import KeptKVCache
from mukv.cache.kernels import as_float, attention_weights, token_range
from mukv.errors import ConfigError


@dataclass
class PressBlock:
    """A block of frames being scored: where its tokens start among each layer's held tokens, how many, and the
    signals a press asked for (``ChunkPress.signals``), per layer, gathered while it was prefilled."""

    start: int  # index of its first token among the held tokens (the same in every layer and head)
    length: int = 0
    first_token: int = 0  # its first video token index (time)
    last_attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (1, q_heads, 1, visible)
    query_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (q_heads, d): pre-RoPE queries
    query_outer: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (q_heads, d, d)
    query_count: int = 0
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (kv_heads, n), a press's own pass


@dataclass
class PressRecall:
    """``AnswerContext.detail``: blocks compressed so far and the tokens each layer holds."""

    blocks: int
    held_tokens: int


@dataclass
class ChunkPress(KeptKVCache):
    """Base of the presses: block buffering, the per-head reduction and the keep rule. A press is a dataclass
    with ``score(block) -> (layers, kv_heads, block.length)`` (higher is kept) and the ``signals`` it needs.
    Every layer is scored at once (the block's keys of all layers side by side, ``block_keys``): one batched
    computation per block instead of one per layer (operator calls are host time on a GPU)."""

    block_frames: int = 8  # frames per compressed block (no published streaming setting: this project's)
    keep_ratio: float = 0.25  # share of each block's tokens kept (kvpress: 1 - compression_ratio)
    # what the prefill gathers for ``score``: "last_attention" (TOVA), "query_stats" (ExpectedAttention)
    signals: ClassVar[frozenset[str]] = frozenset()
    # queries whose statistics are gathered skip the block's first n_sink tokens (ExpectedAttention's n_sink)
    stats_skip: ClassVar[int] = 0

    def check_knobs(self, geometry) -> None:
        if self.block_frames < 1:
            raise ConfigError("cache.block_frames", f"must be at least 1 frame, got {self.block_frames}")
        if not 0 < self.keep_ratio <= 1:
            raise ConfigError("cache.keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")

    def score(self, block: PressBlock) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- streaming
    def start_video(self, init_ids: list[int]) -> None:
        super().start_video(init_ids)
        self.block: PressBlock | None = None
        self.blocks_done = 0

    def ingest(self, visual: torch.Tensor, first_frame: int) -> None:
        tpf, done = self.geometry.tokens_per_frame, 0
        while done < visual.shape[0]:
            if self.block is None:
                self.block = PressBlock(start=self.held_tokens, first_token=(first_frame + done) * tpf)
            block = self.block
            n = min(self.block_frames - block.length // tpf, visual.shape[0] - done)
            completes = block.length + n * tpf == self.block_frames * tpf
            self.prefill(visual[done:done + n], first_frame + done,
                         lambda *a, block=block, completes=completes: self._observe(block, completes, *a))
            block.length += n * tpf
            done += n
            if completes:
                self.compress_block()

    def _observe(self, block: PressBlock, completes: bool, idx: int, q, q_rot, keys, vals, scaling) -> None:
        if "last_attention" in self.signals and completes:  # the block's last token over everything it sees
            # (1, q_heads, 1, visible), read as (q_heads, visible) once for all layers (``TOVAPress.score``)
            block.last_attention[idx] = attention_weights(q_rot[..., -1:, :], keys, scaling, None)
        if "query_stats" in self.signals:
            skip = max(0, self.stats_skip - block.length)  # the block's first stats_skip tokens are left out
            qs = as_float(token_range(q, skip)[0] if skip else q.view(q.shape[1:]))  # (q_heads, rows, d)
            total, outer = block.query_sum.get(idx), block.query_outer.get(idx)  # accumulated in place
            block.query_sum[idx] = qs.sum(1) if total is None else total.add_(qs.sum(1))
            block.query_outer[idx] = torch.bmm(qs.mT, qs) if outer is None else outer.baddbmm_(qs.mT, qs)
            if idx == 0:
                block.query_count += qs.shape[1]

    def compress_block(self) -> None:
        """Keep ``int(n x keep_ratio)`` of the finished block's ``n`` tokens in every layer (mean score over heads)."""
        block, self.block = self.block, None
        n, layers = block.length, self.geometry.num_layers
        keep = max(1, int(n * self.keep_ratio))
        scores = self.score(block).float().mean(1)  # (layers, n): one token set for all heads of a layer
        chosen = scores.topk(keep, dim=-1).indices.sort(dim=-1).values + block.start
        held = torch.cat((torch.arange(block.start, device=chosen.device).expand(layers, -1), chosen), dim=-1)
        self.keep(held)  # (layers, n): a layer's heads keep the same tokens
        self.blocks_done += 1

    def by_layer(self, signal: dict[int, torch.Tensor]) -> torch.Tensor:
        """A per-layer signal of the block (``PressBlock.last_attention``, ``query_sum`` ...) stacked over layers."""
        return torch.stack([signal[i] for i in range(len(self.keys))])

    def block_keys(self, block: PressBlock) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's rotated keys and values in every layer: (layers, kv_heads, n, d)."""
        start, stop = block.start, block.start + block.length
        return (torch.cat([token_range(k, start, stop) for k in self.keys]),
                torch.cat([token_range(v, start, stop) for v in self.values]))

    def recall(self, question: str) -> AnswerContext[PressRecall]:
        """Everything kept (query-agnostic), at its original positions."""
        return self.kept_context(PressRecall(self.blocks_done, self.held_tokens))
