"""Full KV: every token of the stream is kept and attended (the upper bound, and the exactness anchor).

``positions=bounded`` (an option, not published): when the stream outgrows the positions the model was
trained on (``VideoLLM.trained_positions``, or ``bounded_span``), the answer sees the same tokens with the
video's positions scaled into that span (position interpolation), so that at 10-20x the training length the
upper bound measures memory rather than extrapolation of the answer's positions. The encoding itself is
unchanged: later frames were still encoded attending to the whole stream at its real distances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from mukv.cache.base import AnswerContext, CacheStats, WindowStreamingCache, register_cache
from mukv.cache.options import StrOption, check_options
from mukv.errors import ConfigError


class FullPositions(StrOption):
    """``positions``: where the answer sees the stream's tokens."""

    encoding = "encoding"  # at their encoding positions (published)
    bounded = "bounded"  # video positions scaled into the trained span once the stream outgrows it


@register_cache("full")
@dataclass
class FullCache(WindowStreamingCache):
    """Keeps all KV; answers attend to init + every frame at their encoding positions."""

    display_order = 0
    query_block: int = 4096
    positions: FullPositions = FullPositions.encoding
    bounded_span: Optional[int] = None  # positions=bounded: the span (null: the model's trained_positions)
    n_local: ClassVar[None] = None  # no window: everything is kept

    @classmethod
    def video_tokens(cls, knobs: dict, tokens_per_frame: int) -> None:
        return None  # no budget: the whole stream

    def check_knobs(self, geometry) -> None:
        check_options(self, positions=FullPositions)
        if self.bounded_span is not None and self.bounded_span < 1:
            raise ConfigError("cache.bounded_span", f"must be a positive number of positions, got {self.bounded_span}")

    def bind(self, llm) -> None:
        super().bind(llm)
        if self.positions == FullPositions.bounded and self.bounded_span is None and llm.trained_positions is None:
            raise ConfigError("cache.bounded_span", f"positions=bounded needs a span: the model {llm.name} does not "
                                                    "say which positions it was trained on; set cache.bounded_span")

    def recall(self, question: str) -> AnswerContext:
        context = self.window_context()
        span = self.bounded_span or self.llm.trained_positions
        n = context.next_position
        if self.positions != FullPositions.bounded or n <= span or span <= self.n_init:
            return context
        n_video = n - self.n_init  # the init prompt keeps its positions; the video's are scaled into the rest
        device = self.layers[0].k.device
        scale = (span - self.n_init) / n_video
        positions = torch.cat((torch.arange(self.n_init, device=device, dtype=torch.float32),
                               self.n_init + torch.arange(n_video, device=device, dtype=torch.float32) * scale))
        keys = [self.llm.rope.rotate(layer.k, positions) for layer in self.layers]
        return AnswerContext(keys, context.values, next_position=int(span), recalled=context.recalled)

    def stats(self) -> CacheStats:
        return self.window_stats()
