"""KNorm (kvpress ``KnormPress``; Devoto et al. 2024): keep the keys of smallest L2 norm, per block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mukv.cache.base import register_cache
from mukv.cache.press import ChunkPress, PressBlock


@register_cache("knorm")
@dataclass
class KnormPress(ChunkPress):
    display_order = 60

    def score(self, block: PressBlock) -> torch.Tensor:
        keys, _ = self.block_keys(block)
        return -keys.float().norm(dim=-1)  # rotation keeps the norm: rotated or not, the same scores
