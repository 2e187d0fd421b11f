"""MuKV (CVPR'26): multi-grained KV blocks, dual-signal token trimming, segment-guided rerank.

While the stream plays, every chunk's visual tokens are flattened and cut into consecutive blocks of each
granularity (``granularities``, in frames: 0.25 / 1 / 4 = patch / frame / segment; 49 / 196 / 784 tokens for
LLaVA-OneVision); a partial block at the end of a chunk is dropped, as the published code does. Every block
is prefilled on its own with only the init prompt as prefix (positions ``n_init .. n_init + g - 1``; the
init KV is computed once per video and reused); blocks of one granularity are prefilled as one batch (they
share nothing but the init prefix, so this gives the same KV as one at a time), coarse to fine, and a finer
block that starts where a coarser one starts is cut from that prefill (``share_prefixes``: it is the coarser
block's causal prefix, so its KV and attention are the same). Each block keeps its
``int(g * keep_ratio)`` best tokens by ``alpha * attention received + (1 - alpha) * high-frequency energy``
(:mod:`mukv.cache.signals`), the same indices in every layer; its representative is the mean of the kept
tokens' last-layer keys, heads concatenated. Kept KV goes to the block store (un-rotated keys with their
encoding positions).

At a question: the raw question (no template) is prefilled after the init prompt (positions from
``n_init``) and the last layer's key of its last token is the query vector; like the representatives it is
taken with RoPE applied, at its position, because the published code reads both from transformers' cache,
which holds rotated keys; blocks are chosen per granularity by cosine similarity, reranked against the
mean of the best segments (:mod:`mukv.cache.rerank`), and assembled ``[init | patch | frame | segment]``
in score order, each token rotated at the position it was encoded with; the prompt follows at position
= cache length.

Published code vs paper (the code is the default, the paper's reading an option):

* ``query_vector``: ``last_key`` (code) | ``mean_query`` (paper: question queries averaged over tokens,
  heads concatenated; the representatives are then expanded over the GQA groups to match);
* ``retrieval_keys``: ``rotated`` (code: the keys transformers caches carry RoPE, so representatives and
  the query key are rotated at their encoding positions) | ``unrotated``;
* ``assembly``: ``published`` | ``time_ordered`` (blocks in stream order, contiguous re-rotated positions
  0..L-1, the prompt at L);
* ``patch_layout``: ``raster`` (code: 49 consecutive raster tokens) | ``quadrant`` (paper figure: the 2x2
  quadrants of the frame grid);
* ``block_context``: ``independent`` (code) | ``shared`` (ablation: the chunk is encoded once as a stream
  with the sink + sliding-window attention of ReKV (``n_local``), blocks are cut from that contextual KV;
  their attention signal is the attention of the block's own queries over init + block, and their
  frequency signal and rotated representatives use the block positions ``n_init..``, as in the independent
  case; the positions stored (used by ``assembly=published``) are their stream positions).

With ``granularities=[1.0]``, ``keep_ratio=[1.0]``, ``rerank=false``, ``assembly=time_ordered``,
``query_vector=mean_query``, ``retrieval_keys=unrotated`` and ``block_context=shared`` (ReKV's ``n_local``),
MuKV retrieves exactly what ReKV with ``scoring=cosine, per_layer=false`` retrieves (tested).

Keep count: a block keeps ``int(g * keep_ratio)`` tokens; where that is 0 the published trimming returns
the block untouched, so it keeps **every** token (``keep_floor=published``, the default). At the published
sizes this never happens (4 / 19 / 627), but with 16 tokens per frame a 4-token patch block at keep 0.1 is
exactly this case. ``keep_floor=one`` keeps one token instead (an option, not published).

Published options, off by default there and here: ``use_unified_layer`` (the frequency signal and the query
key are taken at the attention layer's index (``last_5``: the last layer) instead of the last layer; the
representatives and the de-duplication keys stay on the last layer, as published) and ``rerank_reverse``
(after the rerank, each granularity keeps the ``top_k`` *lowest* of its candidates: the published sanity
ablation; it needs the rerank, where the published code applies it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from mukv.cache import rerank as rr
from mukv.cache import signals
from mukv.cache.attention import SinkWindowKV
from mukv.cache.base import (
    AnswerContext,
    CacheMethod,
    CacheStats,
    Recalled,
    SinkWindowOptions,
    register_cache,
    tensor_bytes,
)
from mukv.cache.block_store import Block, BlockStore, StoreOptions, VideoStoreState
from mukv.cache.kernels import attention_weights, causal_suffix_attention, prefix_causal_mask
from mukv.cache.options import StrOption, check_options
from mukv.cache.signals import AttentionLayer, FrequencyMethod, ScoringMethod
from mukv.errors import ConfigError
from mukv.models.adapter import KVGeometry

log = logging.getLogger(__name__)


class KeepFloor(StrOption):
    """``keep_floor``: what a block keeps where ``int(g * keep_ratio)`` is 0."""

    published = "published"  # the whole block (the published trimming returns it untouched)
    one = "one"  # one token (this project's rule before 2026-12-02)


class QueryVector(StrOption):
    """``query_vector``: the question's retrieval vector."""

    last_key = "last_key"  # the code: the last question token's key
    mean_query = "mean_query"  # the paper: queries averaged over tokens


class RetrievalKeys(StrOption):
    """``retrieval_keys``: the keys behind the query vector and the representatives."""

    rotated = "rotated"  # the code (transformers' cache holds rotated keys)
    unrotated = "unrotated"  # ReKV's definition


class Assembly(StrOption):
    """``assembly``: the answer context's layout."""

    published = "published"  # [init | patch | frame | segment] in score order at the encoding positions
    time_ordered = "time_ordered"  # stream order, contiguous re-rotated positions


class PatchLayout(StrOption):
    """``patch_layout``: what a sub-frame block is."""

    raster = "raster"  # the code: consecutive raster tokens
    quadrant = "quadrant"  # the paper's figure: a quadrant of the frame grid


class BlockContext(StrOption):
    """``block_context``: how blocks are encoded."""

    independent = "independent"  # the code: each block after the init prompt alone
    shared = "shared"  # ablation: one streaming encoding (sink + window), blocks cut from it


# ----------------------------------------------------------------------------------------- budgets
def block_sizes(granularities: list[float], tokens_per_frame: int) -> list[int]:
    """Block sizes in tokens; raises ``ConfigError`` if one is not a whole, positive number of tokens."""
    sizes = []
    for x in granularities:
        tokens = float(x) * tokens_per_frame
        if not math.isfinite(tokens) or tokens <= 0:
            raise ConfigError("cache.granularities", f"granularities are positive numbers of frames, got {x}")
        whole = round(tokens)
        if abs(tokens - whole) > 1e-6 or whole < 1:
            raise ConfigError(
                "cache.granularities",
                f"{x} frame x {tokens_per_frame} tokens per frame = {tokens:g} tokens is not a whole number of "
                f"tokens for this model; choose granularities that are multiples of 1/{tokens_per_frame} frame")
        sizes.append(int(whole))
    return sizes


def kept_per_block(size: int, keep_ratio: float, keep_floor: KeepFloor | str = KeepFloor.published) -> int:
    """Tokens a block keeps: ``int(g * keep_ratio)``; where that is 0, the whole block (``published``: the
    published trimming returns such a block untouched) or one token (``one``)."""
    n = signals.keep_count(size, keep_ratio)
    if n >= 1:
        return n
    return size if keep_floor == "published" else 1


@dataclass(frozen=True)
class MuKVBudget:
    """Token arithmetic of a MuKV configuration on a model geometry (no weights needed)."""

    block_sizes: list[int]
    kept_per_block: list[int]
    top_k: list[int]

    @property
    def retrieved_tokens(self) -> int:
        """Context tokens after the init prompt when every granularity has at least top_k blocks."""
        return sum(k * n for k, n in zip(self.top_k, self.kept_per_block, strict=True))

    def online_tokens(self, n_init: int, n_prompt: int = 0) -> int:
        """Tokens the answer's first step attends to: init + retrieved + the question prompt."""
        return n_init + self.retrieved_tokens + n_prompt

    def stored_tokens(self, n_tokens: int) -> int:
        """Tokens stored for one chunk of ``n_tokens`` visual tokens (partial blocks dropped)."""
        return sum((n_tokens // g) * n for g, n in zip(self.block_sizes, self.kept_per_block, strict=True))


def mukv_budget(geometry: KVGeometry, cfg: Any) -> MuKVBudget:
    """The budget of a MuKV config (the dataclass or any object with its knobs) on ``geometry``."""
    sizes = block_sizes(list(cfg.granularities), geometry.tokens_per_frame)
    floor = getattr(cfg, "keep_floor", "published")
    kept = [kept_per_block(g, r, floor) for g, r in zip(sizes, cfg.keep_ratio, strict=True)]
    return MuKVBudget(sizes, kept, [int(k) for k in cfg.top_k])


# ----------------------------------------------------------------------------------- method state
Received = list[tuple[torch.Tensor, float]]  # per attention-signal layer: (attention received (B, g), weight)


@dataclass
class BlockPrefill:
    """A batch of B prefilled blocks of g tokens: what trimming reads (``prefill_blocks``, or cut from the
    shared stream encoding)."""

    keys: torch.Tensor  # (B, layers, H_kv, g, d), un-rotated
    values: torch.Tensor  # (B, layers, H_kv, g, d)
    last_keys_rot: torch.Tensor  # (B, H_kv, g, d): the last layer's keys rotated at the block positions
    signal_keys_rot: torch.Tensor  # the same at the frequency signal's layer (the last unless use_unified_layer)
    received: Received  # empty for scoring_method=fft_only
    # per prefix length n: ``received`` of the blocks' first n tokens taken alone (their queries over init + those
    # n keys: causal rows, so the same softmax); only the lengths asked of ``prefill_blocks``
    received_prefix: dict[int, Received] = field(default_factory=dict)

    def prefix(self, n: int, rows: list[int] | None) -> BlockPrefill:
        """The first ``n`` tokens of blocks ``rows`` (None: all; views, no copy) with the attention those tokens
        received as a block of their own (``n`` must be one of ``received_prefix``)."""
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        return BlockPrefill(keys=pick(self.keys[:, :, :, :n]), values=pick(self.values[:, :, :, :n]),
                            last_keys_rot=pick(self.last_keys_rot[:, :, :n]),
                            signal_keys_rot=pick(self.signal_keys_rot[:, :, :n]),
                            received=[(pick(r), w) for r, w in self.received_prefix[n]])


@dataclass
class TrimmedBlock:
    """A block after trimming, ready for the store."""

    keys: torch.Tensor  # (layers, H_kv, n, d) kept keys, un-rotated
    values: torch.Tensor  # (layers, H_kv, n, d)
    positions: torch.Tensor  # (n,) the positions the kept tokens were encoded at
    representative: torch.Tensor  # (heads * d,) fp32, the block's retrieval vector
    kept: torch.Tensor  # (n,) the kept tokens' offsets in the block


@dataclass
class TrimmedBatch:
    """Blocks of one granularity trimmed to the same number of tokens, as (B, ...) tensors: they are scored,
    gathered and stored together (``BlockStore.add_many``), a few operator calls per batch instead of per block."""

    keys: torch.Tensor  # (B, layers, H_kv, n, d) kept keys, un-rotated
    values: torch.Tensor
    positions: torch.Tensor  # (B, n)
    representatives: torch.Tensor  # (B, heads * d) fp32
    kept: torch.Tensor  # (B, n) the kept tokens' offsets in their block

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def block(self, row: int) -> TrimmedBlock:
        return TrimmedBlock(self.keys[row], self.values[row], self.positions[row], self.representatives[row],
                            self.kept[row])

    def take(self, rows: torch.Tensor) -> TrimmedBatch:
        return TrimmedBatch(*(getattr(self, f).index_select(0, rows.to(getattr(self, f).device))
                              for f in ("keys", "values", "positions", "representatives", "kept")))

    @staticmethod
    def cat(parts: list[TrimmedBatch]) -> TrimmedBatch:
        if len(parts) == 1:
            return parts[0]
        return TrimmedBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in
                              ("keys", "values", "positions", "representatives", "kept")))


def trimmed_entries(got: TrimmedBatch | list[TrimmedBlock]) -> list[tuple[TrimmedBatch, int] | TrimmedBlock]:
    """``MuKVCache._select``'s result as one entry per block: (batch, row) or the block itself."""
    return [(got, j) for j in range(len(got))] if isinstance(got, TrimmedBatch) else list(got)


@dataclass(frozen=True)
class MuKVPlan:
    """What the knobs mean on the bound model (``bind``), the same for every video."""

    sizes: list[int]  # block size per granularity, in tokens
    kept: list[int]  # tokens a block of each granularity keeps
    last_layer: int
    signal_layer: int  # the frequency signal's keys and the query key (use_unified_layer: the attention's)
    att_layers: list[tuple[int, float]]  # (layer, weight) whose attention scores tokens; [] for fft_only
    prob_layers: frozenset[int]  # their indices: attention probabilities are materialised there only


@dataclass
class MuKVVideoState:
    """What MuKV keeps of the current video (made by ``start_video``)."""

    n_init: int  # init prompt tokens
    init_k: list[torch.Tensor]  # per layer (1, H_kv, n_init, d), un-rotated
    init_v: list[torch.Tensor]
    init_k_rot: list[torch.Tensor]  # init_k rotated at 0..n_init-1
    store: BlockStore  # every trimmed block, all granularities
    block_ids: list[list[int]]  # per granularity: store ids, in storage order
    reprs: list[torch.Tensor]  # per granularity: (blocks, width) representatives stacked so far, on the device
    pending: list[list[torch.Tensor]]  # per granularity: representatives added since the last stack
    stream: list[SinkWindowKV] | None  # block_context=shared: the stream encoding's layers
    tokens_seen: int = 0


@dataclass(frozen=True)
class MuKVRecall:
    """MuKV's details of one recall (``AnswerContext.detail``), per granularity (``g<frames>``)."""

    blocks: dict[str, list[int]]  # chosen blocks in assembly-score order (storage indices)
    block_scores: dict[str, list[float]]  # their final scores
    online_tokens_per_granularity: dict[str, int]
    reranked: bool  # whether the segment-guided rerank ran (three granularities and rerank=true)


@register_cache("mukv")
@dataclass
class MuKVCache(VideoStoreState["MuKVVideoState"], CacheMethod, SinkWindowOptions, StoreOptions):
    """MuKV with the published defaults (LLaVA-OV-0.5B on RVS); see the module docstring."""

    display_order = 40

    granularities: list[float] = field(default_factory=lambda: [0.25, 1.0, 4.0])  # in frames
    top_k: list[int] = field(default_factory=lambda: [20, 32, 12])
    keep_ratio: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.8])
    keep_floor: KeepFloor = KeepFloor.published  # where int(g * keep_ratio) is 0: the whole block | one token
    alpha: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8])  # attention weight per granularity
    frequency: FrequencyMethod = FrequencyMethod.fft  # fft | diff | spectral_entropy
    attention_layer: AttentionLayer = AttentionLayer.last  # last | second_last | last_5 | middle
    scoring_method: ScoringMethod = ScoringMethod.attention_fft_weighted  # | attention_only | fft_only
    use_unified_layer: bool = False  # published option: frequency keys and query key at the attention layer
    dedup: bool = False
    dedup_threshold: float = 0.9
    rerank: bool = True  # applies with exactly three granularities (fine, medium, coarse), as published
    rerank_alpha: float = 0.3  # frame (medium) candidates
    rerank_beta: float = 0.3  # patch (fine) candidates
    rerank_top_n: int = 5
    rerank_reverse: bool = False  # published ablation: keep the lowest-scored candidates (needs rerank)
    query_vector: QueryVector = QueryVector.last_key  # code | mean_query (paper)
    retrieval_keys: RetrievalKeys = RetrievalKeys.rotated  # code | unrotated
    assembly: Assembly = Assembly.published  # | time_ordered
    patch_layout: PatchLayout = PatchLayout.raster  # code | quadrant (paper figure)
    block_context: BlockContext = BlockContext.independent  # code | shared (ablation)
    n_local: Optional[int] = 15000  # encoding window of block_context=shared (as ReKV; its sink options too)
    batch_blocks: int = 64  # independent blocks prefilled in one batched forward (a 16-frame chunk: one per granularity)
    share_prefixes: bool = True  # a finer block that starts where a coarser one does reuses its prefill (exact)
    query_block: int = 1024  # query tiling of the shared stream encoding

    @classmethod
    def budget_knobs(cls, frames: int, tokens_per_frame: int) -> dict:
        # the published top-k 20 / 32 / 12 (patch / frame / segment, beside ReKV's 64 frames) scaled to `frames`
        scale = frames / 64
        return {"top_k": [max(1, round(k * scale)) for k in (20, 32, 12)]}

    @classmethod
    def video_tokens(cls, knobs: dict, tokens_per_frame: int) -> int:
        # per granularity top_k blocks of kept_per_block tokens (MuKVBudget.retrieved_tokens; dedup can only drop)
        from types import SimpleNamespace

        geometry = SimpleNamespace(tokens_per_frame=tokens_per_frame)
        return mukv_budget(geometry, SimpleNamespace(**knobs)).retrieved_tokens  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------- validation
    def check_knobs(self, geometry: KVGeometry) -> None:
        n = len(self.granularities)
        if n == 0:
            raise ConfigError("cache.granularities", "at least one granularity is required")
        for name in ("top_k", "keep_ratio", "alpha"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"cache.{name}", f"has {len(getattr(self, name))} entries but cache.granularities "
                                                   f"has {n}; give one value per granularity")
        sizes = block_sizes(list(self.granularities), geometry.tokens_per_frame)
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ConfigError("cache.granularities", f"must be strictly increasing (fine to coarse), got "
                                                     f"{list(self.granularities)}")
        for k in self.top_k:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ConfigError("cache.top_k", f"must be positive integers, got {list(self.top_k)}")
        for r in self.keep_ratio:
            if not 0 < float(r) <= 1:
                raise ConfigError("cache.keep_ratio", f"must be in (0, 1], got {list(self.keep_ratio)}")
        for a in self.alpha:
            if not 0 <= float(a) <= 1:
                raise ConfigError("cache.alpha", f"must be in [0, 1], got {list(self.alpha)}")
        check_options(self, frequency=FrequencyMethod, attention_layer=AttentionLayer, scoring_method=ScoringMethod,
                      query_vector=QueryVector, retrieval_keys=RetrievalKeys, assembly=Assembly,
                      patch_layout=PatchLayout, block_context=BlockContext, keep_floor=KeepFloor)
        if not -1 <= self.dedup_threshold <= 1:
            raise ConfigError("cache.dedup_threshold", f"a cosine similarity in [-1, 1], got {self.dedup_threshold}")
        for name in ("rerank_alpha", "rerank_beta"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"cache.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        for name in ("rerank_top_n", "batch_blocks", "query_block"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cache.{name}", f"must be at least 1, got {getattr(self, name)}")
        if self.rerank_reverse and not (self.rerank and n == 3):
            raise ConfigError("cache.rerank_reverse", "reverses the reranked selection, as published: it needs "
                                                      "cache.rerank=true and three granularities")
        if self.n_local is not None and self.n_local < 1:
            raise ConfigError("cache.n_local", f"must be a positive number of tokens or null, got {self.n_local}")
        self.validate_sink_window()
        self.validate_store(geometry.head_dim)
        if self.patch_layout == "quadrant":
            t = geometry.tokens_per_frame
            side = math.isqrt(t)
            for x, g in zip(self.granularities, sizes, strict=True):
                if g < t and not (side * side == t and side % 2 == 0 and g * 4 == t):
                    raise ConfigError("cache.patch_layout",
                                      f"quadrant blocks are a quarter of a square frame grid with an even side; "
                                      f"granularity {x} ({g} tokens) of a {t}-token frame is not")

    def budget(self, geometry: KVGeometry | None = None) -> MuKVBudget:
        return mukv_budget(geometry or self.geometry, self)

    # ---------------------------------------------------------------------------------- binding
    def __post_init__(self) -> None:
        self._plan: MuKVPlan | None = None  # made by bind
        self._video: MuKVVideoState | None = None  # made by start_video
        self._warned_large = False  # a chunk held no complete block of some granularity (warned once)

    @property
    def plan(self) -> MuKVPlan:
        """The knobs on the bound model (``bind`` makes it)."""
        if self._plan is None:
            raise RuntimeError("MuKV: bind() to a model first")
        return self._plan

    def bind(self, llm) -> None:
        super().bind(llm)
        sizes = block_sizes(list(self.granularities), self.geometry.tokens_per_frame)
        n_layers = self.geometry.num_layers
        att_layers = (signals.attention_layers(self.attention_layer, n_layers)
                      if self.scoring_method != "fft_only" else [])
        self._plan = MuKVPlan(
            sizes=sizes,
            kept=[kept_per_block(g, r, self.keep_floor) for g, r in zip(sizes, self.keep_ratio, strict=True)],
            last_layer=n_layers - 1,
            signal_layer=(signals.unified_layer(self.attention_layer, n_layers) if self.use_unified_layer
                          else n_layers - 1),
            att_layers=att_layers, prob_layers=frozenset(i for i, _ in att_layers))
        self._warned_large = False

    # ----------------------------------------------------------------------------------- stream
    def start_video(self, init_ids: list[int]) -> None:
        n_layers, plan = self.geometry.num_layers, self.plan
        layers = [SinkWindowKV(None) for _ in range(n_layers)]

        def attend(idx, q, k, v, scaling):
            return layers[idx].attend_and_append(q, k, v, scaling, self.llm.rope)

        self.llm.forward(self.llm.embed_ids(init_ids), attend)
        init_k = [L.k for L in layers]  # (1, H_kv, n_init, d) un-rotated
        init_v = [L.v for L in layers]
        if self._video is not None:
            self._video.store.clear()  # the previous video's spill files go now
        width = self.geometry.num_kv_heads * self.geometry.head_dim
        stream = None
        if self.block_context == "shared":
            stream = [self.sink_window(self.n_local, self.query_block, self.geometry) for _ in range(n_layers)]
            for layer, k, v in zip(stream, init_k, init_v, strict=True):
                layer.k, layer.v = k, v
                layer.set_init(k, v)
        self._video = MuKVVideoState(
            n_init=len(init_ids), init_k=init_k, init_v=init_v,
            init_k_rot=[self.llm.rope.rotate_range(k, 0) for k in init_k],
            store=self.new_store(self.llm.device),
            block_ids=[[] for _ in plan.sizes],
            reprs=[torch.zeros(0, width, device=self.llm.device) for _ in plan.sizes],
            pending=[[] for _ in plan.sizes], stream=stream)

    def ingest(self, visual: torch.Tensor, first_frame: int) -> None:
        t = self.geometry.tokens_per_frame
        n_frames = visual.shape[0]
        start = first_frame * t
        flat = visual.reshape(-1, visual.shape[-1])
        if self.block_context == "shared":
            self._ingest_shared(flat, start)
        else:
            self._ingest_independent(visual, start)
        video = self.video
        video.tokens_seen = (first_frame + n_frames) * t
        video.store.flush()  # the chunk's blocks leave the device in one copy

    def _shares_prefix(self, fine: int, coarse: int) -> bool:
        """Whether a ``fine``-token block starting where a ``coarse``-token block starts is that block's first
        ``fine`` tokens: same token order (raster, or both sub-frame under ``patch_layout=quadrant``), and
        with independent encoding the same init-only context and positions, so causal attention gives the
        prefix the very KV and attention it would get alone."""
        t = self.geometry.tokens_per_frame
        return self.share_prefixes and (self.patch_layout == "raster" or (fine < t) == (coarse < t))

    def _ingest_independent(self, visual: torch.Tensor, start: int) -> None:
        """Coarse to fine: each granularity's blocks are prefilled in batches, except those that start where
        an already prefilled coarser block starts, which are cut from its prefill (``share_prefixes``: at the
        published 49 / 196 / 784 tokens, one in four patch and frame blocks, 490 instead of 588 token forwards
        per frame). Blocks are then trimmed and stored in stream order, as without sharing."""
        n_frames = visual.shape[0]
        t = visual.shape[1]
        sizes = self.plan.sizes
        # per granularity: block index -> the block trimmed (from its own prefill or a coarser one's)
        chosen: list[dict[int, tuple[TrimmedBatch, int] | TrimmedBlock]] = [{} for _ in sizes]
        for gi in reversed(range(len(sizes))):
            g = sizes[gi]
            tokens = self._layout(visual, g)
            n_blocks = tokens.shape[0] // g
            if n_blocks == 0:
                self._warn_large(g, n_frames)
                continue
            blocks = tokens[: n_blocks * g].reshape(n_blocks, g, -1)
            finer = [fi for fi in range(gi) if self._shares_prefix(sizes[fi], g)]
            fresh = [b for b in range(n_blocks) if b not in chosen[gi]]
            positions = self.video.n_init + torch.arange(g, device=visual.device)
            for a in range(0, len(fresh), self.batch_blocks):
                ids = fresh[a:a + self.batch_blocks]
                kv = self.prefill_blocks(blocks[ids] if len(ids) < n_blocks else blocks,
                                         prefix_lengths=[sizes[fi] for fi in finer])
                chosen[gi].update(zip(ids, trimmed_entries(self._select(gi, kv, positions.expand(len(ids), g))),
                                      strict=True))
                for fi in finer:  # blocks of a finer granularity that start where these start
                    gf = sizes[fi]
                    rows = [j for j, b in enumerate(ids) if (b * g) % gf == 0 and (b * g) // gf not in chosen[fi]]
                    if rows:
                        part = kv.prefix(gf, None if len(rows) == len(ids) else rows)
                        pos = positions[:gf].expand(len(rows), gf)  # a prefix sits at the block's first positions
                        chosen[fi].update(zip([ids[j] * g // gf for j in rows],
                                              trimmed_entries(self._select(fi, part, pos)), strict=True))
            order = start + self._layout(torch.arange(n_frames * t, device=visual.device).view(n_frames, t, 1),
                                         g).view(-1)  # video tokens
            # stream order, as without sharing
            self._store_many(gi, [chosen[gi].pop(b) for b in range(n_blocks)], start, order[: n_blocks * g])

    def _store_many(self, gi: int, entries: list, start: int, order: torch.Tensor) -> None:
        """Store a granularity's blocks of a chunk in stream order (block b starts at video token
        ``start + b * g``; ``order``: the video token of each of their tokens, block after block). Rows of trimmed
        batches go to the store as one batch (the batches joined by one ``cat``, their rows put in stream order by
        one gather)."""
        g, t = self.plan.sizes[gi], self.geometry.tokens_per_frame
        if not all(isinstance(e, tuple) for e in entries):  # blocks trimmed one by one (dedup): one by one
            for b, e in enumerate(entries):
                block = e[0].block(e[1]) if isinstance(e, tuple) else e
                self._store(gi, block, start + b * g, order[b * g:(b + 1) * g])
            return
        batches: dict[int, tuple[TrimmedBatch, int]] = {}  # distinct batches, in order, and their first row
        for batch, _ in entries:
            if id(batch) not in batches:
                batches[id(batch)] = (batch, sum(len(b) for b, _ in batches.values()))
        whole = TrimmedBatch.cat([b for b, _ in batches.values()])
        rows = [batches[id(batch)][1] + row for batch, row in entries]
        if rows != list(range(len(whole))):  # blocks from several prefills, interleaved: one gather
            whole = whole.take(torch.tensor(rows, device=whole.keys.device))
        video, n = self.video, len(entries)
        tokens = order.view(n, g).gather(1, whole.kept.to(order.device))
        ids = video.store.add_many(whole.keys, whole.values, whole.positions,
                                   [(start + b * g) / t for b in range(n)], g / t,
                                   meta={"granularity": [gi] * n, "video_tokens": tokens})
        video.block_ids[gi] += ids
        video.pending[gi].append(whole.representatives)

    def _warn_large(self, g: int, n_frames: int) -> None:
        if not self._warned_large:
            log.warning("MuKV: a chunk of %d frames holds no complete %d-token block; such blocks are dropped "
                        "(chunks end at engine.encode_chunk_size frames and at question times)", n_frames, g)
            self._warned_large = True

    def _layout(self, visual: torch.Tensor, g: int) -> torch.Tensor:
        """The chunk's tokens in the order blocks of size ``g`` are cut from: raster, or for sub-frame
        blocks with ``patch_layout=quadrant`` each frame's four quadrants one after another."""
        f, t, d = visual.shape
        if self.patch_layout == "quadrant" and g < t:
            half = math.isqrt(t) // 2
            grid = visual.reshape(f, 2, half, 2, half, d)  # frame, row half, row, col half, col
            return grid.permute(0, 1, 3, 2, 4, 5).reshape(f * t, d)
        return visual.reshape(f * t, d)

    # ------------------------------------------------------------------------- block prefill
    @torch.inference_mode()
    def prefill_blocks(self, blocks: torch.Tensor, prefix_lengths: list[int] = ()) -> BlockPrefill:
        """Prefill a batch of independent blocks (B, g, hidden), each after the init prompt only, at positions
        ``n_init ..``; ``received_prefix`` holds the attention signal of the blocks' first ``n`` tokens for each
        ``n`` in ``prefix_lengths`` (see ``BlockPrefill``)."""
        bsz, g, _ = blocks.shape
        plan, video = self.plan, self.video
        n0 = video.n_init
        rope = self.llm.rope
        mask = prefix_causal_mask(g, n0 + g, blocks.device)
        ks, vs = [None] * self.geometry.num_layers, [None] * self.geometry.num_layers
        rotated: dict[int, torch.Tensor] = {}  # the last and the signal layer's keys, rotated
        received: Received = []
        received_prefix: dict[int, Received] = {n: [] for n in prefix_lengths}

        def attend(idx, q, k, v, scaling):
            ks[idx], vs[idx] = k, v
            q_rot, k_rot = rope.rotate_range(q, n0), rope.rotate_range(k, n0)
            if idx in (plan.last_layer, plan.signal_layer):
                rotated[idx] = k_rot
            keys = torch.cat((video.init_k_rot[idx].expand(bsz, -1, -1, -1), k_rot), dim=-2)
            vals = torch.cat((video.init_v[idx].expand(bsz, -1, -1, -1), v), dim=-2)
            if idx not in plan.prob_layers:
                return causal_suffix_attention(q_rot, keys, vals, scaling)
            probs = attention_weights(q_rot, keys, scaling, mask)  # (B, Hq, g, n0 + g) fp32
            weight = dict(plan.att_layers)[idx]
            received.append((signals.attention_received(probs, n0, per_block=True), weight))
            for n in prefix_lengths:
                sub = probs[:, :, :n, : n0 + n]
                received_prefix[n].append((signals.attention_received(sub, n0, per_block=True), weight))
            groups = q.shape[1] // vals.shape[1]
            return torch.matmul(probs, vals.float().repeat_interleave(groups, dim=1)).to(q.dtype)

        self.llm.forward(blocks, attend)
        return BlockPrefill(keys=torch.stack(ks, dim=1), values=torch.stack(vs, dim=1),
                            last_keys_rot=rotated[plan.last_layer], signal_keys_rot=rotated[plan.signal_layer],
                            received=received, received_prefix=received_prefix)

    def _ingest_shared(self, flat: torch.Tensor, start: int) -> None:
        """block_context=shared: one stream forward of the chunk (sink + window), blocks cut from its KV."""
        ks, vs, qs, scale = {}, {}, {}, {}
        plan, video = self.plan, self.video

        def attend(idx, q, k, v, scaling):
            ks[idx], vs[idx] = k[0], v[0]
            if idx in plan.prob_layers:
                qs[idx], scale[idx] = q[0], scaling
            return video.stream[idx].attend_and_append(q, k, v, scaling, self.llm.rope)

        self.llm.forward(flat[None], attend)
        n_layers = self.geometry.num_layers
        keys = torch.stack([ks[i] for i in range(n_layers)])  # (layers, H_kv, N, d) un-rotated
        values = torch.stack([vs[i] for i in range(n_layers)])
        n0, rope = video.n_init, self.llm.rope
        t = self.geometry.tokens_per_frame
        for gi, g in enumerate(plan.sizes):
            order = self._layout(torch.arange(flat.shape[0], device=flat.device).view(-1, t, 1), g).view(-1)
            n_blocks = order.numel() // g
            if n_blocks == 0:
                self._warn_large(g, flat.shape[0] // t)
                continue
            blocks = order[: n_blocks * g].view(n_blocks, g)
            firsts = blocks[:, 0].tolist()  # one copy to the host, not one per block
            mask = prefix_causal_mask(g, n0 + g, flat.device)
            for a in range(0, n_blocks, self.batch_blocks):
                idx = blocks[a:a + self.batch_blocks]  # (B, g) chunk token indices
                bsz = idx.shape[0]
                kb = keys[:, :, idx].permute(2, 0, 1, 3, 4)  # (B, layers, H_kv, g, d)
                vb = values[:, :, idx].permute(2, 0, 1, 3, 4)
                received: Received = []
                for li, w in plan.att_layers:
                    # The block's own queries over init + block (as in the independent case).
                    q_rot = rope.rotate_range(qs[li][:, idx].transpose(0, 1), n0)  # (B, Hq, g, d)
                    k_all = torch.cat((video.init_k_rot[li].expand(bsz, -1, -1, -1), rope.rotate_range(kb[:, li], n0)),
                                      -2)
                    probs = attention_weights(q_rot, k_all, scale[li], mask)
                    received.append((signals.attention_received(probs, n0, per_block=True), w))
                kv = BlockPrefill(keys=kb, values=vb, received=received,
                                  last_keys_rot=rope.rotate_range(kb[:, plan.last_layer], n0),
                                  signal_keys_rot=rope.rotate_range(kb[:, plan.signal_layer], n0))
                got = trimmed_entries(self._select(gi, kv, n0 + start + idx))
                for j, (entry, b) in enumerate(zip(got, idx, strict=True)):
                    trimmed = entry[0].block(entry[1]) if isinstance(entry, tuple) else entry
                    self._store(gi, trimmed, start + firsts[a + j], start + b)

    # ------------------------------------------------------------------------------ trimming
    def _select(self, gi: int, kv: BlockPrefill, positions: torch.Tensor) -> TrimmedBatch | list[TrimmedBlock]:
        """Score and trim a batch of blocks of granularity ``gi`` (positions (B, g)); only the kept tokens
        are gathered (the batch itself may be a view into a larger prefill)."""
        g, keep = self.plan.sizes[gi], self.plan.kept[gi]
        if keep >= g:  # untouched (keep ratio 1, or a keep count of 0 with keep_floor=published): no scoring
            return self._gather_kept(kv, positions, torch.arange(g, device=positions.device).expand(len(positions), g))
        keys_mean = kv.signal_keys_rot.float().mean(dim=1)  # (B, g, d), KV-head mean, with RoPE
        scores = signals.token_scores(kv.received or None, keys_mean, float(self.alpha[gi]), self.scoring_method,
                                      self.frequency)
        if self.dedup:
            dedup_keys = kv.last_keys_rot.float().mean(dim=1)  # the last layer's, as published
            chosen = [signals.select_with_dedup(scores[b], dedup_keys[b], keep, self.dedup_threshold)
                      for b in range(scores.shape[0])]
        else:
            return self._gather_kept(kv, positions, signals.select_top(scores, keep))
        out = []
        for b, idx in enumerate(chosen):
            k = kv.keys[b][:, :, idx]  # (layers, H_kv, n, d)
            v = kv.values[b][:, :, idx]
            last = kv.last_keys_rot[b][:, idx] if self.retrieval_keys == "rotated" else k[self.plan.last_layer]
            reprs = last.float().mean(dim=1).reshape(-1)  # heads concatenated
            out.append(TrimmedBlock(k, v, positions[b][idx], reprs, idx))
        return out

    def _gather_kept(self, kv: BlockPrefill, positions: torch.Tensor, top: torch.Tensor) -> TrimmedBatch:
        """``_select``'s gather for a whole batch at once, when every block keeps the same number of tokens
        (``top``: (B, n)): a few operations per batch instead of per block (on a GPU each is a launch)."""
        keys, values = kv.keys, kv.values  # (B, layers, H_kv, g, d)
        idx = top[:, None, None, :, None].expand(-1, keys.shape[1], keys.shape[2], -1, keys.shape[-1])
        k, v = keys.gather(3, idx), values.gather(3, idx)
        if self.retrieval_keys == "rotated":
            last_keys = kv.last_keys_rot  # (B, H_kv, g, d)
            last = last_keys.gather(2, top[:, None, :, None].expand(-1, last_keys.shape[1], -1, last_keys.shape[-1]))
        else:
            last = k[:, self.plan.last_layer]
        reprs = last.float().mean(dim=2).reshape(top.shape[0], -1)  # heads concatenated
        pos = positions.gather(1, top)
        return TrimmedBatch(k, v, pos, reprs, top)

    def _store(self, gi: int, block: TrimmedBlock, start: int, tokens: torch.Tensor) -> None:
        """Add a trimmed block (starting at video token ``start``; ``tokens``: the video token index of each of
        its tokens, in block order) to the store and its representative."""
        t, video = self.geometry.tokens_per_frame, self.video
        bid = video.store.add(block.keys, block.values, block.positions, first_frame=start / t,
                              num_frames=self.plan.sizes[gi] / t,
                              meta={"granularity": gi, "video_tokens": tokens[block.kept.to(tokens.device)]})
        video.block_ids[gi].append(bid)
        video.pending[gi].append(block.representative[None])

    # ---------------------------------------------------------------------------------- recall
    @torch.inference_mode()
    def query(self, question: str) -> torch.Tensor:
        """The query vector: the raw question prefilled after the init prompt; the last layer's key of the
        last question token (``last_key``) or its queries averaged over tokens (``mean_query``)."""
        ids = self.llm.tokenize(question)
        n0, n = self.video.n_init, len(ids)
        if n == 0:  # no question tokens, no query: every block scores 0 (the earliest are taken)
            heads = self.geometry.num_kv_heads if self.query_vector == "last_key" else self.geometry.num_heads
            return torch.zeros(heads * self.geometry.head_dim, device=self.llm.device)
        rope, plan, video = self.llm.rope, self.plan, self.video
        got: dict[str, torch.Tensor] = {}

        def attend(idx, q, k, v, scaling):
            q_rot, k_rot = rope.rotate_range(q, n0), rope.rotate_range(k, n0)
            if idx == plan.signal_layer:
                rotated = self.retrieval_keys == "rotated"
                got["k"], got["q"] = (k_rot, q_rot) if rotated else (k, q)
            keys = torch.cat((video.init_k_rot[idx], k_rot), dim=-2)
            vals = torch.cat((video.init_v[idx], v), dim=-2)
            return causal_suffix_attention(q_rot, keys, vals, scaling)

        self.llm.forward(self.llm.embed_ids(ids), attend)
        if self.query_vector == "last_key":
            return got["k"][0, :, -1].float().reshape(-1)  # (H_kv * d)
        return got["q"][0].float().mean(dim=1).reshape(-1)  # (H_q * d)

    def block(self, gi: int, b: int) -> Block:
        """Block ``b`` (in storage order) of granularity ``gi``."""
        return self.video.store.blocks[self.video.block_ids[gi][b]]

    def representatives(self, gi: int) -> torch.Tensor:
        """(blocks, H_kv * d) representatives of granularity ``gi``, in storage order, on the device."""
        video = self.video
        if video.pending[gi]:
            video.reprs[gi] = torch.cat((video.reprs[gi], *video.pending[gi]))
            video.pending[gi] = []
        return video.reprs[gi]

    def _retrieval_reprs(self, gi: int) -> torch.Tensor:
        reprs = self.representatives(gi)
        if reprs.numel() == 0 or self.query_vector != "mean_query":
            return reprs
        groups = self.geometry.num_heads // self.geometry.num_kv_heads
        n = reprs.shape[0]
        return reprs.view(n, self.geometry.num_kv_heads, -1).repeat_interleave(groups, dim=1).reshape(n, -1)

    @torch.inference_mode()
    def recall(self, question: str) -> AnswerContext[MuKVRecall]:
        qv = self.query(question)
        video = self.video
        reprs = [self._retrieval_reprs(gi) for gi in range(len(self.plan.sizes))]
        reranked = self.rerank and len(self.plan.sizes) == 3
        chosen = rr.select_blocks(qv, reprs, list(self.top_k), rerank=reranked, alpha=self.rerank_alpha,
                                  beta=self.rerank_beta, top_n=self.rerank_top_n, reverse=self.rerank_reverse)
        # [patch | frame | segment], each in score order (published), or everything in stream order
        picks = [(gi, int(b)) for gi, sel in enumerate(chosen) for b in sel.indices.tolist()]
        if self.assembly == "time_ordered":
            picks.sort(key=lambda p: (self.block(*p).first_frame, p[0]))
        ids = [video.block_ids[gi][b] for gi, b in picks]
        device, rope = self.llm.device, self.llm.rope
        positions = torch.cat((torch.arange(video.n_init), video.store.positions(ids))).to(device)
        length = int(positions.numel())
        if self.assembly == "time_ordered":
            positions = torch.arange(length, device=device)
        out_k, out_v = [], []
        n_layers = self.geometry.num_layers
        loaded = video.store.layers_kv(ids, n_layers, device, video.init_k[0].dtype) if ids else [None] * n_layers
        for layer, blocks_kv in enumerate(loaded):
            k, v = video.init_k[layer], video.init_v[layer]
            if blocks_kv is not None:
                k, v = torch.cat((k, blocks_kv[0]), dim=-2), torch.cat((v, blocks_kv[1]), dim=-2)
            out_k.append(rope.rotate(k, positions))
            out_v.append(v)
        names = [f"g{x}" for x in self.granularities]
        detail = MuKVRecall(
            blocks={n: sel.indices.tolist() for n, sel in zip(names, chosen, strict=True)},
            block_scores={n: sel.scores.tolist() for n, sel in zip(names, chosen, strict=True)},
            online_tokens_per_granularity={
                n: sum(self.block(gi, b).tokens for b in sel.indices.tolist())
                for gi, (n, sel) in enumerate(zip(names, chosen, strict=True))},
            reranked=reranked)
        # the video tokens (frame * tokens_per_frame + index in frame) the answer sees
        tokens = sorted(t for i in ids for t in video.store.blocks[i].meta["video_tokens"])
        groups = {n: [t for b in sel.indices.tolist() for t in self.block(gi, b).meta["video_tokens"]]
                  for gi, (n, sel) in enumerate(zip(names, chosen, strict=True))}  # per granularity (explorer)
        return AnswerContext(out_k, out_v, next_position=length, recalled=Recalled(tokens=tokens, groups=groups),
                             detail=detail)

    # ----------------------------------------------------------------------------------- stats
    def stats(self) -> CacheStats:
        """kv: init + the stored blocks (host / disk); device: init, representatives, the shared stream's
        window (block_context=shared)."""
        video = self.video
        init = tensor_bytes(*video.init_k, *video.init_v)
        reprs = sum(self.representatives(gi).numel() * 4 for gi in range(len(self.plan.sizes)))  # fp32
        device = init + reprs
        if video.stream is not None:
            device += sum(tensor_bytes(L.k, L.v) for L in video.stream)
        return CacheStats(kv_tokens=video.store.tokens + video.n_init, kv_bytes=video.store.nbytes + init,
                          device_kv_bytes=device, aux_bytes=reprs)
