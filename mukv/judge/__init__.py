"""Judges turn (question, reference, prediction) into a verdict; see ``build_judge``.

- ``exact``: normalised exact match / leading match, multiple-choice letters (no model, no cache);
- ``openai``: any OpenAI-compatible chat endpoint (``mukv.judge.openai``);
- ``hf``: a local transformers causal LM (``mukv.judge.hf``);
- ``none``: no judging.

LLM judges share the pinned, versioned prompt and parser (``mukv.judge.prompt``) and the on-disk judgment
cache (``mukv.judge.cache``).
"""

from __future__ import annotations

import math
import os

from mukv.errors import ConfigError
from mukv.judge.base import Judge, Verdict
from mukv.judge.exact import ExactMatchJudge

JUDGES = ("exact", "openai", "hf")


def validate_judge_config(cfg) -> None:
    """Checks that need no network and no model; raises ``ConfigError`` naming the field."""
    if cfg.name == "none" or cfg.name == "exact":
        return
    if cfg.name not in JUDGES:
        raise ConfigError("judge.name", f"unknown judge '{cfg.name}'; choose one of none, {', '.join(JUDGES)}")
    from mukv.judge.prompt import PROMPTS

    if cfg.prompt_version not in PROMPTS:
        raise ConfigError("judge.prompt_version",
                          f"unknown prompt version '{cfg.prompt_version}'; known: {', '.join(PROMPTS)}")
    if not cfg.model:
        raise ConfigError("judge.model", f"the {cfg.name} judge needs a model "
                                         "(openai: the model name at the endpoint; hf: a Hub id or local folder)")
    if cfg.max_tokens is None or cfg.max_tokens <= 0:
        raise ConfigError("judge.max_tokens", f"must be a positive integer, got {cfg.max_tokens!r}")
    if cfg.cache and not cfg.cache_path:
        raise ConfigError("judge.cache_path", "a path is required when judge.cache=true")
    if cfg.name == "openai":
        if not str(cfg.base_url).startswith(("http://", "https://")):
            raise ConfigError("judge.base_url", f"must start with http:// or https://, got {cfg.base_url!r}")
        if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
            raise ConfigError("judge.api_key_env",
                              f"the environment variable {cfg.api_key_env} (the judge's API key) is not set; "
                              f"export {cfg.api_key_env}=... or set judge.api_key_env=null for an endpoint "
                              "without authentication")
        for key in ("timeout_s", "backoff_s", "backoff_max_s"):
            value = cfg[key]
            if value is None or not math.isfinite(value) or value < 0 or (key == "timeout_s" and value == 0):
                raise ConfigError(f"judge.{key}", f"must be a positive number, got {value!r}")
        if cfg.max_retries is None or cfg.max_retries < 0:
            raise ConfigError("judge.max_retries", f"must be >= 0, got {cfg.max_retries!r}")
    if cfg.max_consecutive_failures is not None and cfg.max_consecutive_failures < 0:
        raise ConfigError("judge.max_consecutive_failures", "must be >= 0 (0 or null: never stop calling)")


def build_judge(cfg) -> Judge | None:
    """The configured judge (validated; LLM judges load their model in ``prepare()``), or None."""
    validate_judge_config(cfg)
    if cfg.name == "none":
        return None
    if cfg.name == "exact":
        return ExactMatchJudge()
    from mukv.judge.cache import JudgmentCache

    cache = JudgmentCache(cfg.cache_path) if cfg.cache else None
    if cfg.name == "openai":
        from mukv.judge.openai import OpenAIJudge, api_key_from_env

        return OpenAIJudge(cfg.model, cfg.base_url, api_key_from_env(cfg.api_key_env), cfg.prompt_version,
                           temperature=cfg.temperature, max_tokens=cfg.max_tokens, timeout_s=cfg.timeout_s,
                           max_retries=cfg.max_retries, backoff_s=cfg.backoff_s, backoff_max_s=cfg.backoff_max_s,
                           cache=cache, max_consecutive_failures=cfg.max_consecutive_failures)
    from mukv.judge.hf import HFJudge

    return HFJudge(cfg.model, cfg.prompt_version, device=cfg.device, dtype=cfg.dtype, max_tokens=cfg.max_tokens,
                   cache=cache, max_consecutive_failures=cfg.max_consecutive_failures)


__all__ = ["Judge", "Verdict", "build_judge", "validate_judge_config"]
