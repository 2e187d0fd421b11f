"""ReKV (ICLR'25), as the published code behaves: sink + sliding-window encoding, every completed frame
block offloaded with a representative key, per-layer retrieval from the question's queries, answering
over init + retrieved blocks re-rotated to contiguous positions.

Retrieval forward: the raw question (no template) runs through the model; at each layer its un-rotated
queries, averaged over tokens (heads concatenated), score that layer's blocks; the question's tokens then
attend to init + the layer's retrieved blocks + themselves at contiguous positions, and that output feeds
the next layer (so deeper layers retrieve with queries shaped by what shallower layers recalled). The
question's KV is dropped; the answer context of each layer is init + its retrieved blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mukv.cache.base import (
    AnswerContext,
    CacheStats,
    Recalled,
    SinkWindowOptions,
    WindowStreamingCache,
    register_cache,
    tensor_bytes,
)
from mukv.cache.block_store import BlockStore, StoreOptions, VideoStoreState
from mukv.cache.retrieval import (
    BlockScoring,
    attend_after_context,
    block_representatives,
    question_vector,
    score_blocks,
    select_top_blocks,
)
from mukv.errors import ConfigError


@dataclass
class ReKVVideoState:
    """What ReKV keeps of the current video beside its window (made by ``start_video``)."""

    store: BlockStore  # every completed frame block, all layers, offloaded
    reprs: torch.Tensor  # (layers, blocks, H * d) representative keys, on the device
    # per layer, the un-rotated KV of the frames being ingested (filled while the chunk runs, then stored)
    new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class ReKVRecall:
    """ReKV's details of one recall (``AnswerContext.detail``)."""

    blocks: list[int]  # the first layer's retrieved blocks (frames), in time order
    layers_differ: bool  # whether some layer retrieved other blocks


@register_cache("rekv")
@dataclass
class ReKVCache(VideoStoreState[ReKVVideoState], WindowStreamingCache, SinkWindowOptions, StoreOptions):
    published_answer_text = "remove_newlines"  # ReKV's release: pred_answer.replace('\n', '')
    display_order = 30

    n_local: int = 15000  # encoding window (tokens), the init sink aside
    # (the sinks: sink_distance = published (n_local - 1) | n_local and sink_handover = per_block | exact, from
    # SinkWindowOptions; the defaults are the published code's)
    retrieve_size: int = 64  # blocks (frames) recalled per layer
    retrieve_chunk_size: int = 1  # score and take consecutive blocks in groups of this size
    scoring: BlockScoring = BlockScoring.dot  # dot (published code) | cosine (paper)
    per_layer: bool = True  # per-layer retrieval (code) | one block set for all layers (see recall)
    query_block: int = 1024

    @classmethod
    def budget_knobs(cls, frames: int, tokens_per_frame: int) -> dict:
        return {"retrieve_size": frames}  # frame blocks recalled per layer (the window is not the budget)

    @classmethod
    def video_tokens(cls, knobs: dict, tokens_per_frame: int) -> int:
        # retrieve_size one-frame blocks per layer (retrieve_chunk_size divides it: whole groups); not the window
        return int(knobs["retrieve_size"]) * tokens_per_frame

    def __post_init__(self) -> None:
        self._video: ReKVVideoState | None = None  # made by start_video

    def check_knobs(self, geometry) -> None:
        for name in ("n_local", "retrieve_size", "retrieve_chunk_size", "query_block"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cache.{name}", f"must be at least 1, got {getattr(self, name)}")
        if self.retrieve_size % self.retrieve_chunk_size:
            raise ConfigError("cache.retrieve_chunk_size",
                              f"must divide retrieve_size ({self.retrieve_size}), got {self.retrieve_chunk_size}")
        if self.scoring not in BlockScoring.values():
            raise ConfigError("cache.scoring", f"unknown scoring '{self.scoring}'; choose dot or cosine")
        self.validate_sink_window()
        self.validate_store(geometry.head_dim)

    # ---------------------------------------------------------------------------------- streaming
    def start_video(self, init_ids: list[int]) -> None:
        super().start_video(init_ids)
        if self._video is not None:
            self._video.store.clear()  # the previous video's spill files go now
        reprs = torch.empty(self.geometry.num_layers, 0, self.geometry.num_heads * self.geometry.head_dim,
                            device=self.llm.device)
        self._video = ReKVVideoState(store=self.new_store(self.llm.device), reprs=reprs)

    def capture_new_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.video.new_kv[layer_idx] = (k, v)

    def ingest(self, visual: torch.Tensor, first_frame: int) -> None:
        super().ingest(visual, first_frame)
        frames, t = visual.shape[0], self.geometry.tokens_per_frame
        layers, video = range(self.geometry.num_layers), self.video
        k = torch.cat([video.new_kv[i][0] for i in layers])  # (layers, kv_heads, F*T, d)
        v = torch.cat([video.new_kv[i][1] for i in layers])
        video.new_kv.clear()
        kb = k.unflatten(2, (frames, t))  # (layers, kv_heads, F, T, d)
        vb = v.unflatten(2, (frames, t))
        start = self.n_init + first_frame * t  # the chunk's frames as one batch of frame blocks
        positions = torch.arange(start, start + frames * t).view(frames, t)
        video.store.add_many(kb.transpose(0, 2).transpose(1, 2), vb.transpose(0, 2).transpose(1, 2), positions,
                             [first_frame + f for f in range(frames)], 1)
        video.reprs = torch.cat((video.reprs, block_representatives(kb, self.geometry.num_heads)), dim=1)
        video.store.flush()  # the chunk's blocks leave the device in one copy

    # ---------------------------------------------------------------------------------- recall
    def recall(self, question: str) -> AnswerContext[ReKVRecall]:
        """Per layer: init + retrieved blocks (time order), positions 0..L-1.

        ``per_layer=False`` (an option, not in the published code): the question runs over the init prompt
        only and one block set, chosen with the last layer's queries, serves every layer.
        """
        ids = self.llm.tokenize(question)
        rope = self.llm.rope
        chosen: list[list[int]] = [[] for _ in range(self.geometry.num_layers)]
        contexts: list[tuple[torch.Tensor, torch.Tensor]] = [None] * self.geometry.num_layers  # type: ignore

        def retrieve(idx: int, q, k, v, scaling):
            picked = [] if self.per_layer is False and idx < self.geometry.num_layers - 1 else \
                select_top_blocks(score_blocks(self.video.reprs[idx], question_vector(q), self.scoring),
                                  self.retrieve_size, self.retrieve_chunk_size)
            chosen[idx] = picked
            ctx_k, ctx_v = self._layer_context(idx, picked)
            contexts[idx] = (ctx_k, ctx_v)
            return attend_after_context(ctx_k, ctx_v, q, k, v, scaling, rope)

        self.run_layers(self.llm.embed_ids(ids), retrieve)
        if not self.per_layer:
            shared = chosen[-1]
            chosen = [shared for _ in chosen]
            contexts = self._all_layer_contexts(shared)
        keys = [rope.rotate_range(k, 0) for k, _ in contexts]
        return AnswerContext(keys, [v for _, v in contexts], next_position=int(keys[0].shape[-2]),
                             recalled=Recalled(frames=sorted(set().union(*chosen))),  # in some layer's context
                             detail=ReKVRecall(blocks=chosen[0], layers_differ=any(c != chosen[0] for c in chosen)))

    def _layer_context(self, layer: int, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated init + blocks for one layer."""
        init_k, init_v = self.layers[layer].init_k, self.layers[layer].init_v
        if not blocks:
            return init_k, init_v
        k, v = self.store.layer_kv(blocks, layer, init_k.device, init_k.dtype)
        return torch.cat((init_k, k), dim=-2), torch.cat((init_v, v), dim=-2)

    def _all_layer_contexts(self, blocks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``_layer_context`` of every layer for one block set (through the store's prefetching loader)."""
        if not blocks:
            return [(L.init_k, L.init_v) for L in self.layers]
        init = self.layers[0].init_k
        loaded = self.store.layers_kv(blocks, self.geometry.num_layers, init.device, init.dtype)
        return [(torch.cat((L.init_k, k), dim=-2), torch.cat((L.init_v, v), dim=-2))
                for L, (k, v) in zip(self.layers, loaded, strict=True)]

    def stats(self) -> CacheStats:
        """kv: the offloaded blocks + the window; device: the window and the representative keys."""
        window = self.window_stats()
        return CacheStats(kv_tokens=self.store.tokens + window.kv_tokens,
                          kv_bytes=self.store.nbytes + window.kv_bytes,
                          device_kv_bytes=window.device_kv_bytes + tensor_bytes(self.video.reprs),
                          aux_bytes=tensor_bytes(self.video.reprs))
