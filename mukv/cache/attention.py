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
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mukv.cache.retrieval import expand_kv_heads
from mukv.models.rope import RotaryTable


class OpCounter:
    """Work counted where it is done, for cost curves that do not depend on the machine (``mukv.bench
    --growth`` and the tests that pin flat per-frame cost): query-key pairs scored by attention (batch x
    query heads x queries x keys, masked pairs included: they are computed) and tokens run through the
    language model. Reset by the caller; counting is a few integer additions per call."""

    attention_pairs = 0
    llm_tokens = 0

    @classmethod
    def reset(cls) -> None:
        cls.attention_pairs = cls.llm_tokens = 0


def _count(q: torch.Tensor, k: torch.Tensor) -> None:
    OpCounter.attention_pairs += q.shape[0] * q.shape[1] * q.shape[-2] * k.shape[-2]


# cuDNN's attention builds an execution plan for every new shape, about 2 ms of host time on an H200. A
# stream changes the key length at every chunk and every decoded token, so there it cost more than the
# attention itself (40 ms per answer token for the 0.5B); the other fused kernels have no such step.
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with grouped KV heads; ``mask`` is boolean (Lq, Lk), True where attention is allowed."""
    _count(q, k)
    with sdpa_kernel(_NO_CUDNN) if q.device.type == "cuda" else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)


def prefix_causal_mask(lq: int, lk: int, device: torch.device) -> torch.Tensor | None:
    """Queries are the last ``lq`` of ``lk`` keys: every earlier key visible, causal among the new ones."""
    if lq == 1:
        return None
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    return j <= i


SUFFIX_PARTS_DEVICES = {"cuda"}  # where causal_suffix_attention splits into unmasked parts


def causal_suffix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention where the ``lq`` queries are the last ``lq`` of the keys: every earlier key visible, causal
    among the new ones (``prefix_causal_mask``). That is every prefill after a context: a block after the init
    prompt, a question after the init prompt or a recalled context.

    On CUDA it runs as two parts that need no mask, the earlier keys and the square causal triangle of the
    new ones, each in the fused kernel that returns its log-sum-exp (``lse_kernel``), merged exactly
    (``_merge_parts``). There the masked call took torch's unfused math path (grouped heads and a mask):
    half of MuKV's kernel time per chunk on an H200. On the CPU the masked call is torch's flash kernel,
    which takes both, and it was faster than the parts at block and question shapes (BENCHMARKS.md 7a); it
    stays there, and under autograd."""
    lq, lk = q.shape[-2], k.shape[-2]
    if lq == 1:
        return grouped_sdpa(q, k, v, scaling, None)
    split = q.device.type in SUFFIX_PARTS_DEVICES and 0 < lq <= lk and not _needs_grad(q, k, v)
    kernel = lse_kernel(q.device, q.dtype, q.shape[-1]) if split else None
    if kernel is not None:
        hq, new = q.shape[1], slice(lk - lq, lk)
        try:
            parts = [kernel(q, expand_kv_heads(k[..., new, :], hq), expand_kv_heads(v[..., new, :], hq), True, scaling)]
            if lk > lq:
                old = slice(0, lk - lq)
                parts.append(kernel(q, expand_kv_heads(k[..., old, :], hq), expand_kv_heads(v[..., old, :], hq),
                                    False, scaling))
            _count(q, k)
            return parts[0][0] if len(parts) == 1 else _merge_parts(parts, q.dtype)
        except RuntimeError:  # a kernel constraint the start-up check did not meet: the masked path is exact
            pass
    return grouped_sdpa(q, k, v, scaling, prefix_causal_mask(lq, lk, q.device))


def attention_weights(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention probabilities (B, Hq, Lq, Lk) in fp32, for methods that score with them."""
    _count(q, k)
    kk = expand_kv_heads(k, q.shape[1])
    logits = torch.matmul(q.float(), kk.float().transpose(-1, -2)) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim=-1)


SINK_DISTANCES = ("published", "n_local")
SINK_HANDOVERS = ("per_block", "exact")


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

    def __init__(self, n_local: int | None, query_block: int = 1024, sink_distance: str = "published",
                 sink_handover: str = "per_block", block_tokens: int | None = None) -> None:
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
            keys, vals = keys[..., drop:, :], vals[..., drop:, :]
            self.start += drop
        self.k, self.v = keys, vals
        return torch.cat(outs, dim=-2)

    def peek(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
             rope: RotaryTable) -> torch.Tensor:
        """Like ``attend_and_append`` but leaves the cache unchanged (a question's KV is not kept)."""
        saved = (self.k, self.v, self.start)
        out = self.attend_and_append(q, k, v, scaling, rope)
        self.k, self.v, self.start = saved
        return out

    def _view_start(self, qa: int) -> int:
        """The first key a query block starting at ``qa`` can see (window and eviction)."""
        return self.start if self.n_local is None else max(self.start, qa - self.n_local + 1)

    def _fused_applies(self, q: torch.Tensor, qa: int, lo: int) -> bool:
        """Whether the block of queries ``q`` starting at ``qa`` runs as unmasked parts (``_unmasked_parts``):
        a fused kernel with log-sum-exp exists here, the window is full, and either no query of the block sees
        a sink or every one sees all of them (under either ``sink_handover``)."""
        if q.shape[-2] == 0 or _needs_grad(q) or lse_kernel(q.device, q.dtype, q.shape[-1]) is None:
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
        kw, vw = keys[..., lo - self.start:qb - self.start, :], vals[..., lo - self.start:qb - self.start, :]
        # Positions relative to the first key in view keep the rotation angles small (as ReKV does).
        q_rot = rope.rotate_range(q, qa - lo)
        k_rot = rope.rotate_range(kw, 0)
        n_sinks = self._sink_size(qb - 1)  # the most sinks a query of the block sees (the last one's)
        sink_needed = n_sinks > 0
        self.max_keys_in_view = max(self.max_keys_in_view, kw.shape[-2] + n_sinks)
        if self._fused_applies(q, qa, lo) and not _needs_grad(k_rot, vw):  # before any (Lq, Lk) mask is built
            try:
                return _merge_parts(self._unmasked_parts(q, k_rot, vw, q_rot, sink_needed, scaling, rope), q.dtype)
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
        q_sink = rope.rotate(q, torch.full((lq,), self._sink_position(), device=q.device))
        sink_mask = torch.arange(n_sinks, device=q.device)[None, :] < self._sink_sizes(qa, qb, q.device)[:, None]
        return _two_part_attention(q_rot, k_rot, vw, band, q_sink, self.init_k[..., :n_sinks, :],
                                   self.init_v[..., :n_sinks, :], sink_mask, scaling)

    def _unmasked_parts(self, q, k_rot, vw, q_rot, sink_needed, scaling, rope) -> list[tuple[torch.Tensor, ...]]:
        """The block's attention as parts that need no mask, each run by a fused kernel that returns its
        log-sum-exp (``_merge_parts`` combines them exactly). Only where ``_fused_applies``: a kernel exists
        on the device, and the window and the sinks' distance are full (before that, the masked path).

        Keys [lo, qb) of queries [qa, qb) split into: the block's own keys (causal: a square triangle); with
        no window, everything before them (all visible); with a window of n_local, the keys every query
        sees, [qb - n_local + 1, qa), and the lq keys [lo, lo + lq) that query r sees from offset r on:
        with queries and keys both reversed that is again a square causal triangle. Sinks are one more
        unmasked part once every query sees them all (they are a separate part: under ``per_block`` an init
        token still in a query's window is attended there too, as in ReKV's code). Before this, the window was one masked kernel call
        and the mask cost more than the attention: the masked kernels run at half the speed of the fused
        unmasked ones on an H200."""
        kernel = lse_kernel(q.device, q.dtype, q.shape[-1])
        lq = q.shape[-2]
        own = k_rot.shape[-2] - lq
        n_local = self.n_local
        k_all, v_all = expand_kv_heads(k_rot, q.shape[1]), expand_kv_heads(vw, q.shape[1])
        parts = [kernel(q_rot, k_all[..., own:, :], v_all[..., own:, :], True, scaling)]
        _count(q_rot, k_all[..., own:, :])
        if n_local is None:
            if own > 0:
                parts.append(kernel(q_rot, k_all[..., :own, :], v_all[..., :own, :], False, scaling))
                _count(q_rot, k_all[..., :own, :])
        else:
            if own > lq:
                parts.append(kernel(q_rot, k_all[..., lq:own, :], v_all[..., lq:own, :], False, scaling))
                _count(q_rot, k_all[..., lq:own, :])
            out, lse = kernel(q_rot.flip(-2), k_all[..., :lq, :].flip(-2), v_all[..., :lq, :].flip(-2), True, scaling)
            parts.append((out.flip(-2), lse.flip(-1)))
            _count(q_rot, k_all[..., :lq, :])
            if sink_needed:  # every query sees every sink (``_fused_applies``)
                q_sink = rope.rotate(q, torch.full((lq,), self._sink_position(), device=q.device))
                ks, vs = expand_kv_heads(self.init_k, q.shape[1]), expand_kv_heads(self.init_v, q.shape[1])
                parts.append(kernel(q_sink, ks.to(q.dtype), vs.to(q.dtype), False, scaling))
                _count(q_sink, ks)
        return parts


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will differentiate through these. The fused kernels give no gradient through their
    log-sum-exp output, so a merge by log-sum-exp would get the queries' and keys' gradients wrong: training
    takes the masked one-softmax path (the same values)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Softmax attention over the union of the parts' keys, from each part's output and log-sum-exp."""
    m = torch.stack([lse for _, lse in parts]).amax(dim=0)
    num = den = 0
    for out, lse in parts:
        w = (lse - m).exp()
        num = num + out.float() * w[..., None]
        den = den + w
    return (num / den[..., None]).to(dtype)


_LSE_KERNELS: dict[tuple, object] = {}


def _cpu_flash(q, k, v, causal, scaling):
    out, lse = _FUSED_LSE_CPU(q, k, v, 0.0, causal, scale=scaling)
    return out, lse.float()


def _lse_rows(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A CUDA kernel's log-sum-exp as (B, H, Lq) fp32 (cuDNN adds a trailing 1, memory-efficient pads Lq)."""
    return lse.reshape(*q.shape[:2], -1)[..., :q.shape[-2]].float()


def _cuda_cudnn(q, k, v, causal, scaling):
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scaling)
    return r[0], _lse_rows(r[1], q)


def _cuda_flash(q, k, v, causal, scaling):
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scaling)
    return r[0], _lse_rows(r[1], q)


def _cuda_efficient(q, k, v, causal, scaling):
    r = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scaling)
    return r[0], _lse_rows(r[1], q)


def lse_kernel(device: torch.device, dtype: torch.dtype, head_dim: int):
    """The fastest fused attention of this device that returns the log-sum-exp and agrees with the one-softmax
    reference on a small problem (square causal and unmasked, checked once per device, dtype and head size):
    flash, then memory-efficient, then cuDNN (last: it plans each new shape, see ``_NO_CUDNN``) on CUDA;
    torch's flash kernel on CPU. None: none does."""
    key = (device.type, device.index, dtype, head_dim)
    if key not in _LSE_KERNELS:
        candidates = {"cpu": [_cpu_flash] if _FUSED_LSE_CPU is not None else [],
                      "cuda": [_cuda_flash, _cuda_efficient, _cuda_cudnn]}.get(device.type, [])
        _LSE_KERNELS[key] = next((c for c in candidates if _agrees(c, device, dtype, head_dim)), None)
    return _LSE_KERNELS[key]


def _agrees(kernel, device, dtype, head_dim) -> bool:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, head_dim, generator=g).to(device, dtype) for n in (37, 53, 53))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    try:
        for causal, kk, vv in ((True, k[..., :37, :], v[..., :37, :]), (False, k, v)):
            out, lse = kernel(q, kk, vv, causal, 0.125)
            s = (q.float() @ kk.float().transpose(-1, -2)) * 0.125
            if causal:
                s = s.masked_fill(~torch.ones(37, 37, dtype=torch.bool, device=device).tril(), float("-inf"))
            want_lse = s.logsumexp(-1)
            want = s.softmax(-1) @ vv.float()
            if lse.shape != want_lse.shape or not torch.allclose(lse, want_lse, atol=tol, rtol=tol) or \
                    not torch.allclose(out.float(), want, atol=tol, rtol=tol):
                return False
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _two_part_attention(qa, ka, va, mask_a, qb, kb, vb, mask_b, scaling):
    """Softmax over two key sets whose queries are rotated differently (window part and sink part).

    Each part is attended on its own and the two are merged by their log-sum-exp, so the large window part
    runs in a fused kernel (no (Lq, Lk) score matrix in memory) where torch has one that returns the
    log-sum-exp (CPU, CUDA); elsewhere both parts take the reference path, one softmax over the
    concatenated scores. The two are equal to float rounding (tested on CPU; checked on an H200)."""
    _count(qa, ka)
    _count(qb, kb)
    fused = {"cpu": _FUSED_LSE_CPU, "cuda": _FUSED_LSE_CUDA}.get(qa.device.type)
    if fused is not None and not _needs_grad(qa, ka, va, qb, kb, vb):
        try:
            out_a, lse_a = _attention_lse(qa, ka, va, mask_a, scaling)
            out_b, lse_b = _attention_lse(qb, kb, vb, mask_b, scaling)
        except RuntimeError:  # a kernel constraint (alignment, dtype) not met: the reference path is exact
            return _two_part_attention_reference(qa, ka, va, mask_a, qb, kb, vb, mask_b, scaling)
        # A row is never masked in both parts (its own token is in the window); a part with no visible key for
        # a row has log-sum-exp -inf, so it weighs 0, and its undefined output is zeroed.
        return _merge_parts([(torch.nan_to_num(out_a), lse_a), (torch.nan_to_num(out_b), lse_b)], qa.dtype)
    return _two_part_attention_reference(qa, ka, va, mask_a, qb, kb, vb, mask_b, scaling)


_FUSED_LSE_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_LSE_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)


def _attention_lse(q, k, v, mask, scaling):
    """(output, log-sum-exp) of masked attention with grouped KV heads, from torch's fused kernels (the CPU
    flash kernel; on CUDA the memory-efficient one, whose bias rows must be 16-element aligned)."""
    k, v = expand_kv_heads(k, q.shape[1]).to(q.dtype), expand_kv_heads(v, q.shape[1]).to(q.dtype)
    if q.device.type == "cuda":
        lq, lk = mask.shape
        bias = torch.zeros(lq, lk + (-lk) % 16, dtype=q.dtype, device=q.device)[:, :lk]
        bias.masked_fill_(~mask, float("-inf"))
        out, lse = _FUSED_LSE_CUDA(q, k, v, bias.expand(q.shape[0], q.shape[1], lq, lk), True, 0.0, False,
                                   scale=scaling)[:2]
        lse = lse[..., :lq]  # padded to a multiple of 32 queries
    else:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out, lse = _FUSED_LSE_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scaling)
    # the kernel reports 0 (not -inf) for a row with no visible key: such a row must weigh nothing
    return out, lse.float().masked_fill(~mask.any(-1), float("-inf"))


def _two_part_attention_reference(qa, ka, va, mask_a, qb, kb, vb, mask_b, scaling):
    """One softmax over the concatenated scores of both parts (the (Lq, Lk) scores are materialised)."""
    groups = qa.shape[1] // ka.shape[1]
    b, hq, lq, d = qa.shape
    hk = ka.shape[1]

    def logits(q, k, mask):
        qg = q.reshape(b, hk, groups * lq, d)
        s = torch.matmul(qg, k.transpose(-1, -2)).view(b, hk, groups, lq, -1).float() * scaling
        return s.masked_fill(~mask, float("-inf"))

    s = torch.cat((logits(qa, ka, mask_a), logits(qb, kb, mask_b)), dim=-1).softmax(dim=-1)
    vals = torch.cat((va, vb), dim=-2).float()
    out = torch.matmul(s.view(b, hk, groups * lq, -1), vals).view(b, hq, lq, d)
    return out.to(qa.dtype)


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
