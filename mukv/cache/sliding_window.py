"""Sliding window with an attention sink: the init prompt plus the most recent ``n_local`` tokens.

Encoding is the same sink + window attention as ReKV's (shared ``SinkWindowKV``, with the same
``sink_distance`` / ``sink_handover`` knobs and defaults); the answer attends to the init tokens and the
window, re-rotated to contiguous positions (no sink distance there).
"""

from __future__ import annotations

from dataclasses import dataclass

from mukv.cache.base import AnswerContext, CacheStats, SinkWindowOptions, WindowStreamingCache, register_cache
from mukv.errors import ConfigError


@register_cache("sliding_window")
@dataclass
class SlidingWindowCache(WindowStreamingCache, SinkWindowOptions):
    display_order = 10
    n_local: int = 15000
    query_block: int = 1024

    @classmethod
    def budget_knobs(cls, frames: int, tokens_per_frame: int) -> dict:
        return {"n_local": frames * tokens_per_frame}  # the window holds the last `frames` frames

    @classmethod
    def video_tokens(cls, knobs: dict, tokens_per_frame: int) -> int:
        return int(knobs["n_local"])  # the answer attends to the init prompt + the window's n_local tokens

    def check_knobs(self, geometry) -> None:
        if self.n_local < 1:
            raise ConfigError("cache.n_local", f"must be a positive number of tokens, got {self.n_local}")
        self.validate_sink_window()

    def recall(self, question: str) -> AnswerContext:
        return self.window_context()

    def stats(self) -> CacheStats:
        return self.window_stats()
