"""The one place the language model's attention is taken over, through transformers' public registry.

The text model is switched to the ``mukv_stream`` attention implementation. When a forward call passes a
``mukv_attention`` callable (it travels to every attention layer in transformers' keyword arguments), that
callable computes the layer's attention from the un-rotated q, k, v and owns whatever cache it keeps;
otherwise the layer runs transformers' own SDPA attention, so plain forwards (training, reference
computations in tests) behave exactly as stock transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "mukv_stream"


class LayerAttention(Protocol):
    """Computes one layer's attention output (B, Hq, L, d) from un-rotated (B, H, L, d) inputs."""

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
    ) -> torch.Tensor: ...


def _stream_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    handler: Callable | None = kwargs.pop("mukv_attention", None)
    if handler is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    out = handler(module.layer_idx, query, key, value, scaling if scaling is not None else module.scaling)
    return out.transpose(1, 2).contiguous(), None


_HANDLED: dict[torch.device, torch.Tensor] = {}


def handled_mask(device: torch.device) -> torch.Tensor:
    """The ``attention_mask`` of a forward whose ``mukv_attention`` handler owns the masking: a 4-D all-visible
    mask, which transformers takes as already prepared. With none, it built a causal mask at every forward
    (and checked the all-zero position ids for packed sequences, a host-device wait per decoded token), and
    the handler never read it."""
    device = torch.device(device)
    if device not in _HANDLED:
        _HANDLED[device] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    return _HANDLED[device]


def register() -> str:
    """Register the implementation (idempotent) and return its name."""
    AttentionInterface.register(IMPLEMENTATION, _stream_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION
