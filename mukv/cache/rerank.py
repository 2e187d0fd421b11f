"""MuKV's multi-granularity block selection with segment-guided reranking, as pure functions.

Given a query vector and, per granularity, the representative vectors of the stored blocks:

1. stage 1: cosine similarity of the query with every representative; with rerank, the top ``2 x top_k``
   of each granularity become candidates (without rerank, the top ``top_k`` are final);
2. context vector: the mean of the representatives of the ``top_n`` best coarse (segment) candidates, or the
   query itself when there is no coarse block yet;
3. medium (frame) candidates are rescored ``(1 - alpha) * sim + alpha * cos(repr, context)``, fine (patch)
   candidates likewise with ``beta``; coarse candidates keep their stage-1 scores and order;
4. the final ``top_k`` of each granularity, best first; with ``reverse`` (the published ``rerank_reverse``
   ablation) each granularity's reranked candidates are taken worst first instead, so the ``top_k`` lowest of
   the ``2 x top_k`` candidates are kept (coarse ones by their stage-1 scores).

Reranking needs exactly three granularities ordered fine, medium, coarse (as the published code, which
silently skips reranking otherwise; so does the MuKV cache, which records it as ``MuKVRecall.reranked`` in
the answer context's details).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Selection:
    """Chosen blocks of one granularity, best first: block indices and their final scores."""

    indices: torch.Tensor  # (n,) long, into that granularity's representatives
    scores: torch.Tensor  # (n,) float


def cosine(query: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of one vector (D,) with every row of (N, D), in float32."""
    return F.cosine_similarity(query.float()[None, :], reprs.float(), dim=-1)


def top(scores: torch.Tensor, k: int) -> Selection:
    """The ``min(k, N)`` best, best first (ties keep the lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices[: min(k, scores.numel())]
    return Selection(order, scores[order])


def stage_one(query: torch.Tensor, reprs: torch.Tensor, k: int) -> Selection:
    """Cosine similarities and the ``k`` best blocks of one granularity."""
    if reprs.numel() == 0:
        return Selection(torch.zeros(0, dtype=torch.long, device=query.device), torch.zeros(0, device=query.device))
    return top(cosine(query, reprs), k)


def context_vector(coarse_reprs: torch.Tensor, coarse: Selection, top_n: int,
                   fallback: torch.Tensor) -> torch.Tensor:
    """Mean representative of the ``top_n`` best coarse candidates (``fallback`` if there is none)."""
    n = min(top_n, coarse.indices.numel())
    if n == 0:
        return fallback.float()
    return coarse_reprs.float()[coarse.indices[:n]].mean(dim=0)


def rescore(reprs: torch.Tensor, cand: Selection, context: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * stage-1 score + weight * cos(repr, context)`` for every candidate."""
    if cand.indices.numel() == 0:
        return cand.scores
    consistency = cosine(context, reprs[cand.indices])
    return (1.0 - weight) * cand.scores + weight * consistency


def worst_first(sel: Selection, k: int) -> Selection:
    """The ``k`` last of a best-first selection, worst first (the published list reversed, then cut)."""
    n = sel.indices.numel()
    order = torch.arange(n - 1, max(n - 1 - k, -1), -1, device=sel.indices.device)
    return Selection(sel.indices[order], sel.scores[order])


def select_blocks(query: torch.Tensor, reprs: list[torch.Tensor], top_k: list[int], rerank: bool = True,
                  alpha: float = 0.3, beta: float = 0.3, top_n: int = 5, reverse: bool = False) -> list[Selection]:
    """Chosen blocks per granularity (best first; worst first with ``reverse``). ``reprs[i]`` is (N_i, D) for
    granularity i, ordered fine -> coarse; with ``rerank`` there must be exactly three (patch, frame, segment).
    ``reverse`` acts on the reranked candidates only (as published): it needs ``rerank``."""
    if len(reprs) != len(top_k):
        raise ValueError("one top_k per granularity")
    if reverse and not rerank:
        raise ValueError("reverse reverses the reranked candidates: it needs rerank")
    if not rerank:
        return [stage_one(query, r, k) for r, k in zip(reprs, top_k, strict=True)]
    if len(reprs) != 3:
        raise ValueError("segment-guided rerank needs exactly three granularities (fine, medium, coarse)")
    fine, medium, coarse = (stage_one(query, r, 2 * k) for r, k in zip(reprs, top_k, strict=True))
    context = context_vector(reprs[2], coarse, top_n, query)
    out = []
    for reprs_i, cand, weight, k in ((reprs[0], fine, beta, top_k[0]), (reprs[1], medium, alpha, top_k[1])):
        ranked = top(rescore(reprs_i, cand, context, weight), cand.indices.numel())
        ranked = Selection(cand.indices[ranked.indices], ranked.scores)
        out.append(worst_first(ranked, k) if reverse else Selection(ranked.indices[:k], ranked.scores[:k]))
    out.append(worst_first(coarse, top_k[2]) if reverse else Selection(coarse.indices[: top_k[2]],
                                                                         coarse.scores[: top_k[2]]))
    return out
