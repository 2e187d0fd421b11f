"""InfiniPot-V (NeurIPS'25): query-agnostic, memory-bounded compression of the video KV, as its published code.

Frames are prefilled in blocks at their original positions, attending to the init prompt and to every token
still kept. Whenever the cache holds ``block_frames`` frames' worth of video tokens and more frames come, every
layer is cut back, per KV head, to ``keep_frames`` frames' worth (``compress_layer``), the init prompt always
kept: the newest ``query_ratio`` of the frames stay whole; the older tokens least like the same patch in those
recent frames (temporal redundancy, TaR: minus the mean cosine similarity of their keys) fill ``tar_ratio`` of
the budget; the rest goes to the largest value norms (VaN), optionally smoothed by a pooling that depends on
the layer's quarter (``adaptive_pooling``). Kept tokens keep their rotated keys and positions, and the answer
attends to everything kept, from the position after the last frame: device memory is flat in stream length.

The published code (``aiha-lab/InfiniPot-V``: ``kvcache_utils.process_kv_cache``, the block prefill of
``qwen_inference_ovu.py``) runs Qwen2-VL offline; this is its adaptation to a stream on LLaVA-OV:

* *Blocks.* The code prefills ``block_size`` frames, then ``block_size - compress_frame_num`` per block, and
  compresses after each block but the last (compressing less near the end so that the last block fills the
  cache). A stream has no known end: frames are prefilled as they come (one forward per engine chunk, exact
  for causal attention) and the cache is compressed just before a frame would make it exceed
  ``block_frames``, so a question sees between ``keep_frames`` and ``block_frames`` frames' worth.
* *Patches.* TaR compares tokens at the same index within a frame's token grid (Qwen2-VL: its merged
  patches; LLaVA-OV: the 2x2-pooled patches, raster order, ``tokens_per_frame`` = side x side). As the code
  does, the index is the token's slot in the per-head cache, modulo ``tokens_per_frame``
  (``tar_patch=slot``): for tokens a compression already kept that slot is no longer their patch.
  ``tar_patch=position`` (an option, not published) compares each older token with its own patch.
* *Keys.* The code scores the keys its cache holds, rotated. Under Qwen2-VL's multimodal RoPE the same patch
  in two frames differs only in the temporal quarter of the frequencies; under LLaVA-OV's 1-D RoPE it differs
  by ``tokens_per_frame`` positions per frame in all of them. ``tar_keys=rotated`` (default) scores the rotated
  keys as the code does; ``tar_keys=unrotated`` (an option) compares content alone.
* *Pooling.* ``adaptive_pooling`` pools value norms per layer quarter with 3-D (7), 2-D (5), 1-D (3) windows,
  then none, over (frames, grid rows, grid columns) of the per-head slots, as the code; the grid side is
  ``sqrt(tokens_per_frame)`` (Qwen2-VL: the height of its merged-patch grid). Off by default, as the
  released scripts run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mukv.cache.base import AnswerContext, register_cache
from mukv.cache.kept_kv import KeptKVCache
from mukv.cache.options import StrOption, check_options
from mukv.errors import ConfigError


class TarKeys(StrOption):
    """``tar_keys``: which keys temporal redundancy compares."""

    rotated = "rotated"  # the cached keys, rotated at their positions (the published code)
    unrotated = "unrotated"  # the keys before RoPE: content alone (an option)


class TarPatch(StrOption):
    """``tar_patch``: which recent-frame token an older token is compared with."""

    slot = "slot"  # the same slot modulo tokens_per_frame in the per-head cache (the published code)
    position = "position"  # the same patch of the frame grid (an option)


# adaptive_pooling, per quarter of the layers: pooling dimensions and window (published: 3-D 7, 2-D 5, 1-D 3, none)
POOLING_BY_QUARTER: tuple[tuple[int, int], ...] = ((3, 7), (2, 5), (1, 3), (0, 1))
# InfiniPot-V's published run: a cache of 32 frames cut back to 24 (run_ovu.sh: block_size 32, compress 24)
PUBLISHED_KEEP_SHARE = 24 / 32


@dataclass
class InfiniPotVRecall:
    """What an answer context held (``AnswerContext.detail``)."""

    compressions: int  # times the cache was cut back so far in this video
    video_tokens_per_head: int  # video tokens each KV head of each layer holds


def pooling_of_layer(layer: int, num_layers: int) -> tuple[int, int]:
    """(dimensions, window) of ``adaptive_pooling`` at ``layer``: the published quarter rule, the last quarter
    also taking the remainder when the layers do not divide by four."""
    quarter = min(layer // max(1, num_layers // len(POOLING_BY_QUARTER)), len(POOLING_BY_QUARTER) - 1)
    return POOLING_BY_QUARTER[quarter]


def pool_value_norms(norms: torch.Tensor, dims: int, window: int, grid: int) -> torch.Tensor:
    """Average-pool (heads, tokens) value norms over slots laid out as (frames, grid, grid): 3-D over all
    three, 2-D over each frame's grid, 1-D along the slots; windows shrink to the smallest side (odd, at least
    3, else no pooling), zero padding counted, as the published code."""
    if dims == 0:
        return norms
    heads = norms.shape[0]
    if dims == 1:
        return torch.nn.functional.avg_pool1d(norms[:, None], window, stride=1, padding=window // 2)[:, 0]
    cube = norms.reshape(heads, -1, grid, grid)  # (heads, frames, rows, columns)
    size = min(window, *cube.shape[1:])
    size -= 1 - size % 2  # odd
    if size < 2:
        return norms
    if dims == 2:
        pooled = torch.nn.functional.avg_pool2d(cube, size, stride=1, padding=size // 2)
    else:
        pooled = torch.nn.functional.avg_pool3d(cube[None], size, stride=1, padding=size // 2)[0]
    return pooled.reshape(heads, -1)


def tar_patches(tokens: torch.Tensor, tokens_per_frame: int, rule: TarPatch | str) -> torch.Tensor:
    """The patch index TaR compares each cached token by, per head (``tokens``: (heads, L) video indices in
    cache order): ``slot``, the slot modulo ``tokens_per_frame`` (published), or ``position``, its own patch."""
    if TarPatch(rule) == TarPatch.slot:
        return (torch.arange(tokens.shape[-1], device=tokens.device) % tokens_per_frame).expand(tokens.shape[0], -1)
    return tokens % tokens_per_frame


def compress_layer(keys: torch.Tensor, values: torch.Tensor, patches: torch.Tensor, keep_tokens: int,
                   tokens_per_frame: int, tar_ratio: float, query_ratio: float,
                   pooling: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The video tokens one layer keeps, per KV head: indices (heads, keep_tokens), sorted (time order). Heads
    choose apart, so several layers' heads side by side are compressed at once (``InfiniPotV.compress``).

    ``keys`` / ``values``: (1, heads, L, d) video tokens in cache order, L a whole number of frames' worth;
    ``patches``: (heads, L), each token's patch index for TaR (its slot modulo ``tokens_per_frame`` under the
    published rule). The newest ``int(frames * query_ratio)`` frames' worth is kept and is TaR's reference;
    the older tokens with the lowest mean cosine similarity to the reference tokens of their patch fill the
    rest of TaR's share (``keep_tokens - round((1 - tar_ratio) * keep_tokens)``); the largest value norms
    (``pooling``: dimensions and window of ``pool_value_norms``) fill the remaining tokens."""
    _, heads, length, _ = keys.shape
    norms = values[0].float().norm(dim=-1)  # (heads, L): VaN
    dims, window = pooling
    norms = pool_value_norms(norms, dims, window, math.isqrt(tokens_per_frame))
    if tar_ratio > 0:
        tar_tokens = keep_tokens - round((1 - tar_ratio) * keep_tokens)
        recent = int(length // tokens_per_frame * query_ratio) * tokens_per_frame
        unit = keys[0].float() / (keys[0].float().norm(dim=-1, keepdim=True) + 1e-9)
        # the mean over recent frames of cos(old, recent at the same patch) = cos-dot with the mean recent unit key
        d = keys.shape[-1]
        reference = torch.zeros(heads, tokens_per_frame, d, device=keys.device)  # per head and patch
        reference = reference.scatter_add(1, patches[:, length - recent:, None].expand(-1, -1, d),
                                          unit[:, length - recent:, :]) / (recent // tokens_per_frame)
        old = unit[:, :length - recent, :]
        score = -(old * torch.gather(reference, 1, patches[:, :length - recent, None].expand(-1, -1, d))).sum(-1)
        picked = score.topk(tar_tokens - recent, dim=-1).indices
        tar = torch.cat((picked, torch.arange(length - recent, length, device=keys.device).expand(heads, -1)), dim=-1)
        norms = norms.scatter(1, tar, (norms.max() + 1).expand(tar.shape))  # TaR's tokens always kept
    return norms.topk(keep_tokens, dim=-1).indices.sort(dim=-1).values


@register_cache("infinipot_v")
@dataclass
class InfiniPotV(KeptKVCache):
    """Per-layer, per-head compression of the prefilled video KV to a fixed budget (see the module docstring)."""

    display_order = 50

    block_frames: int = 32  # the cache's capacity in frames' worth of tokens (published --block_size 32)
    keep_frames: int = 24  # frames' worth of tokens per head each compression keeps (--compress_frame_num 24)
    tar_ratio: float = 0.5  # share of the kept tokens chosen by temporal redundancy (with the recent frames)
    query_ratio: float = 0.25  # share of the cached frames, newest, kept whole as TaR's reference
    adaptive_pooling: bool = False  # value norms pooled per layer quarter (published flag, off in its scripts)
    tar_keys: TarKeys = TarKeys.rotated
    tar_patch: TarPatch = TarPatch.slot

    @classmethod
    def budget_knobs(cls, frames: int, tokens_per_frame: int) -> dict:
        # the answer holds at most the cache's capacity; each compression keeps the published 24 / 32 of it (at
        # least 4 frames, so that query_ratio 0.25 leaves TaR a whole recent frame)
        block = max(int(frames), 4)
        return {"block_frames": block, "keep_frames": min(block - 1, max(1, round(block * PUBLISHED_KEEP_SHARE)))}

    @classmethod
    def video_tokens(cls, knobs: dict, tokens_per_frame: int) -> int:
        return int(knobs["block_frames"]) * tokens_per_frame  # a full cache: block_frames frames' worth per head

    def check_knobs(self, geometry) -> None:
        check_options(self, tar_keys=TarKeys, tar_patch=TarPatch)
        if self.block_frames < 2:
            raise ConfigError("cache.block_frames", f"must be at least 2 frames, got {self.block_frames}")
        if not 1 <= self.keep_frames < self.block_frames:
            raise ConfigError("cache.keep_frames", f"must be at least 1 and below cache.block_frames "
                                                   f"({self.block_frames}), got {self.keep_frames}")
        if not 0 <= self.tar_ratio <= 1:
            raise ConfigError("cache.tar_ratio", f"must be in [0, 1], got {self.tar_ratio}")
        if not 0 < self.query_ratio < 1:
            raise ConfigError("cache.query_ratio", f"must be in (0, 1), got {self.query_ratio}")
        tpf = geometry.tokens_per_frame
        recent = int(self.block_frames * self.query_ratio)
        if self.tar_ratio > 0:
            if recent < 1:
                raise ConfigError("cache.query_ratio", f"{self.query_ratio} of {self.block_frames} frames is no whole "
                                                       "frame: TaR needs at least one recent frame")
            tar_tokens = self.keep_frames * tpf - round((1 - self.tar_ratio) * self.keep_frames * tpf)
            if tar_tokens < recent * tpf:
                raise ConfigError("cache.tar_ratio", f"TaR's share of the kept tokens ({tar_tokens}) must hold the "
                                                     f"{recent} recent frames ({recent * tpf} tokens): raise tar_ratio "
                                                     "or keep_frames, or lower query_ratio")
            if self.tar_patch == TarPatch.position and recent > self.block_frames - self.keep_frames:
                raise ConfigError("cache.query_ratio", f"tar_patch=position needs the {recent} recent frames to be "
                                                       f"whole, new since the last compression (at most "
                                                       f"{self.block_frames - self.keep_frames})")
        if self.adaptive_pooling and math.isqrt(tpf) ** 2 != tpf:
            raise ConfigError("cache.adaptive_pooling", f"pools over a square token grid; the model's "
                                                        f"{tpf} tokens per frame are not one")

    # ---------------------------------------------------------------------------------- streaming
    def start_video(self, init_ids: list[int]) -> None:
        super().start_video(init_ids)
        self.compressions = 0

    def ingest(self, visual: torch.Tensor, first_frame: int) -> None:
        tpf, done = self.geometry.tokens_per_frame, 0
        while done < visual.shape[0]:
            if self.held_tokens >= self.block_frames * tpf:
                self.compress()
            n = min(self.block_frames - self.held_tokens // tpf, visual.shape[0] - done)
            self.prefill(visual[done:done + n], first_frame + done)
            done += n

    def compress(self) -> None:
        """Cut every layer back to ``keep_frames`` frames' worth of video tokens per KV head. Heads choose apart,
        so the layers that pool alike are compressed as one set of heads (their KV heads side by side): one
        ``compress_layer`` per pooling instead of one per layer (operator calls are host time on a GPU)."""
        tpf, rope = self.geometry.tokens_per_frame, self.llm.rope
        n_layers, heads = self.geometry.num_layers, self.tokens.shape[1]
        groups: dict[tuple[int, int], list[int]] = {}
        for idx in range(n_layers):
            groups.setdefault(pooling_of_layer(idx, n_layers) if self.adaptive_pooling else (0, 1), []).append(idx)
        picked = []
        for pooling, layers in groups.items():  # consecutive layers (the pooling changes by quarter)
            keys = torch.cat([self.keys[i] for i in layers], dim=1)  # (1, layers x heads, L, d)
            values = torch.cat([self.values[i] for i in layers], dim=1)
            tokens = self.tokens[layers[0]:layers[-1] + 1].flatten(0, 1)  # (layers x heads, L)
            if self.tar_keys == TarKeys.unrotated:  # undo each token's own rotation
                keys = rope.rotate(keys, -(self.n_init + tokens).float())
            picked.append(compress_layer(keys, values, tar_patches(tokens, tpf, self.tar_patch),
                                         self.keep_frames * tpf, tpf, self.tar_ratio, self.query_ratio, pooling))
        self.keep(torch.cat(picked).view(n_layers, heads, -1))
        self.compressions += 1

    # ---------------------------------------------------------------------------------- recall
    def recall(self, question: str) -> AnswerContext[InfiniPotVRecall]:
        """Everything kept (query-agnostic: ``question`` is not read), at its original positions."""
        return self.kept_context(InfiniPotVRecall(self.compressions, self.held_tokens))
