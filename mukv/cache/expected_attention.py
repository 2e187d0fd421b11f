"""ExpectedAttention as a press (kvpress ``ExpectedAttentionPress``; Devoto et al. 2025), per block: the
attention future queries are expected to pay each token, from the mean and covariance of the block's queries
before RoPE (its first ``n_sink`` tokens left out), rotated by the RoPE matrix averaged over the next
``n_future_positions`` positions: softmax over the block of ``k . mu / sqrt(d) + k^T cov k / (2 d)``, averaged
over each KV head's query group, times the value norm; the first ``n_sink`` tokens always kept."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from mukv.cache.base import register_cache
from mukv.cache.press import ChunkPress, PressBlock
from mukv.errors import ConfigError


@register_cache("expected_attention")
@dataclass
class ExpectedAttentionPress(ChunkPress):
    display_order = 64
    n_future_positions: int = 512  # kvpress's defaults
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    signals: ClassVar[frozenset[str]] = frozenset({"query_stats"})

    @property
    def stats_skip(self) -> int:  # type: ignore[override]
        return self.n_sink

    def check_knobs(self, geometry) -> None:
        super().check_knobs(geometry)
        if self.n_sink < 0 or self.n_sink >= self.block_frames * geometry.tokens_per_frame:
            raise ConfigError("cache.n_sink", f"must be in [0, the block's tokens), got {self.n_sink}")
        if self.n_future_positions < 1:
            raise ConfigError("cache.n_future_positions", f"must be at least 1, got {self.n_future_positions}")

    def average_rope(self, start: int, device: torch.device) -> torch.Tensor:
        """The RoPE matrix averaged over positions start .. start + n_future_positions - 1: (d, d); the same for
        every layer of a block, so it is computed once per block."""
        memo = getattr(self, "_average_rope", None)
        if memo is not None and memo[0] == (start, device):
            return memo[1]
        cos, sin = self.llm.rope.cos_sin(torch.arange(start, start + self.n_future_positions, device=device),
                                         torch.float32)
        d = cos.shape[-1]
        half = torch.eye(d // 2, device=device)
        swap = torch.zeros(d, d, device=device)  # swap @ x = rotate_half(x)
        swap[: d // 2, d // 2:], swap[d // 2:, : d // 2] = -half, half
        rot = (torch.diag_embed(cos) + swap[None] * sin[:, None, :]).mean(0)
        self._average_rope = ((start, device), rot)
        return rot

    def score(self, block: PressBlock) -> torch.Tensor:
        keys, values = self.block_keys(block)  # (layers, kv_heads, n, d)
        keys, values = keys[:, :, self.n_sink:].float(), values[:, :, self.n_sink:].float()
        count = block.query_count
        mu = self.by_layer(block.query_sum) / count  # (layers, q_heads, d)
        rot = self.average_rope(self.n_init + block.first_token + block.length, mu.device)
        n_layers, kv_heads, _, d = keys.shape
        grouped = (n_layers, kv_heads, -1, d)  # each KV head's query group, side by side
        scores = keys @ (mu @ rot.T).view(grouped).transpose(-1, -2) / math.sqrt(d)  # (layers, kv_heads, n, group)
        scores = scores.transpose(-1, -2)  # (layers, kv_heads, group, n)
        if self.use_covariance:
            cov = self.by_layer(block.query_outer) / count - mu[..., :, None] * mu[..., None, :]
            cov = (rot @ cov @ rot.T).view(*grouped, d)  # (layers, kv_heads, group, d, d)
            k = keys[:, :, None]  # (layers, kv_heads, 1, n, d)
            scores = scores + ((k @ cov) * k).sum(-1) / d / 2
        scores = torch.softmax(scores, -1).mean(2)  # (layers, kv_heads, n)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        # the sinks first, above every other score (computed on the device: no read by the host)
        return torch.cat(((scores.max() + 1).expand(*scores.shape[:-1], self.n_sink), scores), dim=-1)
