"""SnapKV as a press (kvpress ``SnapKVPress``; Li et al. 2024), per block, with StreamMem's observation window:
the chat-template tokens that follow the frames (the question template with no question) are run after the block,
at the next positions, and the attention their queries pay the block's tokens, averaged over the window and
smoothed along the block (average pooling, ``kernel_size``), then averaged over each KV head's query group,
scores the block. The window's KV is dropped."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mukv.cache.base import register_cache
from mukv.cache.kernels import attention_weights, prefix_causal_mask
from mukv.cache.press import ChunkPress, PressBlock
from mukv.errors import ConfigError


@register_cache("snapkv")
@dataclass
class SnapKVPress(ChunkPress):
    display_order = 63
    kernel_size: int = 5  # kvpress's default

    def check_knobs(self, geometry) -> None:
        super().check_knobs(geometry)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError("cache.kernel_size", f"must be a positive odd number, got {self.kernel_size}")

    def compress_block(self) -> None:
        block, scores = self.block, self.block.scores

        def observe(idx: int, q, q_rot, keys, vals, scaling):
            groups = q.shape[1] // keys.shape[1]
            causal = prefix_causal_mask(q.shape[-2], keys.shape[-2], q.device)  # causal in the window
            attention = attention_weights(q_rot, keys, scaling, causal)[0]
            attention = attention[..., self.n_init + block.start:self.n_init + block.start + block.length]
            pooled = torch.nn.functional.avg_pool1d(attention.mean(1)[:, None], self.kernel_size, stride=1,
                                                    padding=self.kernel_size // 2)[:, 0]  # (q_heads, n)
            scores[idx] = pooled.view(keys.shape[1], groups, -1).mean(1)

        self.probe(self.llm.question_prompt_ids(""), observe)  # the template tokens after the frames
        super().compress_block()

    def score(self, block: PressBlock) -> torch.Tensor:
        return self.by_layer(block.scores)
