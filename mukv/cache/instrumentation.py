"""Work counted where it is done, so that cost curves do not depend on the machine.

``mukv.bench --growth`` and the tests that pin a flat per-frame cost read these counters; the kernels
(:mod:`mukv.cache.kernels`) and the model adapter add to them. Counting is a few integer additions per call.

``count_calls`` counts what sets the pace on a GPU when kernels are small: operator calls (each one is host
time: dispatch, and a kernel launch on a device) and reads of tensor values by the host (each one waits for
the device). Both are counted on any machine, the CPU included: torch's profiler sees the same operators
there (``mukv.bench --ops``, ``tests/test_ops.py``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


class OpCounter:
    """Query-key pairs scored by attention (batch x query heads x queries x keys, masked pairs included: they
    are computed) and tokens run through the language model. Reset by the caller."""

    attention_pairs = 0
    llm_tokens = 0
    # (batch, tokens) of every language-model forward since the reset: what a plain forward of the same tokens
    # is counted over (``plain_forward_calls``)
    forwards: list[tuple[int, int]] = []

    @classmethod
    def reset(cls) -> None:
        cls.attention_pairs = cls.llm_tokens = 0
        cls.forwards = []

    @classmethod
    def add_forward(cls, embeds: torch.Tensor) -> None:
        cls.llm_tokens += embeds.shape[0] * embeds.shape[1]
        cls.forwards.append((int(embeds.shape[0]), int(embeds.shape[1])))


def count_attention(q: torch.Tensor, k: torch.Tensor) -> None:
    """Count the query-key pairs of attending ``q`` (B, Hq, Lq, d) to ``k`` (..., Lk, d)."""
    OpCounter.attention_pairs += q.shape[0] * q.shape[1] * q.shape[-2] * k.shape[-2]


# Operators whose result's size depends on tensor values: on a GPU the host waits for the device to know it
# (boolean indexing is ``index`` with a boolean index, counted too).
HOST_READ_OPS = frozenset({"aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_consecutive",
                           "aten::unique_dim", "aten::repeat_interleave.Tensor"})
# Tensor methods that hand values to Python or NumPy (``item``, ``int()``, ``bool()``, ``tolist`` ...)
_HOST_READ_METHODS = ("item", "tolist", "numpy", "__array__", "__bool__", "__int__", "__float__", "__index__")


def mark_host(*tensors: torch.Tensor) -> None:
    """Declare tensors that live in host memory by design (the block store's offloaded blocks): reading them is
    not a wait for the device, on a GPU run or a CPU one."""
    for t in tensors:
        t._mukv_host = True


def _site() -> str:
    """The innermost line outside torch (and this module) that made the current call."""
    import sys

    frame = sys._getframe(2)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or
                                 frame.f_code.co_filename.endswith("instrumentation.py")):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"


@dataclass
class CallCount:
    """What one call cost in operator calls (``ops``: aten operators as torch's profiler counts them, nested ones
    included) and host reads of tensor values that would wait for the device (``host_reads``; ``sites`` names
    the lines of this project that made them), and the language-model forwards it ran (``forwards``: (batch,
    tokens) each)."""

    ops: int
    host_reads: int
    forwards: list[tuple[int, int]]
    by_op: Counter = field(default_factory=Counter)
    sites: Counter = field(default_factory=Counter)


def _device_tensor(t: Any, host_is_device: bool) -> bool:
    """Whether reading ``t`` waits for the device: a tensor not marked ``mark_host``, and on the device (on a CPU
    run, where ``host_is_device``, any tensor: the CPU stands in for the device)."""
    if not isinstance(t, torch.Tensor) or getattr(t, "_mukv_host", False) or getattr(t._base, "_mukv_host", False):
        return False
    return host_is_device or t.device.type != "cpu"


def _blocking_copy_to_host(args: tuple, kwargs: dict, host_is_device: bool) -> bool:
    """A ``copy_`` from a device tensor into host memory that the host waits for (not ``non_blocking``)."""
    dst, src = args[0], args[1] if len(args) > 1 else None
    host_dst = getattr(dst, "_mukv_host", False) or (not host_is_device and dst.device.type == "cpu")
    blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    return host_dst and blocking and _device_tensor(src, host_is_device)


@contextlib.contextmanager
def _host_reads_counted(sites: Counter, host_is_device: bool) -> Iterator[None]:
    """Count host reads (``HOST_READ_OPS`` through a dispatch mode; ``_HOST_READ_METHODS`` patched) by site."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name + (f".{func._overloadname}" if func._overloadname == "Tensor" else "")
            if (name in HOST_READ_OPS or func._schema.name in HOST_READ_OPS) and args and \
                    _device_tensor(args[0], host_is_device):
                sites[f"{_site()} {func._schema.name.removeprefix('aten::')}"] += 1
            elif func._schema.name == "aten::index" and len(args) > 1 and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]) and \
                    _device_tensor(args[0], host_is_device):
                sites[f"{_site()} boolean index"] += 1
            elif func._schema.name == "aten::copy_" and _blocking_copy_to_host(args, kwargs or {}, host_is_device):
                sites[f"{_site()} copy to host"] += 1
            return func(*args, **(kwargs or {}))

    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READ_METHODS}

    def wrap(name: str, original: Callable) -> Callable:
        def counted(self, *args: Any, **kwargs: Any):
            if _device_tensor(self, host_is_device):
                sites[f"{_site()} {name}"] += 1
            with torch.utils._python_dispatch._disable_current_modes():
                return original(self, *args, **kwargs)

        return counted

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        with Reads():
            yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def count_calls(step: Callable[[], Any], device: torch.device | str = "cpu") -> CallCount:
    """Run ``step`` once under torch's profiler (CPU activity: the operators dispatched, whatever the device)
    and count its operator calls and its host reads (``CallCount``). On a CPU ``device`` every tensor not
    marked ``mark_host`` stands in for a device tensor. It runs on one thread: torch's CPU kernels split large
    inputs between threads with a few more view operators (a few per thousand calls, growing with widths), which
    would make the counts depend on the machine."""
    from torch.profiler import ProfilerActivity, profile

    sites: Counter = Counter()
    OpCounter.forwards = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof, \
                _host_reads_counted(sites, torch.device(device).type == "cpu"):
            step()
    finally:
        torch.set_num_threads(threads)
    by_op = Counter({e.key: e.count for e in prof.key_averages()})
    return CallCount(ops=sum(by_op.values()), host_reads=sum(sites.values()), forwards=list(OpCounter.forwards),
                     by_op=by_op, sites=sites)


def plain_forward_calls(language_model: torch.nn.Module, forwards: list[tuple[int, int]], hidden: int,
                        dtype: torch.dtype, device: torch.device) -> int:
    """Operator calls of the stock causal forward (transformers' own attention, no cache) over the same
    (batch, tokens) as ``forwards``: what the architecture itself costs for the tokens a method ran."""
    total = 0
    for batch, tokens in forwards:
        x = torch.randn(batch, tokens, hidden, dtype=dtype, device=device)
        with torch.inference_mode():
            language_model(inputs_embeds=x, use_cache=False)  # once untimed: lazy set-up is not the steady state
            total += count_calls(lambda x=x: language_model(inputs_embeds=x, use_cache=False), device).ops
    return total
