"""Attention over cached KV, written once for every cache method.

Keys and values are kept un-rotated (B, H_kv, L, d); positions are chosen by the caller and applied with
``RotaryTable`` right before the dot products. Two layouts cover every method:

* ``SinkWindowKV`` — streaming encoding as in ReKV/InfLLM: token ``i`` attends to the keys ``j`` with
  ``0 <= i - j < n_local`` at their true relative distance, and to the init (sink) tokens at one fixed
  distance: ``n_local - 1`` by default, as ReKV's code (``sink_distance``). By default the init tokens join
  the sink once per frame block, when they leave the window of the block's last query, and the whole block
  then sees them as sinks (ReKV's code; ``sink_handover``). ``n_local=None`` keeps everything: plain causal
  attention with contiguous positions, i.e. exactly an offline forward.
* ``ContextKV`` — answering: a fixed context of already-rotated keys (whatever a method recalled), then
  the prompt and generated tokens appended causally at positions from ``next_position`` on.

The attention itself (SDPA, the fused log-sum-exp kernels and the merge of partial results) is in
:mod:`mukv.cache.kernels`; this module decides which keys each query sees, at which position.
"""

from __future__ import annotations

import torch

from mukv.cache import kernels
from mukv.cache.instrumentation import count_attention
from mukv.cache.kernels import (
    causal_suffix_attention,
    grouped_sdpa,
    in_dtype,
    merge_parts,
    needs_grad,
    token_range,
    two_part_attention,
)
from mukv.cache.options import StrOption
from mukv.models.rope import RotaryTable


class SinkDistance(StrOption):
    """``sink_distance``: the relative distance every query sees the sinks at once they left its window."""

    published = "published"  # n_local - 1, ReKV's code
    n_local = "n_local"  # this project's earlier rule


class SinkHandover(StrOption):
    """``sink_handover``: when init tokens join the sink (see ``SinkWindowKV``)."""

    per_block = "per_block"  # once per frame block, decided by its last query (ReKV's code)
    exact = "exact"  # per query, the complement of its window


SINK_DISTANCES = SinkDistance.values()
SINK_HANDOVERS = SinkHandover.values()


class SinkWindowKV:
    """One layer's streaming KV: the init sink plus a sliding window of the most recent tokens.

    How a query ``g`` sees the ``n_init`` sink tokens once they leave its window of ``n_local`` keys:

    * ``sink_distance``: ``published`` (default) puts every sink at relative distance ``n_local - 1`` from
      every query: ReKV's code rotates the queries with its one-angle RoPE helper at index ``n_local``,
      which reads ``cos[n_local - 1]``, and the sink keys are un-rotated (position 0). ``n_local``: at
      distance ``n_local`` (this project's earlier rule).
    * ``sink_handover``: ``per_block`` (default) is ReKV's code: it encodes in blocks of ``block_tokens``
      (a frame: its ``exc_block_size`` is the tokens per frame; the first block starts right after the init
      prompt), and before attending a block it moves into the sink the init tokens that have left the
      window of the block's *last* query, ``j < end - n_local``; every query of the block then attends all
      the sink, unmasked. So while the window fills, a query whose window still holds those init tokens
      sees them twice, in the window at their true distance and as sinks. ``exact``: query ``g`` sees init
      token ``j`` as a sink iff ``g - j >= n_local`` (exactly the complement of its window; the same as
      ``per_block`` with one-token blocks). Once every init token has left the window the two agree.

    The block boundaries count from the first token after ``set_init``, so the result does not depend on
    how the stream is cut into calls (chunks) or on ``query_block``, as long as the caller's frames are
    whole ``block_tokens`` blocks (the engine's are).
    """

    def __init__(self, n_local: int | None, query_block: int = 1024,
                 sink_distance: SinkDistance | str = SinkDistance.published,
                 sink_handover: SinkHandover | str = SinkHandover.per_block, block_tokens: int | None = None) -> None:
        if sink_distance not in SINK_DISTANCES:
            raise ValueError(f"sink_distance must be one of {SINK_DISTANCES}, got {sink_distance!r}")
        if sink_handover not in SINK_HANDOVERS:
            raise ValueError(f"sink_handover must be one of {SINK_HANDOVERS}, got {sink_handover!r}")
        if block_tokens is not None and block_tokens < 1:
            raise ValueError(f"block_tokens must be at least 1, got {block_tokens}")
        self.n_local = n_local
        self.query_block = query_block
        self.sink_distance = sink_distance
        self.sink_handover = sink_handover
        self.block_tokens = block_tokens
        if n_local is not None:
            self._handover_block()  # fail at construction when per_block has no block size
        self.init_k: torch.Tensor | None = None
        self.init_v: torch.Tensor | None = None
        self.k: torch.Tensor | None = None  # most recent tokens, un-rotated
        self.v: torch.Tensor | None = None
        self.start = 0  # global index of self.k[..., 0, :]
        self.block_origin = 0  # global index where the first handover block starts (set by set_init)
        self.max_keys_in_view = 0  # most keys one query block attended to (cost is bounded by the window)
        self._sinks: tuple[torch.Tensor, torch.Tensor] | None = None  # (init_k, the sink keys: _sink_keys)

    @property
    def n_seen(self) -> int:
        return self.start + (0 if self.k is None else self.k.shape[-2])

    @property
    def n_init(self) -> int:
        return 0 if self.init_k is None else self.init_k.shape[-2]

    def set_init(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Declare the tokens seen so far (the init prompt) as the attention sink."""
        self.init_k, self.init_v = k, v
        self.block_origin = self.n_seen

    def _handover_block(self) -> int:
        """Tokens per handover block: 1 for ``exact``, ``block_tokens`` for ``per_block``."""
        if self.sink_handover == "exact":
            return 1
        if self.block_tokens is None:
            raise ValueError("sink_handover='per_block' needs block_tokens (the model's tokens per frame); "
                             "pass it, or use sink_handover='exact'")
        return self.block_tokens

    def _sink_position(self) -> int:
        """The relative distance every query sees the sinks at."""
        return self.n_local - 1 if self.sink_distance == "published" else self.n_local

    def _sink_size(self, g: int) -> int:
        """How many init tokens query ``g`` attends as sinks (always the first ones): those that have left
        the window of the last query of ``g``'s handover block."""
        if self.n_local is None or self.n_init == 0:
            return 0
        block, origin = self._handover_block(), self.block_origin
        end = g + 1 if g < origin else origin + ((g - origin) // block + 1) * block
        return min(self.n_init, max(0, end - self.n_local))

    def _sink_sizes(self, qa: int, qb: int, device: torch.device) -> torch.Tensor:
        """``_sink_size`` of the queries [qa, qb), as a tensor."""
        g = torch.arange(qa, qb, device=device)
        block, origin = self._handover_block(), self.block_origin
        end = origin + (torch.div(g - origin, block, rounding_mode="floor") + 1) * block
        end = torch.where(g < origin, g + 1, end)
        return (end - self.n_local).clamp(0, self.n_init)

    def attend_and_append(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                          rope: RotaryTable) -> torch.Tensor:
        """Attention output of the new tokens (B, Hq, L, d); the new keys join the window."""
        keys = k if self.k is None else torch.cat((self.k, k), dim=-2)
        vals = v if self.v is None else torch.cat((self.v, v), dim=-2)
        first_new = self.n_seen
        if self._fused_applies(q, first_new, self._view_start(first_new)):
            outs = [self._attend_block(q, first_new, keys, vals, scaling, rope)]  # no mask: no need for blocks
        else:
            outs = [self._attend_block(q[..., a:a + self.query_block, :], first_new + a, keys, vals, scaling, rope)
                    for a in range(0, q.shape[-2], self.query_block)]
        if self.n_local is not None and keys.shape[-2] > self.n_local:
            drop = keys.shape[-2] - self.n_local
            keys, vals = token_range(keys, drop), token_range(vals, drop)
            self.start += drop
        self.k, self.v = keys, vals
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)

    def _view_start(self, qa: int) -> int:
        """The first key a query block starting at ``qa`` can see (window and eviction)."""
        return self.start if self.n_local is None else max(self.start, qa - self.n_local + 1)

    def _fused_applies(self, q: torch.Tensor, qa: int, lo: int) -> bool:
        """Whether the block of queries ``q`` starting at ``qa`` runs as fused parts (``_fused_parts``):
        a fused kernel with log-sum-exp exists here, the window is full, and either no query of the block sees
        a sink or every one sees all of them (under either ``sink_handover``)."""
        if q.shape[-2] == 0 or needs_grad(q) or kernels.lse_kernel(q.device, q.dtype, q.shape[-1]) is None:
            return False  # (torch's CPU flash kernel crashes on no queries)
        if self.n_local is None:
            return True
        lq = q.shape[-2]
        if lo != qa - self.n_local + 1 or self.n_local <= lq:
            return False
        return self._sink_size(qa + lq - 1) == 0 or self._sink_size(qa) == self.n_init

    def _attend_block(self, q: torch.Tensor, qa: int, keys: torch.Tensor, vals: torch.Tensor,
                      scaling: float, rope: RotaryTable) -> torch.Tensor:
        lq = q.shape[-2]
        qb = qa + lq  # global query range [qa, qb)
        lo = self._view_start(qa)
        kw, vw = token_range(keys, lo - self.start, qb - self.start), token_range(vals, lo - self.start, qb - self.start)
        # Positions relative to the first key in view keep the rotation angles small (as ReKV does).
        q_rot = rope.rotate_range(q, qa - lo)
        k_rot = rope.rotate_range(kw, 0)
        n_sinks = self._sink_size(qb - 1)  # the most sinks a query of the block sees (the last one's)
        sink_needed = n_sinks > 0
        self.max_keys_in_view = max(self.max_keys_in_view, kw.shape[-2] + n_sinks)
        if self._fused_applies(q, qa, lo) and not needs_grad(k_rot, vw):  # before any (Lq, Lk) mask is built
            try:
                return merge_parts(self._fused_parts(q, k_rot, vw, q_rot, sink_needed, scaling, rope), q.dtype)
            except RuntimeError:  # a kernel constraint the start-up check did not meet: the masked path is exact
                pass
        qi = torch.arange(qa, qb, device=q.device)[:, None]
        kj = torch.arange(lo, qb, device=q.device)[None, :]
        band = kj <= qi
        if self.n_local is not None:
            band &= (qi - kj) < self.n_local
        if not sink_needed:
            return grouped_sdpa(q_rot, k_rot, vw, scaling, band)
        # Each query sees its first _sink_size init tokens as sinks, all at one fixed distance (the sink part is
        # separate from the window part: under per_block a token can be in both).
        sink_mask = torch.arange(n_sinks, device=q.device)[None, :] < self._sink_sizes(qa, qb, q.device)[:, None]
        return two_part_attention(q_rot, k_rot, vw, band, q, self._sink_keys(rope)[..., :n_sinks, :],
                                  self.init_v[..., :n_sinks, :], sink_mask, scaling)

    def _sink_keys(self, rope: RotaryTable) -> torch.Tensor:
        """The init keys as every query sees them once they are sinks: at the sink distance *before* the query.
        ReKV's code rotates the queries to that distance and keeps the sink keys at 0; rotating the keys the
        other way (to minus the distance) and leaving the queries at 0 gives the same scores, q.R(a)k' = q.k'R(-a)
        for rotations, with the keys rotated once per video instead of the queries once per layer and chunk."""
        if self._sinks is None or self._sinks[0] is not self.init_k:
            at = torch.full((self.n_init,), -self._sink_position(), device=self.init_k.device)
            self._sinks = (self.init_k, rope.rotate(self.init_k, at))
        return self._sinks[1]

    def _fused_parts(self, q, k_rot, vw, q_rot, sink_needed, scaling, rope) -> list[tuple[torch.Tensor, ...]]:
        """The block's attention as parts that each run in one fused kernel call returning its log-sum-exp
        (``merge_parts`` combines them exactly). Only where ``_fused_applies``: a kernel exists on the device,
        and the window and the sinks' distance are full (before that, the masked path).

        The window, keys [lo, qb) of queries [qa, qb) (query r sees the n_local keys ending at its own, all
        earlier ones with no window), is one call of the device's sliding-window kernel (``band_kernel``: on
        the CPU the flash kernel under a memoized band mask, on CUDA flash-attention's own window); where none
        agrees, it splits into unmasked parts (``_window_parts``). The sinks are one more unmasked part once
        every query sees them all (a separate part: under ``per_block`` an init token still in a query's window
        is attended there too, as in ReKV's code). Kernels take the grouped KV heads as they are."""
        count_attention(q_rot, k_rot)
        band = kernels.band_kernel(q.device, q.dtype, q.shape[-1])
        if band is not None:
            parts = [band(q_rot, k_rot, vw, self.n_local, scaling)]
        else:
            parts = self._window_parts(q_rot, k_rot, vw, scaling)
        if sink_needed:  # every query sees every sink (``_fused_applies``), at the sink distance
            kernel = kernels.lse_kernel(q.device, q.dtype, q.shape[-1])
            ks = self._sink_keys(rope)
            parts.append(kernel(q, in_dtype(ks, q.dtype), in_dtype(self.init_v, q.dtype), False, scaling))
            count_attention(q, ks)
        return parts

    def _window_parts(self, q_rot, k_rot, vw, scaling) -> list[tuple[torch.Tensor, ...]]:
        """The window as unmasked parts, for a device with no sliding-window kernel. With no window, the block's
        own keys (causal) and everything before them (``kernels.suffix_parts``). With a window of n_local, the
        same over the keys from lo + lq on (its own keys, and the keys every query sees, [qb - n_local + 1,
        qa)), and the lq keys [lo, lo + lq) that query r sees from offset r on: with queries and keys both
        reversed that is again a square causal triangle."""
        kernel = kernels.lse_kernel(q_rot.device, q_rot.dtype, q_rot.shape[-1])
        if self.n_local is None:
            return kernels.suffix_parts(kernel, q_rot, k_rot, vw, scaling)
        lq = q_rot.shape[-2]
        parts = kernels.suffix_parts(kernel, q_rot, token_range(k_rot, lq), token_range(vw, lq), scaling)
        oldest_k, oldest_v = token_range(k_rot, 0, lq), token_range(vw, 0, lq)
        out, lse = kernel(q_rot.flip(-2), oldest_k.flip(-2), oldest_v.flip(-2), True, scaling)
        return parts + [(out.flip(-2), lse.flip(-1))]


class ContextKV:
    """One layer's answering KV: a recalled context (already rotated) plus appended new tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, next_position: int, reserve: int = 0) -> None:
        b, h, n, d = keys.shape
        self.k = keys.new_empty((b, h, n + reserve, d))
        self.v = values.new_empty((b, h, n + reserve, d))
        self.k[..., :n, :], self.v[..., :n, :] = keys, values
        self.length = n
        self.next_position = next_position

    def attend_and_append(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                          rope: RotaryTable) -> torch.Tensor:
        lq = q.shape[-2]
        q_rot, k_rot = rope.rotate_range(q, self.next_position), rope.rotate_range(k, self.next_position)
        end = self.length + lq
        if end > self.k.shape[-2]:  # grow (the reserve was too small)
            extra = end - self.k.shape[-2] + 64
            self.k = torch.cat((self.k, self.k.new_empty(*self.k.shape[:2], extra, self.k.shape[-1])), dim=-2)
            self.v = torch.cat((self.v, self.v.new_empty(*self.v.shape[:2], extra, self.v.shape[-1])), dim=-2)
        self.k[..., self.length:end, :], self.v[..., self.length:end, :] = k_rot, v
        self.length, self.next_position = end, self.next_position + lq
        return causal_suffix_attention(q_rot, self.k[..., :end, :], self.v[..., :end, :], scaling)
