"""A judge behind any OpenAI-compatible chat endpoint (OpenAI, Azure-style proxies, vLLM, llama.cpp, ...).

Standard library only (urllib). ``POST {base_url}/chat/completions`` with temperature 0; transient
failures (connection errors, timeouts, HTTP 408/409/429/5xx, malformed responses) are retried with
exponential backoff (``backoff_s * 2**attempt``, capped at ``backoff_max_s``, honouring ``Retry-After``);
other HTTP errors (401, 404, ...) fail at once. A request that still fails is a recorded judge failure for
that answer, never a crash. The API key is read from the environment variable named by ``api_key_env``
(checked when the config is validated, before anything runs); ``api_key_env: null`` sends no key.

The key goes only to ``base_url``: redirects are never followed (urllib would re-send the ``Authorization``
header to whatever host a 302 names), a redirect is a failed request naming where it pointed; and the key is
redacted from every error text (``mukv.judge.llm.redact``).
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request

from mukv.judge.cache import JudgmentCache
from mukv.judge.llm import JudgeRequestError, LLMJudge, redact

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: the 3xx response comes back as an ``HTTPError``."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


class OpenAIJudge(LLMJudge):
    name = "openai"

    def __init__(self, model: str, base_url: str, api_key: str | None, prompt_version: str, *,
                 temperature: float = 0.0, max_tokens: int = 64, timeout_s: float = 60.0, max_retries: int = 5,
                 backoff_s: float = 1.0, backoff_max_s: float = 60.0, cache: JudgmentCache | None = None,
                 max_consecutive_failures: int | None = 10) -> None:
        super().__init__(model, prompt_version, cache, max_consecutive_failures)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.secrets = (api_key,) if api_key else ()
        self.temperature, self.max_tokens, self.timeout_s = temperature, max_tokens, timeout_s
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self.sleep = time.sleep  # tests may replace it

    @classmethod
    def check_config(cls, cfg) -> None:
        import math

        from mukv.errors import ConfigError

        super().check_config(cfg)
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

    @classmethod
    def from_config(cls, cfg) -> OpenAIJudge:
        return cls(cfg.model, cfg.base_url, api_key_from_env(cfg.api_key_env), cfg.prompt_version,
                   temperature=cfg.temperature, max_tokens=cfg.max_tokens, timeout_s=cfg.timeout_s,
                   max_retries=cfg.max_retries, backoff_s=cfg.backoff_s, backoff_max_s=cfg.backoff_max_s,
                   cache=cls.cache_of(cfg), max_consecutive_failures=cfg.max_consecutive_failures)

    @property
    def judge_id(self) -> str:
        return f"openai:{self.model}@{self.base_url}"

    def _request(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with _OPENER.open(req, timeout=self.timeout_s) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        content = data["choices"][0]["message"]["content"]
        return content if isinstance(content, str) else ""

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            wait = None
            try:
                return self._request(body)
            except urllib.error.HTTPError as err:
                # redacted here, before it is cut to 300 characters (a cut key would no longer match); every
                # other error text is redacted once, where LLMJudge catches the JudgeRequestError
                sent_back = err.read(65536).decode("utf-8", "replace") if err.fp is not None else ""
                detail = redact(sent_back, self.secrets).strip()[:300]
                problem = f"HTTP {err.code} from {self.url}: {detail or err.reason}"
                if 300 <= err.code < 400:
                    where = err.headers.get("Location", "?") if err.headers else "?"
                    problem = (f"HTTP {err.code} redirect from {self.url} to {where} not followed (the API key "
                               "goes to judge.base_url only): set judge.base_url to the final address")
                if err.code not in RETRY_STATUS:
                    raise JudgeRequestError(problem) from None
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
                    wait = float(retry_after)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                problem = f"cannot reach {self.url}: {getattr(err, 'reason', err)}"
            except (ValueError, KeyError, IndexError, TypeError) as err:
                problem = f"malformed response from {self.url}: {type(err).__name__}: {err}"
            if attempt + 1 == attempts:
                raise JudgeRequestError(f"{problem} (after {attempts} attempts)")
            delay = self.backoff_s * 2 ** attempt if wait is None else wait
            self.sleep(min(self.backoff_max_s, delay))
        raise AssertionError("unreachable")


def api_key_from_env(var: str | None) -> str | None:
    return os.environ.get(var) if var else None
