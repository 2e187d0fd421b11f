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
        self._turns: dict[tuple, torch.Tensor] = {}

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
        """``x * cos + rotate_half(x) * sin`` (transformers' formula), with ``rotate_half`` as one matmul by a
        signed permutation (exact: one non-zero product per output) and the sum as ``addcmul``: 3 operator
        calls where slicing, negating and concatenating took 9 (operator calls are host time on a GPU)."""
        return torch.addcmul(x * cos, x @ self._half_turn(x), sin)

    def _half_turn(self, x: torch.Tensor) -> torch.Tensor:
        """(d, d) with ``y @ it == cat((-y[d/2:], y[:d/2]))`` for rows y, per head size, dtype and device."""
        d = x.shape[-1]
        key = (d, x.dtype, x.device, torch.is_inference_mode_enabled())
        got = self._turns.get(key)
        if got is None:
            half = torch.arange(d // 2)
            got = torch.zeros(d, d)
            got[half + d // 2, half] = -1.0
            got[half, half + d // 2] = 1.0
            got = self._turns[key] = got.to(x.device, x.dtype)
        return got

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
