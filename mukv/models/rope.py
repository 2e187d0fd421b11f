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
        emb = torch.cat((self._angles(positions),) * 2, dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``apply`` rotates by: ``cos_sin``'s cos, and its sin with the first half negated (the same
        values, signs moved from ``rotate_half`` into the table)."""
        freqs = self._angles(positions)
        sin = freqs.sin()
        return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """fp32 angles (..., L, head_dim / 2): each position times each inverse frequency."""
        return positions.float()[..., None] * self.inv_freq.to(positions.device)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (..., L, d) so that token i sits at ``positions[..., i]`` (positions (L,) or, per head,
        broadcastable to ``x.shape[:-1]``, e.g. (H, L))."""
        return self.apply(x, *self.tables(positions, x.dtype))

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """transformers' ``x * cos + rotate_half(x) * sin``, bit for bit: ``rotate_half(x) * sin`` is ``x`` with
        its halves swapped (one flip of a (2, d/2) view) times the sin whose first half is negated (``tables``):
        9 operator calls where slicing, negating and concatenating take 13-15 (operator calls are host time on
        a GPU). Not ``addcmul``: it rounds once where transformers rounds twice (a bf16 ulp apart)."""
        d = x.shape[-1]
        if x.stride(-1) != 1:
            x = x.contiguous()
        swapped = x.view(*x.shape[:-1], 2, d // 2).flip(-2).view(x.shape)
        return x * cos + swapped * signed_sin

    def rotate_range(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate ``x`` to the contiguous positions start .. start + L - 1."""
        n = x.shape[-2]
        # inference tensors must not reach autograd (training evaluates under inference mode, then trains)
        key = (start, n, x.dtype, x.device, torch.is_inference_mode_enabled())
        got = self._memo.get(key)
        if got is None:
            got = self.tables(torch.arange(start, start + n, device=x.device), x.dtype)
            if n <= self.MEMO_MAX_LENGTH:
                if len(self._memo) >= self.MEMO_RANGES:
                    self._memo.pop(next(iter(self._memo)))  # the oldest
                self._memo[key] = got
        return self.apply(x, *got)
