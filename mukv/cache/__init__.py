"""Cache methods (one file each) on shared mechanics (attention layouts, RoPE, block store, retrieval)."""

from mukv.cache.base import CACHE_METHODS, AnswerContext, CacheMethod, CacheStats, register_cache
from mukv.cache.full import FullCache
from mukv.cache.mukv import MuKVCache
from mukv.cache.rekv import ReKVCache
from mukv.cache.sliding_window import SlidingWindowCache
from mukv.cache.uniform import UniformSampling

__all__ = ["CACHE_METHODS", "AnswerContext", "CacheMethod", "CacheStats", "register_cache", "FullCache",
           "MuKVCache", "SlidingWindowCache", "UniformSampling", "ReKVCache"]
