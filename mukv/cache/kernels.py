"""The attention kernels of every cache method, and the choice of them per device, dtype and head size.

Layouts (:mod:`mukv.cache.attention`) decide which keys a query sees at which position; this module only
computes attention over tensors it is handed (keys and values (B, H_kv, L, d), grouped KV heads):

* ``grouped_sdpa``: torch's SDPA with an optional boolean mask (never cuDNN on CUDA, see ``_NO_CUDNN``);
* ``attention_weights``: the fp32 probabilities, for methods that score tokens with them;
* the fused log-sum-exp mechanism: ``lse_kernel`` picks, once per device, dtype and head size, the fastest
  fused kernel that returns each row's log-sum-exp and agrees with the one-softmax reference (``_agrees``);
  attention split into parts, each run by that kernel, is merged exactly by ``merge_parts``. It serves
  ``causal_suffix_attention`` (a prefill after a context), ``two_part_attention`` (window + sinks with
  masks) and the layouts' own unmasked parts. One kernel wrapper per aten op, with or without a mask.

Anything run under autograd takes the masked one-softmax path (``needs_grad``): the fused kernels give no
gradient through their log-sum-exp.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mukv.cache.instrumentation import count_attention

# (q, k, v, causal, scaling, mask) -> (output (B, H, Lq, d), log-sum-exp (B, H, Lq) fp32); k and v have q's
# heads; ``mask`` (boolean (Lq, Lk), True where allowed) only for the kernels in ``_TAKES_MASK``.
LseKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def expand_kv_heads(x: torch.Tensor, num_heads: int, head_dim: int = 1) -> torch.Tensor:
    """(..., kv_heads, n, d) -> (..., num_heads, n, d), each KV head repeated for its query group."""
    groups = num_heads // x.shape[head_dim]
    return x.repeat_interleave(groups, dim=head_dim) if groups > 1 else x


def as_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, without an operator call where it already is (``.float()`` is one even then)."""
    return in_dtype(x, torch.float32)


def in_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, without an operator call where it already is (``.to`` is one even then)."""
    return x if x.dtype == dtype else x.to(dtype)


def token_range(x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    """``x[..., start:stop, :]`` (tokens on the second-to-last axis) as one view call: slicing is two (``slice``
    and the ``as_strided`` under it), once per layer and forward where a kept cache is cut out of what a layer
    attended (operator calls are host time on a GPU). Under autograd: a plain slice (its backward is cheaper)."""
    stop = x.shape[-2] if stop is None else stop
    if x.requires_grad:
        return x[..., start:stop, :]
    return x.as_strided((*x.shape[:-2], stop - start, x.shape[-1]), x.stride(),
                        x.storage_offset() + start * x.stride(-2))


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will differentiate through these. The fused kernels give no gradient through their
    log-sum-exp output, so a merge by log-sum-exp would get the queries' and keys' gradients wrong: training
    takes the masked one-softmax path (the same values)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ------------------------------------------------------------------------------------- plain SDPA
# cuDNN's attention builds an execution plan for every new shape, about 2 ms of host time on an H200. A
# stream changes the key length at every chunk and every decoded token, so there it cost more than the
# attention itself (40 ms per answer token for the 0.5B); the other fused kernels have no such step.
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with grouped KV heads; ``mask`` (Lq, Lk) is boolean, True where attention is allowed, or the additive
    bias of one (``mask_bias``)."""
    count_attention(q, k)
    with sdpa_kernel(_NO_CUDNN) if q.device.type == "cuda" else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)


def prefix_causal_mask(lq: int, lk: int, device: torch.device) -> torch.Tensor | None:
    """Queries are the last ``lq`` of ``lk`` keys: every earlier key visible, causal among the new ones."""
    return None if lq == 1 else memo_mask(lq, lk, torch.device(device))


_SCALARS: dict[float, torch.Tensor] = {}


def scalar(value: float) -> torch.Tensor:
    """``value`` as a 0-d fp32 CPU tensor, made once, for arithmetic with fp32 tensors: a Python float is wrapped
    into a tensor and cast at every call (4 operator calls), a 0-d tensor is used as it is (the same fp32 result;
    with tensors of other dtypes the rounding may differ, so only fp32 tensors take it)."""
    t = _SCALARS.get(value)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor: autograd may save it (training), inference may use it
            t = _SCALARS[value] = torch.tensor(value, dtype=torch.float32)
    return t


def attention_weights(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention probabilities (B, Hq, Lq, Lk) in fp32, for methods that score with them. Each KV head
    meets its query group in one batched product (the group's queries side by side), so the keys are not
    repeated per query head (a copy of every visible key, and operator calls, in each layer that scores)."""
    count_attention(q, k)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[-2]
    grouped = as_float(q).reshape(b * hkv, hq // hkv * lq, d)
    logits = torch.bmm(grouped, as_float(k).reshape(b * hkv, lk, d).mT).view(b, hq, lq, lk).mul_(scalar(scaling))
    if mask is not None:
        logits = logits.masked_fill_(~mask, float("-inf"))
    return logits.softmax(dim=-1)


# ------------------------------------------------------------------------ fused log-sum-exp kernels
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# bytes the mask and bias memos keep at most (the newest entry is always kept): a prefill over a long kept context
# (a press at an hour of video) has a mask of hundreds of MB, and each forward's is a new shape
MEMO_BYTES = 1 << 29


def _over_memo_bytes(tensors) -> bool:
    return sum(t.numel() * t.element_size() for t in tensors) > MEMO_BYTES


_BIASES: list[tuple[torch.Tensor, torch.dtype, torch.Tensor]] = []  # (mask, dtype, additive bias), newest last


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True where allowed) as an additive bias (0 / -inf). The bias of the last few mask
    tensors is kept: the layers of one forward pass the same (memoized) mask, so it is built once per forward
    and not once per layer (operator calls are host time on a GPU)."""
    for m, d, bias in _BIASES:
        if m is mask and d == dtype and bias.is_inference() == torch.is_inference_mode_enabled():
            return bias
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _BIASES.append((mask, dtype, bias))
    del _BIASES[:-4]
    while len(_BIASES) > 1 and _over_memo_bytes(b for _, _, b in _BIASES):
        del _BIASES[0]  # a context that grows makes a new shape every forward: older ones are not asked again
    return bias


def _cpu_flash(q, k, v, causal: bool, scaling: float, mask: torch.Tensor | None = None):
    """torch's CPU flash kernel; a mask goes in as an additive bias (-inf where not allowed)."""
    out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=None if mask is None else mask_bias(mask, q.dtype),
                          scale=scaling)
    return out, as_float(lse)


_MASKS: dict[tuple, torch.Tensor] = {}


def memo_mask(lq: int, lk: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Boolean masks of fixed shape, kept for the last few shapes (every layer of a forward asks for the same):
    queries are the last ``lq`` of ``lk`` keys, each sees every earlier key and itself, or only the last
    ``window`` of them (itself included) where ``window`` is given (a sliding window, see ``band_kernel``)."""
    # inference tensors must not reach autograd (training evaluates under inference mode, then trains)
    key = (lq, lk, window, device, torch.is_inference_mode_enabled())
    got = _MASKS.get(key)
    if got is None:
        i = torch.arange(lq, device=device)[:, None] + (lk - lq)
        j = torch.arange(lk, device=device)[None, :]
        got = j <= i if window is None else (j <= i) & (j > i - window)
        _MASKS[key] = got
        if len(_MASKS) > 8:
            _MASKS.pop(next(iter(_MASKS)))
        while len(_MASKS) > 1 and _over_memo_bytes(_MASKS.values()):
            _MASKS.pop(next(iter(_MASKS)))
    return got


def _lse_rows(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A CUDA kernel's log-sum-exp as (B, H, Lq) fp32 (cuDNN adds a trailing 1, memory-efficient pads Lq)."""
    return lse.reshape(*q.shape[:2], -1)[..., :q.shape[-2]].float()


def _no_mask(name: str, mask: torch.Tensor | None) -> None:
    if mask is not None:
        raise ValueError(f"{name} takes no mask (it is not in _TAKES_MASK)")


def _cuda_cudnn(q, k, v, causal: bool, scaling: float, mask: torch.Tensor | None = None):
    _no_mask("_cuda_cudnn", mask)
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scaling)
    return r[0], _lse_rows(r[1], q)


def _cuda_flash(q, k, v, causal: bool, scaling: float, mask: torch.Tensor | None = None):
    _no_mask("_cuda_flash", mask)
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scaling)
    return r[0], _lse_rows(r[1], q)


def _cuda_efficient(q, k, v, causal: bool, scaling: float, mask: torch.Tensor | None = None):
    """The memory-efficient kernel; a mask goes in as a bias whose rows are 16-element aligned (the kernel's
    constraint), expanded over batch and heads."""
    bias = None
    if mask is not None:
        lq, lk = mask.shape
        bias = torch.zeros(lq, lk + (-lk) % 16, dtype=q.dtype, device=q.device)[:, :lk]
        bias.masked_fill_(~mask, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], lq, lk)
    r = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scaling)
    return r[0], _lse_rows(r[1], q)


_CANDIDATES: dict[str, list[LseKernel]] = {
    "cpu": [_cpu_flash] if _FLASH_CPU is not None else [],
    # flash, then memory-efficient, then cuDNN (last: it plans each new shape, see _NO_CUDNN)
    "cuda": [_cuda_flash, _cuda_efficient, _cuda_cudnn],
}
_TAKES_MASK = (_cpu_flash, _cuda_efficient)
_LSE_KERNELS: dict[tuple, LseKernel | None] = {}


def lse_kernel(device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool = False) -> LseKernel | None:
    """The fastest fused attention of this device that returns the log-sum-exp and agrees with the one-softmax
    reference on a small problem (square causal and unmasked, and with a mask when ``masked``; checked once per
    device, dtype, head size and ``masked``). ``masked``: one that takes a mask (CPU flash; CUDA
    memory-efficient). None: none does (callers then take the reference path).

    The kernel returned takes grouped KV heads (fewer than the queries'): where the aten op takes them itself
    (torch's CPU flash kernel does, checked here against the expanded heads) they go in as they are, with no
    copy and no extra operator call; elsewhere a wrapper repeats them for each query group."""
    key = (device.type, device.index, dtype, head_dim, masked)
    if key not in _LSE_KERNELS:
        candidates = [c for c in _CANDIDATES.get(device.type, []) if not masked or c in _TAKES_MASK]
        _LSE_KERNELS[key] = _first_agreeing(candidates, _lse_cases(masked), device, dtype, head_dim)
    return _LSE_KERNELS[key]


def _lse_cases(masked: bool) -> list[tuple]:
    """``_agrees`` cases of an ``LseKernel``: square causal, unmasked, and (``masked``) a band with some keys of
    every row hidden (no row without a visible key)."""
    i, j = torch.arange(37)[:, None] + 16, torch.arange(53)[None, :]
    cases = [(37, (True, 0.125, None), torch.ones(37, 37, dtype=torch.bool).tril()), (53, (False, 0.125, None), None)]
    if masked:
        band = (j <= i) & (i - j < 24)
        cases.append((53, (False, 0.125, band), band))
    return cases


def _first_agreeing(candidates: list, cases: list[tuple], device: torch.device, dtype: torch.dtype,
                    head_dim: int):
    """The first candidate that agrees with one softmax on every case, wrapped to repeat grouped KV heads where
    it does not take them itself; None if none agrees."""
    found = next((c for c in candidates if _agrees(c, cases, device, dtype, head_dim)), None)
    if found is not None and not _agrees(found, cases, device, dtype, head_dim, kv_heads=1):
        found = _expanding(found)
    return found


def _expanding(kernel):
    """``kernel`` for grouped KV heads, repeated per query group before the call."""
    def grouped(q, k, v, *args):
        hq = q.shape[1]
        return kernel(q, expand_kv_heads(k, hq), expand_kv_heads(v, hq), *args)

    grouped.__name__ = f"{kernel.__name__}_expanding"
    return grouped


def _agrees(kernel, cases: list[tuple], device: torch.device, dtype: torch.dtype, head_dim: int,
            kv_heads: int = 2) -> bool:
    """Whether ``kernel``'s output and log-sum-exp match one softmax over the same scores on every case: (keys,
    the kernel's arguments after q, k, v, the boolean mask of what each of the 37 queries sees or None). With
    ``kv_heads`` 1, keys and values have one head for the queries' two: whether it takes grouped heads."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, head_dim, generator=g).to(device, dtype) for n in (37, 60, 60))
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    kx, vx = expand_kv_heads(k, 2), expand_kv_heads(v, 2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    try:
        for n, args, allowed in cases:
            out, lse = kernel(q, k[..., :n, :], v[..., :n, :], *args)
            s = (q.float() @ kx[..., :n, :].float().transpose(-1, -2)) * 0.125
            if allowed is not None:
                s = s.masked_fill(~allowed.to(device), float("-inf"))
            want_lse = s.logsumexp(-1)
            want = s.softmax(-1) @ vx[..., :n, :].float()
            if lse.shape != want_lse.shape or not torch.allclose(lse, want_lse, atol=tol, rtol=tol) or \
                    not torch.allclose(out.float(), want, atol=tol, rtol=tol):
                return False
    except (RuntimeError, TypeError, NotImplementedError, ValueError):
        return False
    return True


def suffix_parts(kernel: LseKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scaling: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Attention of queries that are the last ``lq`` of the keys (every earlier key visible, causal among the new
    ones) as parts that need no mask, each one ``kernel`` call: the new keys' square causal triangle, then the
    earlier keys where there are any (``merge_parts`` combines them exactly)."""
    lq, lk = q.shape[-2], k.shape[-2]
    parts = [kernel(q, token_range(k, lk - lq), token_range(v, lk - lq), True, scaling)]
    if lk > lq:
        parts.append(kernel(q, token_range(k, 0, lk - lq), token_range(v, 0, lk - lq), False, scaling))
    return parts


# ------------------------------------------------------------------------ sliding-window (band) kernels
# (q, k, v, window, scaling) -> (output (B, H, Lq, d), log-sum-exp (B, H, Lq) fp32): the queries are the last lq
# of the lk keys; query r sees its own key and the ``window - 1`` keys before it, or every earlier key where
# ``window`` is None. A streaming layer's whole window in one call (``SinkWindowKV``).
BandKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _cpu_flash_band(q, k, v, window: int | None, scaling: float):
    """torch's CPU flash kernel under the band as a memoized mask (``memo_mask``; its bias is built once per
    forward for every layer, ``mask_bias``). With no window (or one wider than the keys) no mask, whose bias
    would grow with the context (``full`` over an hour of video): ``suffix_parts`` (the kernel's causal
    triangle is top-left aligned, so it cannot take the triangle and the earlier keys in one call), merged."""
    if window is not None and window < k.shape[-2]:
        return _cpu_flash(q, k, v, False, scaling, memo_mask(q.shape[-2], k.shape[-2], q.device, window))
    parts = suffix_parts(_cpu_flash, q, k, v, scaling)
    if len(parts) == 1:
        return parts[0]
    return merge_parts(parts, q.dtype), torch.logaddexp(parts[0][1], parts[1][1])


_FLASH_CUDA = getattr(torch.ops.aten, "_flash_attention_forward", None)


def _cuda_flash_band(q, k, v, window: int | None, scaling: float):
    """flash-attention's own sliding window (``window_size_left``, causal with the last query on the last key):
    the band in one unmasked call that skips the tiles outside it, where the window took three parts (own
    triangle, middle, the reversed oldest triangle) and two merges. The layout is flash's (B, L, H, d): the
    transposes are views."""
    lq, lk = q.shape[-2], k.shape[-2]
    r = _FLASH_CUDA(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, lq, lk, 0.0, True, False,
                    scale=scaling, window_size_left=None if window is None else window - 1, window_size_right=0)
    return r[0].transpose(1, 2), _lse_rows(r[1], q)


_BAND_CANDIDATES: dict[str, list[BandKernel]] = {
    "cpu": [_cpu_flash_band] if _FLASH_CPU is not None else [],
    "cuda": [_cuda_flash_band] if _FLASH_CUDA is not None else [],
}
_BAND_KERNELS: dict[tuple, BandKernel | None] = {}


def _band_cases() -> list[tuple]:
    """``_agrees`` cases of a ``BandKernel``: causal square and after a context (no window), a full window of 24
    over 60 keys (every query sees exactly 24) and a window of 8 over 53 keys."""
    def band(n: int, window: int | None) -> torch.Tensor:
        i, j = torch.arange(37)[:, None] + (n - 37), torch.arange(n)[None, :]
        return (j <= i) if window is None else (j <= i) & (j > i - window)

    return [(n, (w, 0.125), band(n, w)) for n, w in ((37, None), (53, None), (60, 24), (53, 8))]


def band_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> BandKernel | None:
    """The fused kernel of this device that attends a sliding window in one call and returns the log-sum-exp
    (``BandKernel``), checked against one softmax once per device, dtype and head size like ``lse_kernel``:
    on the CPU torch's flash kernel with the band as a mask, on CUDA flash-attention's ``window_size``. None:
    none agrees (``SinkWindowKV`` then splits the window into unmasked parts)."""
    key = (device.type, device.index, dtype, head_dim)
    if key not in _BAND_KERNELS:
        _BAND_KERNELS[key] = _first_agreeing(_BAND_CANDIDATES.get(device.type, []), _band_cases(), device, dtype,
                                             head_dim)
    return _BAND_KERNELS[key]


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Softmax attention over the union of the parts' keys, from each part's output and log-sum-exp.

    Two parts weigh as ``sigmoid(lse_a - lse_b)`` (= exp(lse_a) / (exp(lse_a) + exp(lse_b))) in one ``lerp``;
    more parts fold in one at a time, the merged part's log-sum-exp being ``logaddexp`` of the two. Each fold is
    five operator calls (each call is host time on a GPU), and ``lerp`` keeps the kernels' output layout, so
    the caller's transpose to (B, L, H, d) costs no copy (a softmax over stacked parts took twice the calls and
    a copy). A part with log-sum-exp -inf (no visible key) weighs 0."""
    out, lse = parts[0]
    for i, (out_b, lse_b) in enumerate(parts[1:], start=2):
        w = torch.sigmoid(lse - lse_b).unsqueeze(-1)
        out = torch.lerp(as_float(out_b), as_float(out), w)
        if i < len(parts):
            lse = torch.logaddexp(lse, lse_b)
    return out if out.dtype == dtype else out.to(dtype)


# ------------------------------------------------------------------------ attention built on them
SUFFIX_PARTS_DEVICES = {"cuda"}  # where causal_suffix_attention splits into unmasked parts


def causal_suffix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention where the ``lq`` queries are the last ``lq`` of the keys: every earlier key visible, causal
    among the new ones (``prefix_causal_mask``). That is every prefill after a context: a block after the init
    prompt, a question after the init prompt or a recalled context.

    On CUDA it runs as one call of the sliding-window kernel with no window (``band_kernel``: flash-attention,
    causal with the last query on the last key), or where that does not agree, as two parts that need no mask,
    the earlier keys and the square causal triangle of the new ones, each in the fused kernel that returns its
    log-sum-exp (``lse_kernel``), merged exactly (``merge_parts``). There the masked call took torch's unfused
    math path (grouped heads and a mask): half of MuKV's kernel time per chunk on an H200. On the CPU the
    masked call is torch's flash kernel, which takes both, and it was faster than the parts at block and
    question shapes (BENCHMARKS.md 7a); it stays there, and under autograd."""
    lq, lk = q.shape[-2], k.shape[-2]
    if lq == 1:
        return grouped_sdpa(q, k, v, scaling, None)
    split = q.device.type in SUFFIX_PARTS_DEVICES and 0 < lq <= lk and not needs_grad(q, k, v)
    band = band_kernel(q.device, q.dtype, q.shape[-1]) if split else None
    kernel = lse_kernel(q.device, q.dtype, q.shape[-1]) if split and band is None else None
    try:
        if band is not None:
            count_attention(q, k)
            return band(q, k, v, None, scaling)[0]
        if kernel is not None:
            parts = suffix_parts(kernel, q, k, v, scaling)
            count_attention(q, k)
            return parts[0][0] if len(parts) == 1 else merge_parts(parts, q.dtype)
    except RuntimeError:  # a kernel constraint the start-up check did not meet: the masked path is exact
        pass
    mask = prefix_causal_mask(lq, lk, q.device)
    if q.device.type == "cpu":  # as the additive bias SDPA would make of it, but once per forward (``mask_bias``)
        mask = mask_bias(mask, q.dtype)
    return grouped_sdpa(q, k, v, scaling, mask)


def _masked_attention_lse(kernel: LseKernel, q, k, v, mask: torch.Tensor, scaling: float):
    """(output, log-sum-exp) of masked attention with grouped KV heads from a mask-taking ``kernel``; a row
    with no visible key gets log-sum-exp -inf (the kernels report 0), so that it weighs nothing."""
    out, lse = kernel(q, k.to(q.dtype), v.to(q.dtype), False, scaling, mask)
    return out, lse.masked_fill(~mask.any(-1), float("-inf"))


def two_part_attention(qa, ka, va, mask_a, qb, kb, vb, mask_b, scaling):
    """Softmax over two key sets whose queries are rotated differently (window part and sink part).

    Each part is attended on its own by the mask-taking fused kernel (``lse_kernel(..., masked)``) and the
    two are merged by their log-sum-exp, so the large window part has no (Lq, Lk) score matrix in memory;
    where no kernel agrees, or under autograd, both parts take the reference path, one softmax over the
    concatenated scores. The two are equal to float rounding (tested on CPU; checked on an H200)."""
    count_attention(qa, ka)
    count_attention(qb, kb)
    kernel = None if needs_grad(qa, ka, va, qb, kb, vb) else lse_kernel(qa.device, qa.dtype, qa.shape[-1], True)
    if kernel is not None:
        try:
            out_a, lse_a = _masked_attention_lse(kernel, qa, ka, va, mask_a, scaling)
            out_b, lse_b = _masked_attention_lse(kernel, qb, kb, vb, mask_b, scaling)
        except RuntimeError:  # a kernel constraint (alignment, dtype) not met: the reference path is exact
            return two_part_attention_reference(qa, ka, va, mask_a, qb, kb, vb, mask_b, scaling)
        # A row is never masked in both parts (its own token is in the window); a part with no visible key for
        # a row has log-sum-exp -inf, so it weighs 0, and its undefined output is zeroed.
        return merge_parts([(torch.nan_to_num(out_a), lse_a), (torch.nan_to_num(out_b), lse_b)], qa.dtype)
    return two_part_attention_reference(qa, ka, va, mask_a, qb, kb, vb, mask_b, scaling)


def two_part_attention_reference(qa, ka, va, mask_a, qb, kb, vb, mask_b, scaling):
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
