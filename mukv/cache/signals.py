"""Token-importance signals of MuKV's dual-signal trimming, as small pure functions on tensors.

Everything works on a block of ``g`` tokens, with optional leading batch dimensions (several blocks
scored at once): scores have shape (..., g). The published behaviour (``model/mukv_dualsignal_compression.py``)
is the reference:

* attention received: the attention probabilities (B, H, Lq, Lk) of one block's prefill, averaged over batch
  and heads and summed over queries; the first ``n_prefix`` keys (the init prompt) are dropped;
* layer strategies ``last`` / ``second_last`` / ``middle`` (one layer) and ``last_5`` (the last five layers'
  attention-received vectors weighted 0.1, 0.15, 0.2, 0.25, 0.3, oldest first, weights not renormalised;
  with fewer layers the last weights are used);
* frequency signals on the block's keys averaged over KV heads, (..., g, head_dim): ``fft`` (high-frequency
  energy per token), ``diff`` (distance to the previous token), ``spectral_entropy`` (one value per block);
* min-max normalisation, combination ``alpha * attention + (1 - alpha) * frequency``, top-k selection back
  in position order, and the optional greedy de-duplication of near-identical tokens.

Signals are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import torch

from mukv.cache.options import StrOption


class AttentionLayer(StrOption):
    """``attention_layer``: whose attention probabilities score the tokens (``attention_layers``)."""

    last = "last"
    second_last = "second_last"
    last_5 = "last_5"
    middle = "middle"


class FrequencyMethod(StrOption):
    """``frequency``: the frequency signal on the keys (``frequency_signal``)."""

    fft = "fft"
    diff = "diff"
    spectral_entropy = "spectral_entropy"


class ScoringMethod(StrOption):
    """``scoring_method``: which signals make the token score (``combine``)."""

    attention_fft_weighted = "attention_fft_weighted"
    attention_only = "attention_only"
    fft_only = "fft_only"


ATTENTION_LAYER_STRATEGIES = AttentionLayer.values()
FREQUENCY_METHODS = FrequencyMethod.values()
SCORING_METHODS = ScoringMethod.values()
LAST_5_WEIGHTS = (0.1, 0.15, 0.2, 0.25, 0.3)


# ------------------------------------------------------------------------------------------ helpers
def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise along the last dimension to [0, 1]; a constant row becomes all zeros.

    (The published code divides by ``max - min + 1e-8``; the ranking is the same, and a constant input
    gives zeros in both.)
    """
    x = x.float()
    lo = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (x - lo) / safe, torch.zeros_like(x))


# --------------------------------------------------------------------------------- attention signal
def attention_layers(strategy: str, num_layers: int) -> list[tuple[int, float]]:
    """(layer index, weight) pairs whose attention-received vectors are summed for ``strategy``."""
    if num_layers < 1:
        raise ValueError("num_layers must be positive")
    if strategy == "last":
        return [(num_layers - 1, 1.0)]
    if strategy == "second_last":
        return [(num_layers - 2 if num_layers >= 2 else num_layers - 1, 1.0)]
    if strategy == "middle":
        return [(num_layers // 2, 1.0)]
    if strategy == "last_5":
        n = min(5, num_layers)
        weights = LAST_5_WEIGHTS[-n:]
        return [(num_layers - n + i, w) for i, w in enumerate(weights)]
    raise ValueError(f"unknown attention layer strategy '{strategy}'; choose one of {ATTENTION_LAYER_STRATEGIES}")


def unified_layer(strategy: str, num_layers: int) -> int:
    """The one layer of ``use_unified_layer`` (frequency keys and query key): the attention strategy's layer,
    the last one for the multi-layer ``last_5`` (as published)."""
    if strategy == "last_5":
        return num_layers - 1
    return attention_layers(strategy, num_layers)[0][0]


def attention_received(probs: torch.Tensor, n_prefix: int = 0, per_block: bool = False) -> torch.Tensor:
    """Attention each key receives: probabilities (B, H, Lq, Lk) averaged over heads (and over the batch
    unless ``per_block``), summed over queries, the first ``n_prefix`` keys dropped.

    Returns (Lk - n_prefix,) or, with ``per_block``, (B, Lk - n_prefix): one row per batched block, which is
    what one-at-a-time calls with B = 1 would give. Not normalised (see ``attention_signal``).
    """
    p = probs.float().mean(dim=1).sum(dim=1)  # (B, Lk)
    if not per_block:
        p = p.mean(dim=0)
    return p[..., n_prefix:]


def attention_signal(received: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Weighted sum of attention-received vectors (one per selected layer), min-max normalised."""
    total = sum(w * r.float() for r, w in received)
    return minmax(total)


# --------------------------------------------------------------------------------- frequency signal
def fft_high_frequency(keys: torch.Tensor) -> torch.Tensor:
    """High-frequency energy per token of keys (..., g, d): real FFT along the tokens of every dimension,
    the lower half of the bins zeroed (bins ``< max(1, n_bins // 2)``, so the DC bin always), inverse FFT
    keeping the original phase, absolute value averaged over dimensions -> (..., g).

    Keeping magnitude and phase of the upper bins is keeping their complex coefficients unchanged.
    """
    x = keys.float()
    g = x.shape[-2]
    spec = torch.fft.rfft(x, dim=-2)  # (..., bins, d)
    bins = spec.shape[-2]
    start = max(1, bins // 2)
    spec = spec.clone()
    spec[..., :start, :] = 0
    high = torch.fft.irfft(spec, n=g, dim=-2)
    return high.abs().mean(dim=-1)


def token_difference(keys: torch.Tensor) -> torch.Tensor:
    """Norm of each token's key minus the previous token's key, (..., g, d) -> (..., g).

    The first token has no predecessor and is compared with itself: its value is 0 (as the published
    ``torch.diff(..., prepend=k[0:1])``), so it never wins on this signal alone.
    """
    x = keys.float()
    diff = torch.diff(x, dim=-2, prepend=x[..., :1, :])
    return diff.norm(dim=-1)


def spectral_entropy(keys: torch.Tensor) -> torch.Tensor:
    """Spectral entropy of the block, (..., g, d) -> (..., g) constant along g.

    Per dimension: power spectrum of the real FFT along the tokens, normalised to a distribution, its
    entropy; the mean over dimensions is given to every token. As published this is degenerate for
    ranking tokens inside one block: after min-max normalisation it is all zeros.
    """
    x = keys.float()
    power = torch.fft.rfft(x, dim=-2).abs().pow(2)  # (..., bins, d)
    prob = power / (power.sum(dim=-2, keepdim=True) + 1e-10)
    entropy = -(prob * torch.log(prob + 1e-10)).sum(dim=-2)  # (..., d)
    return entropy.mean(dim=-1, keepdim=True).expand(*x.shape[:-1])


def frequency_signal(keys: torch.Tensor, method: str) -> torch.Tensor:
    """Min-max normalised frequency signal of keys (..., g, d) -> (..., g)."""
    if method == "fft":
        raw = fft_high_frequency(keys)
    elif method == "diff":
        raw = token_difference(keys)
    elif method == "spectral_entropy":
        raw = spectral_entropy(keys)
    else:
        raise ValueError(f"unknown frequency method '{method}'; choose one of {FREQUENCY_METHODS}")
    return minmax(raw)


# ----------------------------------------------------------------------------- combination, selection
def combine(attention: torch.Tensor | None, frequency: torch.Tensor | None, alpha: float, method: str) -> torch.Tensor:
    """Token scores from normalised signals: ``alpha * attention + (1 - alpha) * frequency`` for
    ``attention_fft_weighted``; one signal alone for ``attention_only`` / ``fft_only``."""
    if method == "attention_fft_weighted":
        return alpha * attention + (1.0 - alpha) * frequency
    if method == "attention_only":
        return attention
    if method == "fft_only":
        return frequency
    raise ValueError(f"unknown scoring method '{method}'; choose one of {SCORING_METHODS}")


def keep_count(block_size: int, keep_ratio: float) -> int:
    """Tokens kept per block: ``int(g * keep_ratio)`` (floor, as published)."""
    return int(block_size * keep_ratio)


def candidate_count(k: int, g: int) -> int:
    """Candidates the published selection draws before keeping ``k``: ``min(int(1.2 k), g)``."""
    return min(int(k * 1.2), g)


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last dimension, sorted back into position order.

    As published, the top ``candidate_count(k, g)`` are drawn and the first ``k`` of them kept: the same set
    as ``topk(k)`` except among tied scores, where torch's ``topk`` returns other indices for another ``k``
    (``scoring_method=fft_only`` with ``frequency=spectral_entropy`` ties every score).
    """
    idx = scores.topk(candidate_count(k, scores.shape[-1]), dim=-1).indices[..., :k]
    return idx.sort(dim=-1).values


def select_with_dedup(scores: torch.Tensor, keys: torch.Tensor, k: int, threshold: float = 0.9) -> torch.Tensor:
    """The published de-duplicated selection for one block: scores (g,), keys (g, d) (KV-head mean).

    Candidates are the top ``min(int(1.2 k), g)`` tokens by score; if that is not more than ``k`` the top
    ``k`` are kept as without de-duplication. Otherwise, in descending score order, each surviving candidate
    removes every later candidate whose key has cosine similarity above ``threshold`` with its own; of the
    survivors the top ``k`` by score are kept, so fewer than ``k`` tokens remain when many were removed.
    Returns indices in position order.
    """
    n_cand = candidate_count(k, scores.shape[-1])
    cand = scores.topk(n_cand).indices
    if n_cand <= k:
        return cand[:k].sort().values
    vec = keys.float()[cand]
    vec = vec / vec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similar = (vec @ vec.T > threshold).cpu()
    keep = torch.ones(n_cand, dtype=torch.bool)
    # Candidates come best first, so a survivor always outranks the later ones it is similar to (the
    # published pairwise loop's other branch, dropping the earlier one, cannot trigger): drop them all.
    for i in range(n_cand - 1):
        if keep[i]:
            keep[i + 1:] &= ~similar[i, i + 1:]
    kept = cand[keep.to(cand.device)]
    if kept.numel() > k:
        kept = kept[scores[kept].topk(k).indices]
    return kept.sort().values


def token_scores(
    received: list[tuple[torch.Tensor, float]] | None,
    keys: torch.Tensor | None,
    alpha: float,
    scoring_method: str,
    frequency_method: str,
) -> torch.Tensor:
    """Scores (..., g) of a block (or a batch of blocks) from its attention-received vectors
    (``received``: per selected layer, with weights) and its last-layer keys (..., g, d) averaged over KV
    heads. Only the signals the method needs are used (the others may be ``None``)."""
    att = attention_signal(received) if scoring_method != "fft_only" else None
    freq = frequency_signal(keys, frequency_method) if scoring_method != "attention_only" else None
    return combine(att, freq, alpha, scoring_method)
