"""Full KV: every token of the stream is kept and attended (the upper bound, and the exactness anchor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mukv.cache.base import AnswerContext, CacheStats, WindowStreamingCache, register_cache


@register_cache("full")
@dataclass
class FullCache(WindowStreamingCache):
    """Keeps all KV; answers attend to init + every frame at their encoding positions."""

    display_order = 0
    query_block: int = 4096
    n_local: ClassVar[None] = None  # no window: everything is kept

    def recall(self, question: str) -> AnswerContext:
        return self.window_context()

    def stats(self) -> CacheStats:
        return self.window_stats()
