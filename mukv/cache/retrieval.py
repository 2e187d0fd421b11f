"""Block scoring and selection shared by retrieval-based methods (ReKV; MuKV reuses the pieces).

Representative keys and question queries are built from un-rotated vectors with grouped KV heads expanded
to the query heads and all heads concatenated, as ReKV does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mukv.cache.kernels import as_float, causal_suffix_attention, expand_kv_heads
from mukv.cache.options import StrOption


class BlockScoring(StrOption):
    """``scoring`` of ReKV's retrieval: how a block's representative is compared with the question."""

    dot = "dot"  # the published code
    cosine = "cosine"  # the paper's description


def block_representatives(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Mean un-rotated key of each block: k (layers, kv_heads, blocks, tokens, d) -> (layers, blocks, H*d)."""
    mean = as_float(k).mean(dim=3)  # (layers, kv_heads, blocks, d)
    mean = expand_kv_heads(mean, num_heads, head_dim=1)  # (layers, H, blocks, d)
    layers, heads, blocks, d = mean.shape
    return mean.permute(0, 2, 1, 3).reshape(layers, blocks, heads * d)


def question_vector(q: torch.Tensor) -> torch.Tensor:
    """Mean over question tokens of un-rotated queries: (1, H, L, d) -> (H*d,)."""
    return as_float(q).mean(dim=2).reshape(-1)


def question_vectors(q: torch.Tensor) -> torch.Tensor:
    """``question_vector`` of each row of a batch (one per layer, say), in one call: (N, H, L, d) -> (N, H*d)."""
    return as_float(q).mean(dim=2).flatten(1)


def score_blocks(reprs: torch.Tensor, query: torch.Tensor, scoring: BlockScoring | str) -> torch.Tensor:
    """Dot product (published code) or cosine similarity (the paper) of each block with the query."""
    if scoring == "cosine":
        return F.normalize(as_float(reprs), dim=-1) @ F.normalize(as_float(query), dim=0)
    return as_float(reprs) @ as_float(query)


def select_top_blocks(scores: torch.Tensor, k: int, chunk: int = 1) -> list[int]:
    """Top ``k`` blocks in time order; with ``chunk`` > 1, consecutive blocks are scored by their mean in
    groups of ``chunk`` (the last, shorter group included) and whole groups are taken. All blocks are
    taken when there are no more than ``k``."""
    n = int(scores.shape[0])
    if n <= k:
        return list(range(n))
    full = n - n % chunk
    grouped = scores[:full].reshape(-1, chunk).mean(dim=-1)
    if full < n:
        grouped = torch.cat((grouped, scores[full:].mean(dim=0, keepdim=True)))
    picked = grouped.topk(min(k // chunk, grouped.shape[0])).indices.sort().values
    ids = (picked[:, None] * chunk + torch.arange(chunk, device=picked.device)[None, :]).reshape(-1)
    return ids[ids < n].tolist()  # one device-to-host copy (not one per block)


def attend_after_context(ctx_k: torch.Tensor, ctx_v: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, scaling: float, rope) -> torch.Tensor:
    """New tokens (un-rotated q, k, v) after a recalled context (un-rotated ``ctx_k``, ``ctx_v``), everything
    re-rotated to contiguous positions from 0, causal among the new ones: a retrieval run's attention."""
    n = ctx_k.shape[-2]
    keys = torch.cat((rope.rotate_range(ctx_k, 0), rope.rotate_range(k, n)), dim=-2)
    return causal_suffix_attention(rope.rotate_range(q, n), keys, torch.cat((ctx_v, v), dim=-2), scaling)
