"""Uniform sparse sampling: at question time, ``num_frames`` frames spread evenly over [0, t] are encoded
fresh (init prompt + those frames, full attention) and the answer attends to them.

No KV is kept while the stream plays; the visual tokens of every frame are (``aux_bytes``), so that
sampling never re-decodes video. The cost of encoding shows up in the answer latency, as it would live.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mukv.cache.attention import SinkWindowKV
from mukv.cache.base import AnswerContext, CacheMethod, CacheStats, Recalled, register_cache, tensor_bytes
from mukv.errors import ConfigError


@register_cache("uniform")
@dataclass
class UniformSampling(CacheMethod):
    display_order = 20
    num_frames: int = 64
    query_block: int = 4096

    @classmethod
    def budget_knobs(cls, frames: int, tokens_per_frame: int) -> dict:
        return {"num_frames": frames}

    @classmethod
    def video_tokens(cls, knobs: dict, tokens_per_frame: int) -> int:
        return int(knobs["num_frames"]) * tokens_per_frame  # the sampled frames, whole

    def check_knobs(self, geometry) -> None:
        if self.num_frames < 1:
            raise ConfigError("cache.num_frames", f"must be at least 1, got {self.num_frames}")

    def start_video(self, init_ids: list[int]) -> None:
        self.init_ids = list(init_ids)
        self.features: list[torch.Tensor] = []

    def ingest(self, visual: torch.Tensor, first_frame: int) -> None:
        self.features.extend(visual.unbind(0))

    def sampled_frames(self) -> list[int]:
        """Frame indices, evenly spread over everything shown so far (all of them if fewer)."""
        n = len(self.features)
        if n <= self.num_frames:
            return list(range(n))
        return np.linspace(0, n - 1, self.num_frames).round().astype(int).tolist()

    def recall(self, question: str) -> AnswerContext:
        picked = self.sampled_frames()
        layers = [SinkWindowKV(None, self.query_block) for _ in range(self.geometry.num_layers)]
        init = self.llm.embed_ids(self.init_ids)
        embeds = torch.cat([init] + [self.features[i][None] for i in picked], dim=1) if picked else init

        def attend(idx, q, k, v, scaling):
            return layers[idx].attend_and_append(q, k, v, scaling, self.llm.rope)

        self.run_layers(embeds, attend)
        keys = [self.llm.rope.rotate_range(L.k, 0) for L in layers]
        return AnswerContext(keys, [L.v for L in layers], next_position=int(keys[0].shape[-2]),
                             recalled=Recalled(frames=picked))

    def stats(self) -> CacheStats:
        return CacheStats(kv_tokens=0, kv_bytes=0, device_kv_bytes=0, aux_bytes=tensor_bytes(*self.features))
