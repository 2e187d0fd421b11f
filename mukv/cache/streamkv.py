"""StreamKV (arXiv 2511.07278): semantic segments, guidance-prompt compression and layer-adaptive retrieval on
ReKV's encoding, as its released code (``sou1p0wer/StreamKV``, ``run_eval.sh``).

* *Segments.* Frames are grouped by the cosine similarity of their mean visual feature with the previous
  frame's: a frame joins the open segment while the segment is shorter than ``min_segment_frames`` or the
  similarity is above ``segment_theta``; otherwise the segment is encoded and the frame opens the next one.
  Past ``max_segment_frames`` the two most similar adjacent frames of the segment are averaged into one.
* *Encoding.* A segment, followed by one summary frame (the mean of its frames' features,
  ``use_segment_summary``), is encoded as ReKV does (sink + sliding window), each frame a block offloaded with
  its mean key. The guidance prompt is run after it in the same forward, attending to the segment and itself
  only, at positions from 0; per layer each frame is scored by the dot product of the prompt's mean query with
  the frame's mean key (un-rotated, heads concatenated).
* *Compression.* Each layer keeps a number of the segment's frames found from one global threshold on every
  layer's cumulative softmax of its z-scored scores (binary search, ``layer_counts``) for a total of
  ``compression_ratio`` of the frames over the layers, then rescaled into ``[1, frames]`` around that mean
  (``compress_temp``; ``rescale_counts``): its top frames by score, and the summary frame; the rest is deleted.
* *Retrieval.* The raw question runs twice over init + each layer's blocks: first with ``retrieve_size`` blocks
  per layer, to score every layer's blocks; the same threshold rule then gives each layer its own count
  (mean ``retrieve_size``, range ``retrieve_size x (1 -+ retrieve_temp)``, at most 128); the second run
  retrieves that many per layer: the ``retrieve_local_size`` most recent blocks and the best of the others.
  The answer attends to init + the layer's blocks at contiguous positions, each layer from its own length.
* *Questions in a stream.* The release re-encodes the video from the start for every question, so the open
  segment is encoded (and compressed) as if the video ended there; here it is encoded into a copy of the state
  for the question and discarded, which is the same (closed segments do not depend on later frames).

The init prompt and the answer's template are the engine's (the same for every method); the release uses its
own system prompt. See the README (section StreamKV).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
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
from mukv.cache.block_store import BlockStore, StoreOptions
from mukv.cache.kernels import causal_suffix_attention, grouped_sdpa, token_range
from mukv.cache.options import StrOption, check_options
from mukv.cache.retrieval import (
    BlockScoring,
    attend_after_context,
    block_representatives,
    question_vector,
    question_vectors,
    score_blocks,
)
from mukv.errors import ConfigError

GUIDANCE_PROMPT = (
    "For this event segment in the video, please prioritize retaining the following visual information:1)Key "
    "objects, people, and their attributes, and any changes or transitions during the event.2)Major actions, state "
    "transitions, and interactions (e.g., who/what is doing what, when, and where), including the precise timing of "
    "key moments.3)On-screen text, numbers, and all visible cues (such as labels, scores, timer, signs, etc.)."
    "4)Causal relationships, outcome(s), anomalies, and salient shifts within the segment (e.g., cause-effect "
    "chains, rare or surprising events, turning points).5)Counts and spatial arrangements of important objects or "
    "people, as well as layout details that may support summarization, prediction, or sequential reasoning in "
    "later queries.6)Any misleading, ambiguous, or easily confused visual clues\u2014ensure enough context is "
    "preserved to distinguish the current event state from similar past/future states.")
MAX_RETRIEVE = 128  # the release's cap on a layer's retrieval count
COUNT_TOLERANCE = 5  # the threshold search stops within this many blocks of its target


class SegmentMode(StrOption):
    """``segment_mode``: how frames are grouped into segments."""

    semantic = "semantic"  # by feature similarity (published run)
    uniform = "uniform"  # fixed max_segment_frames (the release's other mode)


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two frames' mean visual features ((tokens, hidden) each), as the release."""
    x, y = a.float().mean(0), b.float().mean(0)
    return float(x @ y / (x.norm() * y.norm() + 1e-8))


def consecutive_similarities(features: torch.Tensor, previous: torch.Tensor | None) -> list[float]:
    """``frame_similarity`` of each frame of ``features`` (F, tokens, hidden) with the one before it (the first
    with ``previous``; nan without one), read by the host once for all frames instead of once per frame."""
    means = features.float().mean(1)
    if previous is not None:
        means = torch.cat((previous.float().mean(0)[None], means))
    a, b = means[:-1], means[1:]
    sims = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)
    return ([math.nan] if previous is None else []) + sims.tolist()


def merge_most_similar(frames: list[torch.Tensor], spans: list[list[int]], sims: list[float]) -> None:
    """Average the two adjacent frames of a segment whose similarity is highest, in place (``sims[i]``: frame i
    with frame i + 1), and update the similarities around the merged frame."""
    i = max(range(len(sims)), key=sims.__getitem__)
    merged = (frames[i] + frames[i + 1]) / 2
    frames[i], spans[i] = merged, spans[i] + spans[i + 1]
    del frames[i + 1], spans[i + 1]
    if i > 0:
        sims[i - 1] = frame_similarity(frames[i - 1], merged)
    if i + 1 < len(sims):
        sims[i] = frame_similarity(merged, frames[i + 1])
        del sims[i + 1]
    else:
        del sims[i]


def _cumulative_shares(s: torch.Tensor, dim: int) -> torch.Tensor:
    """``layer_counts``' table along ``dim``: z-scores (0 where the scores are constant), softmax, sorted
    descending, cumulative sum."""
    if s.shape[dim] > 1:
        spread = s.std(dim=dim, keepdim=True)
        z = torch.where(spread > 0, (s - s.mean(dim=dim, keepdim=True)) / spread, 0.0)  # constant scores: uniform
    else:
        z = torch.zeros_like(s)
    return z.softmax(dim).sort(dim=dim, descending=True).values.cumsum(dim)


def layer_counts(scores: list[torch.Tensor] | torch.Tensor, target: int) -> list[int]:
    """Per layer, how many of its blocks to keep: each layer's scores z-scored and softmaxed, sorted, summed
    cumulatively; one threshold for all layers (binary search in (0, 1)) so that the blocks before it, at least
    one per layer, total ``target`` (within ``COUNT_TOLERANCE``). Constant scores (one block, identical frames)
    count as uniform (the release divides by a zero deviation there). ``scores``: one tensor per layer, or a
    (layers, blocks) tensor when every layer has as many (a segment's frames): then each step runs for all
    layers at once (bit for bit the per-layer rule, tested), a few operator calls instead of a dozen per layer."""
    return threshold_counts(read_count_table(scores), target)


def count_table(scores: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """``layer_counts``' table on the device: (layers, blocks) cumulative shares, rows padded with inf."""
    if isinstance(scores, torch.Tensor):
        return _cumulative_shares(scores.float(), dim=1)
    cumulative = [_cumulative_shares(s.float(), dim=0) for s in scores]
    width = max(c.numel() for c in cumulative)
    return torch.stack([torch.cat((c, c.new_full((width - c.numel(),), math.inf))) for c in cumulative])


def read_count_table(scores: list[torch.Tensor] | torch.Tensor) -> np.ndarray:
    """``count_table`` read by the host (one read), in its fp32 precision."""
    return np.asarray(count_table(scores).tolist(), dtype=np.float32)


def threshold_counts(rows: np.ndarray, target: int) -> list[int]:
    """``layer_counts`` from its table read by the host (``count_table``, fp32): the search runs there."""

    def counts_at(threshold: float) -> np.ndarray:
        t = np.float32(threshold)  # compared in the table's precision, as torch.searchsorted on it would
        return np.maximum(np.array([np.searchsorted(row, t, side="left") for row in rows]), 1)

    low, high, mid = 0.0, 1.0, 0.0
    while high - low > 1e-6:
        mid = (low + high) / 2
        total = int(counts_at(mid).sum())
        if abs(total - target) < COUNT_TOLERANCE:
            break
        if total > target:
            high = mid
        else:
            low = mid
    return [int(c) for c in counts_at(mid)]


def rescale_counts(counts: list[int], low: float, high: float) -> list[int]:
    """Spread the layers' counts linearly over ``[low, high]``, scale them back to their total, round and clip,
    then move single blocks (from the smallest counts up, or the largest down, in numpy's default argsort
    order as the release) until the total is restored."""
    arr = np.asarray(counts, dtype=np.float64)
    total, lo, hi = arr.sum(), arr.min(), arr.max()
    if lo == hi:
        return [int(c) for c in counts]
    spread = (arr - lo) / (hi - lo) * (high - low) + low
    mapped = np.clip(np.round(spread * (total / spread.sum())), low, high)
    diff = int(round(total - mapped.sum()))
    step = 1 if diff > 0 else -1
    for i in np.argsort(mapped if diff > 0 else -mapped):
        if diff == 0:
            break
        if (step > 0 and mapped[i] < high) or (step < 0 and mapped[i] > low):
            mapped[i] += step
            diff -= step
    return [int(c) for c in mapped]


def select_with_recent(scores: torch.Tensor, count: int, recent: int | None) -> list[int]:
    """``count`` blocks in time order: all when there are no more; else the ``recent`` newest and the best-scored
    of the others (``recent`` None: the best-scored of all); the newest ``count`` when ``count < recent``."""
    n = int(scores.shape[0])
    if n <= count:
        return list(range(n))
    if recent is None:
        return scores.topk(count).indices.sort().values.tolist()
    if count < recent:
        return list(range(n - count, n))
    best = scores[:n - recent].topk(count - recent).indices.tolist() if count > recent else []
    return sorted(best + list(range(n - recent, n)))


@dataclass
class KeptBlocks:
    """Every layer's kept frames: one block store for all of them (block i is one layer's frame, KV of that layer
    only, its representative key ``reprs[i]``), so a segment's kept frames of every layer are gathered, added and
    moved to host memory at once (operator calls are host time on a GPU); ``ids[l]`` lists layer l's blocks in
    time order and ``frames[l]`` the video frames each covers ([] for a summary)."""

    store: BlockStore | _OverlayStore
    reprs: torch.Tensor  # (blocks, H * d), row i for block i
    ids: list[list[int]]
    frames: list[list[list[int]]]
    pending: list[_EncodedSegment] = field(default_factory=list)  # encoded, not yet added (``StreamKV.settle``)

    @classmethod
    def empty(cls, store: BlockStore, num_layers: int, width: int, device: torch.device) -> KeptBlocks:
        return cls(store, torch.empty(0, width, device=device), [[] for _ in range(num_layers)],
                   [[] for _ in range(num_layers)])

    def for_question(self) -> KeptBlocks:
        """A copy whose additions (the open segment, for one question) leave this one as it is (settled)."""
        assert not self.pending, "settle the kept blocks before copying them"
        return KeptBlocks(_OverlayStore(self.store), self.reprs, [list(i) for i in self.ids],
                          [list(f) for f in self.frames])

    def held(self) -> list[int]:
        """Blocks each layer holds."""
        return [len(i) for i in self.ids]

    def layer_reprs(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s representative keys (its blocks, H * d), in time order."""
        return self.reprs.index_select(0, torch.tensor(self.ids[layer], dtype=torch.long, device=self.reprs.device))


@dataclass
class _EncodedSegment:
    """A segment through the LLM whose kept frames are not chosen yet: its frames' (and summary's) keys and
    values (layers, kv_heads, parts, tpf, d), mean keys (layers, parts, H * d), the video frames each frame
    covers, and ``decision`` (layers, 2, frames): ``count_table`` of the guidance scores and each layer's
    frames by descending score, which the host reads (None: no compression, every frame kept)."""

    kb: torch.Tensor
    vb: torch.Tensor
    reprs: torch.Tensor
    spans: list[list[int]]
    n_frames: int
    decision: torch.Tensor | None


@dataclass
class StreamKVRecall:
    """What an answer context held (``AnswerContext.detail``)."""

    segments: int  # segments encoded (closed, plus the open one for this question)
    retrieve_counts: list[int]  # blocks each layer retrieved
    blocks_held: list[int]  # blocks each layer holds after compression


@register_cache("streamkv")
@dataclass
class StreamKV(WindowStreamingCache, SinkWindowOptions, StoreOptions):
    """Segment-based compression and layer-adaptive retrieval on ReKV's encoding (see the module docstring)."""

    published_answer_text = "remove_newlines"  # the release's open-ended answers: replace('\n', '')
    display_order = 45
    video_tokens_exact = False  # each layer's count varies; video_tokens is their upper bound

    n_local: int = 15000  # encoding window (tokens), the init sink aside
    retrieve_size: int = 64  # mean blocks (frames) retrieved per layer
    retrieve_temp: float = 0.5  # each layer's count within retrieve_size x (1 -+ this), at most 128
    retrieve_local: bool = True  # the retrieve_local_size newest blocks are always retrieved
    retrieve_local_size: int = 8
    compression_ratio: float = 0.6  # share of a segment's frames kept, on average over the layers (1: none)
    compress_temp: float = 1.0  # each layer keeps between ratio x (1 -+ this) of them (within [1, frames])
    segment_mode: SegmentMode = SegmentMode.semantic
    min_segment_frames: int = 4
    max_segment_frames: int = 64
    segment_theta: float = 0.99  # similarity above which a frame stays in the open segment
    use_segment_summary: bool = True  # a mean frame after each segment, always kept
    guidance_prompt: str = GUIDANCE_PROMPT
    query_block: int = 1024

    @classmethod
    def budget_knobs(cls, frames: int, tokens_per_frame: int) -> dict:
        return {"retrieve_size": frames}  # the mean over layers; a layer retrieves up to 1.5x (video_tokens)

    @classmethod
    def video_tokens(cls, knobs: dict, tokens_per_frame: int) -> int:
        # the largest layer's context: the rescaled counts' upper bound
        size = int(knobs["retrieve_size"])
        return int(min(size * (1 + float(knobs["retrieve_temp"])), MAX_RETRIEVE)) * tokens_per_frame

    def check_knobs(self, geometry) -> None:
        check_options(self, segment_mode=SegmentMode)
        for name in ("retrieve_size", "min_segment_frames", "max_segment_frames", "query_block"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cache.{name}", f"must be at least 1, got {getattr(self, name)}")
        if self.max_segment_frames < self.min_segment_frames:
            raise ConfigError("cache.max_segment_frames", f"must be at least min_segment_frames "
                                                          f"({self.min_segment_frames}), got {self.max_segment_frames}")
        segment = (self.max_segment_frames + int(self.use_segment_summary)) * geometry.tokens_per_frame
        if self.n_local < segment:  # the release asserts it: a segment is encoded within one window
            raise ConfigError("cache.n_local", f"must hold a whole segment ({segment} tokens: max_segment_frames "
                                               f"{self.max_segment_frames} + summary), got {self.n_local}")
        if self.retrieve_local_size < 0:
            raise ConfigError("cache.retrieve_local_size", f"must be at least 0, got {self.retrieve_local_size}")
        if not 0 < self.compression_ratio <= 1:
            raise ConfigError("cache.compression_ratio", f"must be in (0, 1], got {self.compression_ratio}")
        for name in ("compress_temp", "retrieve_temp"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cache.{name}", f"must be at least 0, got {getattr(self, name)}")
        if not -1 <= self.segment_theta <= 1:
            raise ConfigError("cache.segment_theta", f"is a cosine similarity in [-1, 1], got {self.segment_theta}")
        if self.compression_ratio < 1 and not self.guidance_prompt.strip():
            raise ConfigError("cache.guidance_prompt", "must be non-empty when compression_ratio < 1")
        self.validate_sink_window()
        self.validate_store(geometry.head_dim)

    # ---------------------------------------------------------------------------------- streaming
    def start_video(self, init_ids: list[int]) -> None:
        super().start_video(init_ids)
        g = self.geometry
        self.kept = KeptBlocks.empty(self.new_store(self.llm.device), g.num_layers, g.num_heads * g.head_dim,
                                     self.llm.device)
        self.open_frames: list[torch.Tensor] = []  # the open segment's frame features (tokens, hidden)
        self.open_spans: list[list[int]] = []  # the video frames each covers (several once merged)
        self.open_sims: list[float] = []
        self.previous: torch.Tensor | None = None  # the last frame's features
        self.segments = 0
        self.guidance_ids = self.llm.tokenize(self.guidance_prompt)

    def ingest(self, visual: torch.Tensor, first_frame: int) -> None:
        # compared by their embeddings alone (an adapter may pack side channels after them: Qwen-VL's)
        features = self.llm.token_features(visual)
        sims = consecutive_similarities(features, self.previous) if self.segment_mode == SegmentMode.semantic \
            else [None] * visual.shape[0]
        for i in range(visual.shape[0]):
            self._add_frame(visual[i], first_frame + i, features[i], sims[i])
        self.settle(self.kept)  # the segments closed in this chunk, in one host read
        self.frames_seen = first_frame + visual.shape[0]

    def _add_frame(self, frame: torch.Tensor, index: int, features: torch.Tensor | None = None,
                   similarity: float | None = None) -> None:
        """Add a frame's tokens to the open segment; ``features`` (default: the tokens) are what it is compared by,
        ``similarity`` its ``frame_similarity`` with the previous frame where already computed."""
        features = frame if features is None else features
        if self.segment_mode == SegmentMode.uniform:
            self.open_frames.append(frame)
            self.open_spans.append([index])
            if len(self.open_frames) == self.max_segment_frames:
                self._close_segment()
            return
        if not self.open_frames:
            self.open_frames, self.open_spans, self.previous = [frame], [[index]], features
            return
        if similarity is None:
            similarity = frame_similarity(features, self.previous)
        self.open_sims.append(similarity)
        if len(self.open_frames) < self.min_segment_frames or similarity > self.segment_theta:
            self.open_frames.append(frame)
            self.open_spans.append([index])
            if len(self.open_frames) > self.max_segment_frames:
                merge_most_similar(self.open_frames, self.open_spans, self.open_sims)
            self.previous = features
        else:
            self._close_segment()
            self.open_frames, self.open_spans, self.previous = [frame], [[index]], features

    def _close_segment(self) -> None:
        self.encode_segment(self.open_frames, self.open_spans, self.kept)
        self.open_frames, self.open_spans, self.open_sims = [], [], []

    def encode_segment(self, frames: list[torch.Tensor], spans: list[list[int]], kept: KeptBlocks) -> torch.Tensor | None:
        """Encode one segment (+ its summary frame) through the window and score its frames with the guidance
        prompt; what each layer keeps of it joins ``kept`` at the next ``settle`` (with the other segments of the
        chunk: one host read for all). Returns the scores (layers, frames) (``None`` without compression).

        The layers only attend and leave their keys, values and the prompt's queries; the prompt's mean queries,
        the frames' mean keys, the scores, the count table and each layer's frames by score are then found for
        every layer at once (a few operator calls per segment instead of a few dozen per layer)."""
        g, rope = self.geometry, self.llm.rope
        tpf = g.tokens_per_frame
        parts = list(frames) + ([torch.stack(frames).mean(0)] if self.use_segment_summary else [])
        video = torch.cat(parts)[None]  # (1, V, hidden)
        n_video, n_frames, n_parts = video.shape[1], len(frames), len(parts)
        compress = self.compression_ratio < 1
        embeds = torch.cat((video, self.llm.embed_ids(self.guidance_ids)), dim=1) if compress else video
        keys: list[torch.Tensor] = [None] * g.num_layers  # type: ignore[list-item]
        values: list[torch.Tensor] = [None] * g.num_layers  # type: ignore[list-item]
        prompt_qs: list[torch.Tensor] = [None] * g.num_layers  # type: ignore[list-item]

        def attend(idx: int, q, k, v, scaling):
            out = self.layers[idx].attend_and_append(token_range(q, 0, n_video), token_range(k, 0, n_video),
                                                     token_range(v, 0, n_video), scaling, rope)
            keys[idx], values[idx] = k, v
            if not compress:
                return out
            # the video's and the prompt's outputs written into one tensor in the layout the layer's output
            # projection reads ((B, L, H, d) memory): a cat, then a copy to that layout, took two copies
            both = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
            token_range(both, 0, n_video).copy_(out)
            prompt_q = token_range(q, n_video)
            all_k, q_rot = rope.rotate_range(k, 0), rope.rotate_range(prompt_q, n_video)
            if all_k.shape[-2] <= self.n_local:
                prompt_out = causal_suffix_attention(q_rot, all_k, v, scaling)
            else:  # the prompt's own sliding window (the release's window of n_local)
                i = torch.arange(n_video, all_k.shape[-2], device=q.device)[:, None]
                j = torch.arange(all_k.shape[-2], device=q.device)[None, :]
                prompt_out = grouped_sdpa(q_rot, all_k, v, scaling, (j <= i) & (i - j < self.n_local))
            prompt_qs[idx] = prompt_q
            token_range(both, n_video).copy_(prompt_out)
            return both

        self.run_layers(embeds, attend)
        # every layer's frames as blocks (layers, kv_heads, parts, tpf, d), un-rotated, and their mean keys
        kb = token_range(torch.cat(keys), 0, n_video).unflatten(2, (n_parts, tpf))
        vb = token_range(torch.cat(values), 0, n_video).unflatten(2, (n_parts, tpf))
        reprs = block_representatives(kb, g.num_heads)  # (layers, parts, H * d)
        scores = decision = None
        if compress:  # each frame's mean key against the prompt's mean query (every layer's), as the release (dot)
            scores = (reprs[:, :n_frames] @ question_vectors(torch.cat(prompt_qs))[..., None]).squeeze(-1)
            # what the host needs to choose each layer's frames: the count table, and the frames by score
            # (descending; ties to the earlier frame)
            order = scores.argsort(dim=1, descending=True, stable=True)
            decision = torch.stack((count_table(scores), order.float()), dim=1)  # (layers, 2, frames)
        kept.pending.append(_EncodedSegment(kb, vb, reprs, spans, n_frames, decision))
        self.segments += 1
        return scores

    def settle(self, kept: KeptBlocks) -> None:
        """Add the pending segments' kept frames (each layer's top frames by score, as many as ``keep_counts``,
        and the summary) to ``kept``: what every layer keeps of every pending segment is read by the host at
        once (one wait for the device per chunk however many segments it closed), then gathered, added to the
        store and moved to host memory together."""
        pending, kept.pending = kept.pending, []
        if not pending:
            return
        g, tpf = self.geometry, self.geometry.tokens_per_frame
        decided = [p.decision for p in pending if p.decision is not None]
        values = np.asarray(torch.cat([d.flatten() for d in decided]).tolist() if decided else [], np.float32)
        for p in pending:
            n_frames = p.n_frames
            picks: dict[int, list[int]] = {}
            if p.decision is not None:
                size = p.decision.numel()
                table, values = values[:size].reshape(p.decision.shape), values[size:]
                keep = self._keep_from_table(table[:, 0], n_frames)
                for idx in range(g.num_layers):
                    if keep[idx] < n_frames:
                        picks[idx] = sorted(int(f) for f in table[idx, 1, :keep[idx]])
            layers_of: list[int] = []  # the layer and the part (frame, or the summary) of every kept block
            parts_of: list[int] = []
            for idx in range(g.num_layers):
                picked = picks.get(idx, list(range(n_frames))) + ([n_frames] if self.use_segment_summary else [])
                layers_of += [idx] * len(picked)
                parts_of += picked
            covers = [p.spans[f] if f < n_frames else [] for f in parts_of]  # the video frames each covers
            layer_of, part_of = torch.tensor([layers_of, parts_of], dtype=torch.long, device=p.kb.device)
            ids = kept.store.add_many(p.kb[layer_of, :, part_of][:, None], p.vb[layer_of, :, part_of][:, None],
                                      torch.arange(tpf).expand(len(parts_of), tpf),
                                      [c[0] if c else p.spans[0][0] for c in covers], [len(c) for c in covers],
                                      {"summary": [f == n_frames for f in parts_of]})
            for idx, block, c in zip(layers_of, ids, covers, strict=True):
                kept.ids[idx].append(block)
                kept.frames[idx].append(c)
            kept.reprs = torch.cat((kept.reprs, p.reprs[layer_of, part_of]))  # every layer's kept blocks, one gather
        kept.store.flush()

    def keep_counts(self, scores: torch.Tensor, n_frames: int) -> list[int]:
        """Frames each layer keeps of a segment of ``n_frames`` (``layer_counts`` then ``rescale_counts``); ``settle``
        applies the same rule (``_keep_from_table``) to the tables it reads with the chunk's other segments."""
        return self._keep_from_table(read_count_table(scores), n_frames)

    def _keep_from_table(self, table: np.ndarray, n_frames: int) -> list[int]:
        counts = threshold_counts(table, int(len(table) * n_frames * self.compression_ratio))
        mean = n_frames * self.compression_ratio
        low = max(1, int(mean * (1 - self.compress_temp)))
        high = min(n_frames, int(mean * (1 + self.compress_temp)))
        return [max(1, c) for c in rescale_counts(counts, low, high)]

    # ---------------------------------------------------------------------------------- recall
    def recall(self, question: str) -> AnswerContext[StreamKVRecall]:
        """The open segment encoded into a copy of the state, then two retrieval runs of the question."""
        kept, segments = self.kept, self.segments
        if self.open_frames:  # as if the video ended here; the window and the store are left as they were
            window = [copy.copy(w) for w in self.layers]
            kept = self.kept.for_question()
            self.encode_segment(self.open_frames, self.open_spans, kept)
            self.settle(kept)
            self.layers, self.segments = window, segments
            segments += 1
        ids = self.llm.tokenize(question)
        num_layers = len(kept.ids)
        first = self._retrieval_run(ids, kept, [self.retrieve_size] * num_layers)
        counts = layer_counts([scores for scores, _, _ in first], num_layers * self.retrieve_size)
        counts = rescale_counts(counts, max(self.retrieve_size * (1 - self.retrieve_temp), 1),
                                min(self.retrieve_size * (1 + self.retrieve_temp), MAX_RETRIEVE))
        second = self._retrieval_run(ids, kept, counts)
        rope = self.llm.rope
        keys = [rope.rotate_range(k, 0) for _, (k, _), _ in second]
        values = [v for _, (_, v), _ in second]
        chosen = [picked for _, _, picked in second]
        frames = sorted({f for covers, picked in zip(kept.frames, chosen, strict=True) for b in picked
                         for f in covers[b]})
        lengths = [int(k.shape[-2]) for k in keys]
        detail = StreamKVRecall(segments, [len(c) for c in chosen], kept.held())
        return AnswerContext(keys, values, next_position=max(lengths), recalled=Recalled(frames=frames),
                             detail=detail, layer_positions=lengths)

    def _retrieval_run(self, ids: list[int], kept: KeptBlocks, counts: list[int]) -> list[tuple]:
        """The raw question over init + ``counts[l]`` retrieved blocks in each layer l (the output feeding the
        next layer); per layer (scores of all its blocks, (un-rotated keys, values) of init + the retrieved
        blocks, the retrieved blocks)."""
        rope, recent = self.llm.rope, (self.retrieve_local_size if self.retrieve_local else None)
        out: list[tuple] = [None] * len(kept.ids)  # type: ignore[list-item]

        def retrieve(idx: int, q, k, v, scaling):
            scores = score_blocks(kept.layer_reprs(idx), question_vector(q), BlockScoring.dot)  # as ReKV's
            picked = select_with_recent(scores, int(counts[idx]), recent)
            init_k, init_v = self.layers[idx].init_k, self.layers[idx].init_v
            if picked:
                bk, bv = kept.store.layer_kv([kept.ids[idx][b] for b in picked], 0, init_k.device, init_k.dtype)
                ctx_k, ctx_v = torch.cat((init_k, bk), dim=-2), torch.cat((init_v, bv), dim=-2)
            else:
                ctx_k, ctx_v = init_k, init_v
            out[idx] = (scores, (ctx_k, ctx_v), picked)
            return attend_after_context(ctx_k, ctx_v, q, k, v, scaling, rope)

        self.run_layers(self.llm.embed_ids(ids), retrieve)
        return out

    def stats(self) -> CacheStats:
        """kv: every layer's kept blocks + the window (tokens: the layer that holds most); device: the window and
        the representative keys."""
        window = self.window_stats()
        reprs = tensor_bytes(self.kept.reprs)
        tokens = max(self.kept.held()) * self.geometry.tokens_per_frame
        return CacheStats(kv_tokens=tokens + window.kv_tokens, kv_bytes=self.kept.store.nbytes + window.kv_bytes,
                          device_kv_bytes=window.device_kv_bytes + reprs, aux_bytes=reprs)


class _OverlayStore:
    """The store plus blocks added for one question (the open segment), dropped after it."""

    def __init__(self, base: BlockStore) -> None:
        self.base, self.extra = base, BlockStore()

    def add(self, k, v, positions=None, first_frame=0.0, num_frames=1.0, meta=None) -> int:
        return len(self.base) + self.extra.add(k, v, positions, first_frame, num_frames, meta)

    def add_many(self, k, v, positions, first_frames, num_frames, meta=None) -> list[int]:
        return [len(self.base) + i for i in self.extra.add_many(k, v, positions, first_frames, num_frames, meta)]

    def flush(self) -> None:
        self.extra.flush()

    def layer_kv(self, ids: list[int], layer: int, device, dtype=None):
        n = len(self.base)
        old, new = [i for i in ids if i < n], [i - n for i in ids if i >= n]
        parts = ([self.base.layer_kv(old, layer, device, dtype)] if old else []) + \
            ([self.extra.layer_kv(new, layer, device, dtype)] if new else [])
        return torch.cat([p[0] for p in parts], dim=-2), torch.cat([p[1] for p in parts], dim=-2)

    def drop_overlay(self) -> None:
        self.extra.clear()
