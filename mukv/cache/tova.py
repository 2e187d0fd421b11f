"""TOVA as a press (kvpress ``TOVAPress``; Oren et al. 2024), per block: the attention the block's last token pays
each of its tokens, averaged over the query heads; the last token itself always kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mukv.cache.base import register_cache
from mukv.cache.press import ChunkPress, PressBlock


@register_cache("tova")
@dataclass
class TOVAPress(ChunkPress):
    display_order = 62
    signals: ClassVar[frozenset[str]] = frozenset({"last_attention"})

    def score(self, block: PressBlock) -> torch.Tensor:
        # (layers, q_heads, n): over the block's tokens (every layer sees as many tokens)
        attention = self.by_layer(block.last_attention)[:, 0, :, 0, -block.length:]
        scores = attention.mean(1)
        scores[:, -1] = scores.amax(-1) + 1  # the last token (kvpress pads it with the max)
        return scores[:, None].expand(-1, self.keys[0].shape[1], -1)
