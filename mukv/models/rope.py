"""RoPE done once, for everyone: cache methods store un-rotated keys and rotate at attention time.

The language model runs with every position id at 0, so its own rotary embedding is the identity (up to
its ``attention_scaling``, which it has then already applied to q and k). Cache methods choose positions
per token (window-relative, contiguous after retrieval, the encoding positions for MuKV) and rotate here.
"""

from __future__ import annotations

import torch


class RotaryTable:
    """Rotates (..., L, head_dim) tensors by integer positions, as transformers' Qwen2/Llama RoPE does."""

    # cos / sin of a contiguous range are kept for the last few ranges: every layer of a forward rotates by the
    # same ranges (a decoded token's position, a block's, the window's), so they are computed once per forward
    # and not once per layer and tensor (8 of the ~13 operations of a rotation)
    MEMO_RANGES = 8
    MEMO_MAX_LENGTH = 1 << 16

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.detach().float()
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (..., L, head_dim) for positions (..., L) (e.g. one row per head, for methods
        that keep different tokens per head), computed in fp32 then cast (as transformers does)."""
        inv = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (..., L, d) so that token i sits at ``positions[..., i]`` (positions (L,) or, per head,
        broadcastable to ``x.shape[:-1]``, e.g. (H, L))."""
        return self._apply(x, *self.cos_sin(positions, x.dtype))

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated_half * sin

    def rotate_range(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate ``x`` to the contiguous positions start .. start + L - 1."""
        n = x.shape[-2]
        # inference tensors must not reach autograd (training evaluates under inference mode, then trains)
        key = (start, n, x.dtype, x.device, torch.is_inference_mode_enabled())
        got = self._memo.get(key)
        if got is None:
            got = self.cos_sin(torch.arange(start, start + n, device=x.device), x.dtype)
            if n <= self.MEMO_MAX_LENGTH:
                if len(self._memo) >= self.MEMO_RANGES:
                    self._memo.pop(next(iter(self._memo)))  # the oldest
                self._memo[key] = got
        return self._apply(x, *got)
