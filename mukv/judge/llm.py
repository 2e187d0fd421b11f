"""The part shared by LLM judges (``openai``, ``hf``): prompt, cache, parsing, failure accounting.

A judge request that fails (after the client's retries) and a reply that does not parse give
``Verdict(correct=None, score=None, error=...)``: counted in metrics as invalid judgments, never dropped.
After ``max_consecutive_failures`` failed requests in a row the judge stops calling (an endpoint that is
down would otherwise cost every answer its full retry schedule); the remaining answers are recorded as
failures and a re-run judges them (valid verdicts are cached, so nothing is paid twice).

Secrets (an API key) are redacted from every error text and reply before it is logged, cached or stored in a
verdict (which goes to predictions.csv and the W&B table): a server that echoes the request's headers in its
error body would otherwise put ``Bearer <key>`` into the run's files.
"""

from __future__ import annotations

import abc
import logging
import re
import sqlite3
from typing import Any

from mukv.judge.base import Judge, Verdict
from mukv.judge.cache import JudgmentCache, judgment_key
from mukv.judge.prompt import JudgeReplyError, get_prompt, parse_reply

log = logging.getLogger("mukv.judge")


REDACTED = "[redacted]"
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` without any of ``secrets`` and without the credential of any ``Bearer ...``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


class JudgeRequestError(RuntimeError):
    """The judge model could not be asked (network, HTTP error, malformed response, generation error)."""


class LLMJudge(Judge):
    """Judge by asking a language model with the pinned prompt; subclasses implement ``complete``."""

    def __init__(self, model: str, prompt_version: str, cache: JudgmentCache | None = None,
                 max_consecutive_failures: int | None = None) -> None:
        self.model = model
        self.prompt = get_prompt(prompt_version)
        self.cache = cache
        self.max_consecutive_failures = max_consecutive_failures
        self.counts = {"judgments": 0, "cache_hits": 0, "requests": 0, "request_failures": 0,
                       "unparsable_replies": 0, "skipped_after_failures": 0}
        self._failures_in_a_row = 0
        self._last_failure = ""
        self.secrets: tuple[str, ...] = ()  # never written anywhere (see ``redact``)

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """The options every LLM judge has (``LLMJudgeConfig``)."""
        from mukv.errors import ConfigError
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
        if cfg.max_consecutive_failures is not None and cfg.max_consecutive_failures < 0:
            raise ConfigError("judge.max_consecutive_failures", "must be >= 0 (0 or null: never stop calling)")

    @staticmethod
    def cache_of(cfg: Any) -> JudgmentCache | None:
        return JudgmentCache(cfg.cache_path) if cfg.cache else None

    @property
    def judge_id(self) -> str:
        """What the cache key calls this judge (the model and where it is served)."""
        return f"{self.name}:{self.model}"

    @abc.abstractmethod
    def complete(self, messages: list[dict[str, str]]) -> str:
        """The model's reply to the chat ``messages``; raises ``JudgeRequestError``."""

    def judge(self, question: str, reference: str, prediction: str) -> Verdict:
        self.counts["judgments"] += 1
        key = judgment_key(self.judge_id, self.prompt.version, question, reference, prediction)
        if self.cache is not None:
            try:
                hit = self.cache.get(key)
            except sqlite3.Error as err:  # a cache that cannot be read costs a request, never the answer
                log.warning("judgment cache %s: %s", self.cache.path, err)
                hit = None
            if hit is not None:
                self.counts["cache_hits"] += 1
                return Verdict(correct=hit[0], score=hit[1])
        limit = self.max_consecutive_failures
        if limit and self._failures_in_a_row >= limit:
            self.counts["skipped_after_failures"] += 1
            return Verdict(None, None, f"judge not called: {self._failures_in_a_row} requests failed in a row "
                                       f"(last: {self._last_failure})")
        self.counts["requests"] += 1
        try:
            reply = self.complete(self.prompt.messages(question, reference, prediction))
        except Exception as err:  # noqa: BLE001  (any client failure is this answer's failure, never a crash)
            text = redact(str(err) if isinstance(err, JudgeRequestError) else f"{type(err).__name__}: {err}",
                          self.secrets)
            if not isinstance(err, JudgeRequestError):  # no traceback: it would carry the unredacted text
                log.error("judge client error: %s", text)
            self.counts["request_failures"] += 1
            self._failures_in_a_row += 1
            self._last_failure = text
            log.warning("judge request failed: %s", text)
            return Verdict(None, None, f"judge request failed: {text}")
        self._failures_in_a_row = 0
        reply = redact(reply, self.secrets) if isinstance(reply, str) else reply
        try:
            correct, score = parse_reply(reply)
        except JudgeReplyError as err:
            self.counts["unparsable_replies"] += 1
            return Verdict(None, None, redact(f"unparsable judge reply ({err}): {reply[:300]!r}", self.secrets))
        if self.cache is not None:
            try:
                self.cache.put(key, judge=self.judge_id, prompt_version=self.prompt.version, question=question,
                               reference=reference, prediction=prediction, correct=correct, score=score,
                               reply=reply)
            except sqlite3.Error as err:
                log.warning("judgment cache %s: %s (verdict not cached)", self.cache.path, err)
        return Verdict(correct=correct, score=float(score))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "prompt_version": self.prompt.version,
                "cache": str(self.cache.path) if self.cache is not None else None, **self.counts}

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
