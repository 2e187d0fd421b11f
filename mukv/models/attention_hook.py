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


# ----------------------------------------------------------------------------- compiled layers
# Under ``engine.compile`` the decoder layers are compiled (``VideoLLM.compile``) and a forward's handler is not
# passed through the layers' keyword arguments (the compiler would guard on each new callable, and trace into its
# Python): the forward puts it here and passes ``DEFERRED``; each layer calls the opaque operator below, which
# runs the current handler eagerly. The compiled graph is everything else of the layer (norms, projections, MLP).
DEFERRED = "mukv_deferred"
_CURRENT: list[Callable | None] = [None]


def set_current(handler: Callable | None) -> None:
    """The handler the ``stream_attention`` operator runs (a deferred forward's)."""
    _CURRENT[0] = handler


def current() -> Callable | None:
    return _CURRENT[0]


_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("mukv::stream_attention", mutates_args=(), tags=_TAGS)
def stream_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int,
                     scaling: float) -> torch.Tensor:
    """The current handler's attention (B, Hq, L, d) of one layer: opaque to the compiler (it keeps caches and
    reads Python state), and outside any CUDA graph (``cudagraph_unsafe``: the graph is split around it)."""
    handler = _CURRENT[0]
    if handler is None:
        raise RuntimeError("mukv::stream_attention called outside a deferred forward (set_current)")
    return handler(layer_idx, q, k, v, scaling).contiguous()


@stream_attention.register_fake
def _stream_attention_fake(q, k, v, layer_idx, scaling):
    return q.new_empty(q.shape)


def _stream_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    handler: Callable | str | None = kwargs.pop("mukv_attention", None)
    if handler is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scaling = scaling if scaling is not None else module.scaling
    if isinstance(handler, str):  # DEFERRED: a compiled layer
        out = torch.ops.mukv.stream_attention(query, key, value, module.layer_idx, scaling)
    else:
        out = handler(module.layer_idx, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------- the identity rotation skipped
# LLaVA-OneVision's language model runs with every position id at 0 (``VideoLLM.forward``): the handler rotates
# q and k itself, at the positions its cache method chooses (``mukv.models.rope``), and the layer's own rotary
# step is the identity. It is still 34 operator calls per layer (two unsqueezes, and per tensor a multiply,
# ``rotate_half``'s slices, negation and concatenation, a multiply and an add): on the 0.5B layout a sixth of
# a steady chunk's calls and of a decoded token's. Attention modules of the families below whose forward is
# projections, the rotary step, the attention interface and the output projection get the same forward minus
# the rotary step while a handler owns the attention (``mukv_attention`` in the keyword arguments); without
# one (plain forwards: training, reference computations) they run the stock forward unchanged.
UNROTATED_FAMILIES = ("Qwen2Attention", "LlamaAttention")
_UNROTATED_CLASSES: dict[type, type] = {}


def _unrotated_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
    """The stock forward minus its rotary step while a handler owns the attention: the handler gets q and k
    un-rotated (``LayerAttention``'s contract) whatever positions the model was given."""
    if kwargs.get("mukv_attention") is None:
        return self._mukv_stock_forward(hidden_states, position_embeddings, attention_mask, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    out, _ = _stream_attention(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), None


def skip_identity_rotation(language_model: torch.nn.Module) -> int:
    """Give the attention modules of ``language_model`` (families in ``UNROTATED_FAMILIES``) a forward without
    the rotary step while a handler owns the attention; for a model that runs every position at 0 (LLaVA-OV's
    ``VideoLLM.forward``), where that step is the identity. Returns how many modules were switched: none where
    the rotary embedding scales q and k (``attention_scaling`` not 1: the step is then not the identity)."""
    rotary = getattr(language_model, "rotary_emb", None)
    if rotary is None or float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        return 0
    switched = 0
    for module in language_model.modules():
        cls = type(module)
        if cls.__name__ not in UNROTATED_FAMILIES:
            continue
        if cls not in _UNROTATED_CLASSES:
            _UNROTATED_CLASSES[cls] = type(f"Unrotated{cls.__name__}", (cls,),
                                           {"forward": _unrotated_forward, "_mukv_stock_forward": cls.forward})
        module.__class__ = _UNROTATED_CLASSES[cls]
        switched += 1
    return switched


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
