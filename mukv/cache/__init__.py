"""Cache methods (one file each) on shared mechanics (attention layouts, RoPE, block store, retrieval).

Every module of this package is imported here, so a method registers itself (``@register_cache``) by being
a file in ``mukv/cache/``: a new method is that one file plus ``conf/cache/<name>.yaml``, nothing else.
"""

import importlib
import pkgutil

from mukv.cache.base import (
    CACHE_METHODS,
    AnswerContext,
    CacheMethod,
    CacheStats,
    Recalled,
    budget_knobs,
    method_rank,
    ordered_methods,
    register_cache,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from mukv.cache.full import FullCache  # noqa: E402
from mukv.cache.mukv import MuKVCache  # noqa: E402
from mukv.cache.rekv import ReKVCache  # noqa: E402
from mukv.cache.sliding_window import SlidingWindowCache  # noqa: E402
from mukv.cache.uniform import UniformSampling  # noqa: E402

__all__ = ["CACHE_METHODS", "AnswerContext", "CacheMethod", "CacheStats", "Recalled", "register_cache",
           "ordered_methods", "method_rank", "budget_knobs", "FullCache", "MuKVCache", "SlidingWindowCache",
           "UniformSampling", "ReKVCache"]
