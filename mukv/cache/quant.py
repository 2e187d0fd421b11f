"""Group-wise quantization of offloaded KV blocks (an option of the block store, not in the published code).

Why: ReKV and MuKV keep every frame's KV for the whole video; for LLaVA-OV-0.5B in bf16 that is 4.3 GB per
hour at 0.5 fps. Stored at 8 or 4 bits it is 2.2 or 1.15 GB, and only the blocks a question recalls are
dequantized, on the device they are used on.

Scheme: symmetric round-to-nearest with one float16 scale per group of ``group_size`` consecutive values
along the head dimension of each token (keys and values alike). ``int8`` keeps integers in [-127, 127],
``int4`` in [-7, 7], two per byte. The scale is ``absmax / qmax`` rounded *up* to float16, so every value
is representable and the round-trip error of each element is at most half its group's scale:
``|x - dequantize(quantize(x))| <= scale / 2``, i.e. ``absmax / 254`` (int8) or ``absmax / 14`` (int4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mukv.cache.options import StrOption


class KVQuant(StrOption):
    """``kv_quant``: how stored blocks are kept (``none``: as the model computed them, the published way)."""

    none = "none"
    int8 = "int8"
    int4 = "int4"


QUANT_MODES = KVQuant.values()
_QMAX = {"int8": 127, "int4": 7}


@dataclass
class QuantizedTensor:
    """A quantized (layers, kv_heads, n, head_dim) tensor: integer codes plus float16 scales per group."""

    codes: torch.Tensor  # int8 (..., d) for int8; uint8 (..., d // 2) holding two 4-bit codes for int4
    scales: torch.Tensor  # float16 (..., d // group_size)
    mode: str
    group_size: int
    dtype: torch.dtype  # dtype of the original tensor (what dequantize returns by default)

    @property
    def shape(self) -> torch.Size:
        d = self.codes.shape[-1] * (2 if self.mode == "int4" else 1)
        return torch.Size((*self.codes.shape[:-1], d))

    @property
    def nbytes(self) -> int:
        return int(self.codes.numel() * self.codes.element_size() + self.scales.numel() * 2)

    def __getitem__(self, index) -> QuantizedTensor:
        """Index leading dimensions (e.g. one layer), keeping the codes quantized."""
        return QuantizedTensor(self.codes[index], self.scales[index], self.mode, self.group_size, self.dtype)

    def map(self, fn) -> QuantizedTensor:
        """The same tensor with ``fn`` applied to its codes and scales (move, pin, spill)."""
        return QuantizedTensor(fn(self.codes), fn(self.scales), self.mode, self.group_size, self.dtype)


def check_quant(mode: str, group_size: int, head_dim: int | None = None) -> str | None:
    """Why (mode, group_size) cannot quantize vectors of ``head_dim``; None when it can."""
    if mode not in QUANT_MODES:
        return f"unknown quantization '{mode}'; choose one of {', '.join(QUANT_MODES)}"
    if mode == "none":
        return None
    if group_size < 2 or group_size % 2:
        return f"group size must be an even number >= 2, got {group_size}"
    if head_dim is not None and head_dim % group_size:
        return f"group size {group_size} must divide the head dimension {head_dim}"
    return None


def bytes_per_value(mode: str, group_size: int, element_size: int = 2) -> float:
    """Stored bytes per KV element (``element_size`` for ``none``)."""
    if mode == "none":
        return float(element_size)
    return (1.0 if mode == "int8" else 0.5) + 2.0 / group_size


def quantize(x: torch.Tensor, mode: str, group_size: int) -> QuantizedTensor:
    """Quantize ``x`` (..., d) group-wise along its last dimension (d divisible by ``group_size``)."""
    err = check_quant(mode, group_size, x.shape[-1])
    if err or mode == "none":
        raise ValueError(err or "mode 'none' does not quantize")
    qmax = _QMAX[mode]
    g = x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    absmax = g.abs().amax(dim=-1)
    scales = (absmax / qmax).to(torch.float16)
    low = scales.float() * qmax < absmax  # rounded down: bump to the next float16 so absmax stays in range
    scales = torch.where(low, torch.nextafter(scales, torch.full_like(scales, torch.inf)), scales)
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(absmax))
    q = torch.round(g / safe[..., None]).clamp_(-qmax, qmax).to(torch.int8).reshape(x.shape)
    if mode == "int4":
        u = (q + 8).to(torch.uint8)  # 1..15
        q = u[..., 0::2] | (u[..., 1::2] << 4)
    return QuantizedTensor(q.contiguous(), scales.contiguous(), mode, group_size, x.dtype)


def dequantize(t: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Back to a float tensor (``t.dtype`` unless ``dtype`` is given), on the device ``t`` lives on."""
    codes = t.codes
    if t.mode == "int4":
        low = (codes & 0x0F).to(torch.int8) - 8
        high = (codes >> 4).to(torch.int8) - 8
        codes = torch.stack((low, high), dim=-1).flatten(-2)
    d = codes.shape[-1]
    g = codes.reshape(*codes.shape[:-1], d // t.group_size, t.group_size).float() * t.scales.float()[..., None]
    return g.reshape(codes.shape).to(dtype or t.dtype)
