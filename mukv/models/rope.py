"""RoPE done once, for everyone: cache methods store un-rotated keys and rotate at attention time.

The language model runs with every position id at 0, so its own rotary embedding is the identity (up to
its ``attention_scaling``, which it has then already applied to q and k). Cache methods choose positions
per token (window-relative, contiguous after retrieval, the encoding positions for MuKV) and rotate here.
"""

from __future__ import annotations

import torch


class RotaryTable:
    """Rotates (..., L, head_dim) tensors by integer positions, as transformers' Qwen2/Llama RoPE does."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.detach().float()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (L, head_dim), computed in fp32 then cast (as transformers does)."""
        inv = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (..., L, d) so that token i sits at ``positions[i]``."""
        cos, sin = self.cos_sin(positions, x.dtype)
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated_half * sin

    def rotate_range(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate ``x`` to the contiguous positions start .. start + L - 1."""
        pos = torch.arange(start, start + x.shape[-2], device=x.device)
        return self.rotate(x, pos)
