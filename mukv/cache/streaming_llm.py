"""StreamingLLM as a press (kvpress ``StreamingLLMPress``; Xiao et al. 2024), per block: keep the block's first
``n_sink`` tokens and its most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mukv.cache.base import register_cache
from mukv.cache.press import ChunkPress, PressBlock
from mukv.errors import ConfigError


@register_cache("streaming_llm")
@dataclass
class StreamingLLMPress(ChunkPress):
    display_order = 61
    n_sink: int = 4  # kvpress's default

    def check_knobs(self, geometry) -> None:
        super().check_knobs(geometry)
        if self.n_sink < 0 or self.n_sink >= self.block_frames * geometry.tokens_per_frame:
            raise ConfigError("cache.n_sink", f"must be in [0, the block's tokens), got {self.n_sink}")

    def score(self, block: PressBlock) -> torch.Tensor:
        n = block.length
        pruned = n - max(1, int(n * self.keep_ratio))
        scores = torch.ones(n, device=self.keys[0].device)
        scores[self.n_sink:self.n_sink + pruned] = 0  # the middle goes (the same in every layer and head)
        return scores.expand(len(self.keys), self.keys[0].shape[1], -1)
