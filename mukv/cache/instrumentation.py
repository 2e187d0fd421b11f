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
# (boolean indexing calls ``nonzero``). Counted from the profiler's events (no Python line: ``sites`` names the op).
HOST_READ_OPS = frozenset({"aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_consecutive",
                           "aten::unique_dim", "aten::nonzero_static"})
# Tensor methods that hand values to Python or NumPy (``item``, ``int()``, ``bool()``, ``tolist`` ...): counted
# by wrapping them, which adds no operator call (a dispatch mode would: it doubles every operator in the profile)
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


def _to_host_device(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU as the device (and is not ``non_blocking``)."""
    device = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            device = a
    return device is not None and torch.device(device).type == "cpu" and not kwargs.get("non_blocking", False)


@contextlib.contextmanager
def _host_reads_counted(sites: Counter, host_is_device: bool) -> Iterator[None]:
    """Count, by the line that made them, host reads of device tensors: the ``_HOST_READ_METHODS``, and copies
    into host memory the host waits for (``copy_`` into a ``mark_host`` / CPU tensor, ``.cpu()``, ``.to("cpu")``,
    none ``non_blocking``)."""
    originals = {name: getattr(torch.Tensor, name) for name in (*_HOST_READ_METHODS, "copy_", "cpu", "to")}

    def reading(name: str, original: Callable) -> Callable:
        def counted(self, *args: Any, **kwargs: Any):
            if _device_tensor(self, host_is_device):
                sites[f"{_site()} {name}"] += 1
            return original(self, *args, **kwargs)

        return counted

    def copy_(self, src, non_blocking: bool = False):
        host_dst = getattr(self, "_mukv_host", False) or (not host_is_device and self.device.type == "cpu")
        if host_dst and not non_blocking and _device_tensor(src, host_is_device):
            sites[f"{_site()} copy to host"] += 1
        return originals["copy_"](self, src, non_blocking)

    def cpu(self, *args: Any, **kwargs: Any):
        if not host_is_device and _device_tensor(self, host_is_device):
            sites[f"{_site()} cpu"] += 1
        return originals["cpu"](self, *args, **kwargs)

    def to(self, *args: Any, **kwargs: Any):
        if not host_is_device and _to_host_device(args, kwargs) and _device_tensor(self, host_is_device):
            sites[f"{_site()} to cpu"] += 1
        return originals["to"](self, *args, **kwargs)

    try:
        for name in _HOST_READ_METHODS:
            setattr(torch.Tensor, name, reading(name, originals[name]))
        torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.to = copy_, cpu, to
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def count_calls(step: Callable[[], Any], device: torch.device | str = "cpu") -> CallCount:
    """Run ``step`` once under torch's profiler (CPU activity: the operators dispatched, whatever the device)
    and count its operator calls and its host reads (``CallCount``). On a CPU ``device`` every tensor not
    marked ``mark_host`` stands in for a device tensor. Run it on one thread (``torch.set_num_threads(1)``, as
    ``mukv.bench.ops_row`` does): torch's CPU kernels split large inputs between threads with a few more view
    operators (a few per thousand calls, growing with widths), which would make counts depend on the machine."""
    from torch.profiler import ProfilerActivity, profile

    sites: Counter = Counter()
    OpCounter.forwards = []
    with profile(activities=[ProfilerActivity.CPU]) as prof, \
            _host_reads_counted(sites, torch.device(device).type == "cpu"):
        step()
    by_op = Counter({e.key: e.count for e in prof.key_averages()})
    for name in HOST_READ_OPS & set(by_op):
        sites[name] += by_op[name]
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
