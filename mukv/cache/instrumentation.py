"""Work counted where it is done, so that cost curves do not depend on the machine.

``mukv.bench --growth`` and the tests that pin a flat per-frame cost read these counters; the kernels
(:mod:`mukv.cache.kernels`) and the model adapter add to them. Counting is a few integer additions per call.
"""

from __future__ import annotations

import torch


class OpCounter:
    """Query-key pairs scored by attention (batch x query heads x queries x keys, masked pairs included: they
    are computed) and tokens run through the language model. Reset by the caller."""

    attention_pairs = 0
    llm_tokens = 0

    @classmethod
    def reset(cls) -> None:
        cls.attention_pairs = cls.llm_tokens = 0


def count_attention(q: torch.Tensor, k: torch.Tensor) -> None:
    """Count the query-key pairs of attending ``q`` (B, Hq, Lq, d) to ``k`` (..., Lk, d)."""
    OpCounter.attention_pairs += q.shape[0] * q.shape[1] * q.shape[-2] * k.shape[-2]
