"""Judges: reply parsing, the pinned prompt, the OpenAI-compatible client against a loopback server (retries,
counted failures, the judgment cache), the HF judge on a tiny local causal LM, exact match, config checks."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from mukv.errors import ConfigError
from mukv.judge import build_judge, validate_judge_config
from mukv.judge.cache import JudgmentCache, judgment_key
from mukv.judge.exact import ExactMatchJudge
from mukv.judge.openai import OpenAIJudge
from mukv.judge.prompt import PROMPTS, JudgePrompt, JudgeReplyError, PromptChanged, get_prompt, parse_reply

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- loopback server
def verdict_for(body: dict) -> str:
    """A deterministic judge: yes when the prediction repeats the reference (case-insensitive)."""
    user = body["messages"][-1]["content"]
    ref = re.search(r"Reference answer: (.*)", user).group(1).strip().lower()
    pred = re.search(r"Predicted answer: (.*)", user).group(1).strip().lower()
    return "{'pred': 'yes', 'score': 5}" if pred and pred.startswith(ref) else "{'pred': 'no', 'score': 1}"


class LocalServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 (any free port) run in a thread while the ``with`` block lasts."""

    def __init__(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class FakeOpenAI(LocalServer):
    """POST /v1/chat/completions on 127.0.0.1 in a thread. ``plan(n, body)`` -> (status, content or None);
    at most ``max_requests`` are answered (then 503), so a runaway client cannot loop forever."""

    def __init__(self, plan=None, max_requests: int = 200) -> None:
        self.plan = plan or (lambda n, body: (200, verdict_for(body)))
        self.max_requests = max_requests
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    status, content = 404, None
                elif n >= server.max_requests:
                    status, content = 503, None
                else:
                    status, content = server.plan(n, body)
                if status == 200 and content is not None:
                    payload = {"id": f"r{n}", "object": "chat.completion",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                            "finish_reason": "stop"}]}
                else:
                    payload = {"error": {"message": f"planned failure {status}"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        LocalServer.__init__(self, Handler)


def make_judge(server_url: str, cache: JudgmentCache | None = None, **kw) -> OpenAIJudge:
    kw = {"max_retries": 3, "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, **kw}
    return OpenAIJudge("judge-model", server_url, "sk-test", "v1", cache=cache, **kw)


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("reply,expected", [
    ("{'pred': 'yes', 'score': 4}", (True, 4)),
    ("{'pred': 'no', 'score': 0}", (False, 0)),
    ('{"pred": "Yes", "score": "5"}', (True, 5)),
    ("Here is my verdict:\n```python\n{'pred': 'no', 'score': 2}\n```", (False, 2)),
    ("{'Pred': 'YES.', 'Score': 3.0}", (True, 3)),
    ("{'pred': True, 'score': 4}", (True, 4)),
    ("{'reason': 'close', 'pred': 'no', 'score': 1}", (False, 1)),
])
def test_valid_replies_parse(reply, expected):
    assert parse_reply(reply) == expected


@pytest.mark.parametrize("reply,reason", [
    ("", "empty"),
    (None, "empty"),
    ("yes, it matches", "no dictionary"),
    ("{'pred': 'maybe', 'score': 3}", "'pred'"),
    ("{'pred': 'yes'}", "missing key 'score'"),
    ("{'score': 4}", "missing key 'pred'"),
    ("{'pred': 'yes', 'score': 7}", "'score'"),
    ("{'pred': 'yes', 'score': -1}", "'score'"),
    ("{'pred': 'yes', 'score': 3.5}", "'score'"),
    ("{'pred': 'yes', 'score': 'high'}", "'score'"),
    ("{'pred': 'yes', 'score': 4", "no dictionary"),  # truncated reply
    ("{pred: yes, score: 4}", "no dictionary"),  # not a literal
])
def test_malformed_replies_raise_saying_why(reply, reason):
    with pytest.raises(JudgeReplyError, match=re.escape(reason)):
        parse_reply(reply)


def test_prompt_is_pinned_and_versioned(monkeypatch):
    prompt = get_prompt("v1")
    messages = prompt.messages("What colour?", "red", "It was red.")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "Question: What colour?" in user and "Reference answer: red" in user and "Predicted answer: It was red." in user
    assert "'pred'" in user and "'score'" in user
    edited = JudgePrompt("v1", prompt.system + " Be lenient.", prompt.user)
    monkeypatch.setitem(PROMPTS, "v1", edited)
    with pytest.raises(PromptChanged, match="new version"):
        get_prompt("v1")


# ---------------------------------------------------------------------------------------- openai judge
def test_openai_judge_asks_the_endpoint_with_the_pinned_prompt():
    with FakeOpenAI() as server:
        judge = make_judge(server.base_url)
        yes = judge.judge("What colour was the star?", "orange", "Orange, it was orange.")
        no = judge.judge("What colour was the star?", "orange", "blue")
    assert (yes.correct, yes.score, yes.error) == (True, 5.0, "")
    assert (no.correct, no.score) == (False, 1.0)
    body, headers = server.requests[0], server.headers[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["messages"] == get_prompt("v1").messages("What colour was the star?", "orange", "Orange, it was orange.")
    assert headers["Authorization"] == "Bearer sk-test"
    assert judge.describe()["requests"] == 2 and judge.describe()["prompt_version"] == "v1"


def test_retries_with_exponential_backoff_then_succeeds():
    plan = {0: (503, None), 1: (429, None), 2: (500, None)}
    with FakeOpenAI(lambda n, body: plan.get(n, (200, verdict_for(body)))) as server:
        judge = make_judge(server.base_url, max_retries=3, backoff_s=0.01, backoff_max_s=1.0)
        sleeps: list[float] = []
        judge.sleep = sleeps.append
        verdict = judge.judge("q", "red", "red")
    assert verdict.correct is True and verdict.error == ""
    assert len(server.requests) == 4
    assert sleeps == pytest.approx([0.01, 0.02, 0.04])  # doubling each retry


def test_backoff_is_capped():
    with FakeOpenAI(lambda n, body: (503, None)) as server:
        judge = make_judge(server.base_url, max_retries=4, backoff_s=1.0, backoff_max_s=2.5)
        sleeps: list[float] = []
        judge.sleep = sleeps.append
        verdict = judge.judge("q", "red", "red")
    assert verdict.correct is None and "after 5 attempts" in verdict.error
    assert sleeps == [1.0, 2.0, 2.5, 2.5]


def test_a_client_error_is_not_retried():
    with FakeOpenAI(lambda n, body: (401, None)) as server:
        judge = make_judge(server.base_url)
        verdict = judge.judge("q", "red", "red")
    assert verdict.correct is None and verdict.score is None and "HTTP 401" in verdict.error
    assert len(server.requests) == 1


def test_an_always_failing_endpoint_gives_counted_failures_and_stops_calling():
    with FakeOpenAI(lambda n, body: (500, None), max_requests=50) as server:
        judge = make_judge(server.base_url, max_retries=1, max_consecutive_failures=2)
        verdicts = [judge.judge(f"q{i}", "red", "red") for i in range(5)]
    assert all(v.correct is None and v.score is None and v.error for v in verdicts)
    assert "HTTP 500" in verdicts[0].error and "after 2 attempts" in verdicts[0].error
    assert "2 requests failed in a row" in verdicts[4].error
    assert len(server.requests) == 4  # 2 judgments x 2 attempts, then no more calls
    counts = judge.describe()
    assert counts["request_failures"] == 2 and counts["skipped_after_failures"] == 3 and counts["judgments"] == 5


def test_an_unreachable_endpoint_is_a_recorded_failure_not_a_crash():
    with FakeOpenAI() as server:
        url = server.base_url  # a port that is closed once the server stops
    judge = make_judge(url, max_retries=1)
    verdict = judge.judge("q", "red", "red")
    assert verdict.correct is None and "cannot reach" in verdict.error


@pytest.mark.parametrize("content", ["I think the answer is correct.", "{'pred': 'yes'}", ""])
def test_unparsable_replies_are_counted_with_the_reply(content):
    with FakeOpenAI(lambda n, body: (200, content)) as server:
        judge = make_judge(server.base_url)
        verdict = judge.judge("q", "red", "red")
    assert verdict.correct is None and verdict.score is None and "unparsable judge reply" in verdict.error
    assert repr(content[:20])[1:-1] in verdict.error
    assert judge.describe()["unparsable_replies"] == 1 and len(server.requests) == 1


def test_an_unexpected_client_error_is_a_recorded_failure():
    from mukv.judge.llm import LLMJudge

    class Broken(LLMJudge):
        name = "broken"

        def complete(self, messages):
            raise KeyError("surprise")

    judge = Broken("m", "v1")
    verdict = judge.judge("q", "a", "a")
    assert verdict.correct is None and "KeyError" in verdict.error and judge.describe()["request_failures"] == 1


# --------------------------------------------------------------------------------------- judgment cache
ITEMS = [("What colour?", "red", "red"), ("How many?", "3", "4"), ("What shape?", "star", "a star")]


def test_judgment_cache_makes_a_rerun_free_and_failures_are_retried(tmp_path):
    db = tmp_path / "judgments.sqlite"
    with FakeOpenAI(lambda n, body: (500, None) if n == 0 else (200, verdict_for(body))) as server:
        first = make_judge(server.base_url, JudgmentCache(db), max_retries=0)
        v1 = [first.judge(*item) for item in ITEMS]
        assert v1[0].correct is None and [v.correct for v in v1[1:]] == [False, False]
        assert len(server.requests) == 3 and len(JudgmentCache(db)) == 2  # the failure is not cached
        second = make_judge(server.base_url, JudgmentCache(db), max_retries=0)
        v2 = [second.judge(*item) for item in ITEMS]
        assert len(server.requests) == 4  # only the failed one is asked again
        assert second.describe()["cache_hits"] == 2 and v2[0].correct is True
        third = make_judge(server.base_url, JudgmentCache(db))
        assert [third.judge(*item) for item in ITEMS] == v2 and len(server.requests) == 4
        # Another judge model or prompt version is another key.
        other = OpenAIJudge("other-model", server.base_url, "k", "v1", cache=JudgmentCache(db), max_retries=0)
        other.judge(*ITEMS[0])
        assert len(server.requests) == 5
    assert judgment_key("m", "v1", *ITEMS[0]) != judgment_key("m", "v2", *ITEMS[0])
    assert judgment_key("m", "v1", *ITEMS[0]) != judgment_key("m2", "v1", *ITEMS[0])


def _writer(path: str, worker: int, n: int) -> None:
    cache = JudgmentCache(path, timeout_s=60)
    for i in range(n):
        key = judgment_key("m", "v1", f"q{worker}-{i}", "r", "p")
        cache.put(key, judge="m", prompt_version="v1", question=f"q{worker}-{i}", reference="r", prediction="p",
                  correct=i % 2 == 0, score=float(i % 6))
        assert cache.get(key) == (i % 2 == 0, float(i % 6))


def test_judgment_cache_is_safe_for_concurrent_processes(tmp_path):
    db = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(JudgmentCache(db)) == 120


# ------------------------------------------------------------------------------------------ config
def judge_cfg(name: str = "openai", **kw):
    """A judge config as the judge group's schema of that name builds it (typed, typos refused)."""
    from omegaconf import OmegaConf

    from mukv.config import HFJudgeConfig, OpenAIJudgeConfig

    cfg = OmegaConf.structured({"openai": OpenAIJudgeConfig, "hf": HFJudgeConfig}[name])
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_a_missing_api_key_is_a_config_error_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.delenv("MUKV_TEST_JUDGE_KEY", raising=False)
    cfg = judge_cfg(name="openai", model="m", api_key_env="MUKV_TEST_JUDGE_KEY", cache_path=str(tmp_path / "c.db"))
    with pytest.raises(ConfigError) as err:
        validate_judge_config(cfg)
    assert err.value.field == "judge.api_key_env" and "MUKV_TEST_JUDGE_KEY" in str(err.value)
    monkeypatch.setenv("MUKV_TEST_JUDGE_KEY", "sk-x")
    judge = build_judge(cfg)
    assert isinstance(judge, OpenAIJudge) and judge.api_key == "sk-x"
    cfg.api_key_env = None  # a local server without authentication
    assert build_judge(cfg).api_key is None


@pytest.mark.parametrize("override,field", [
    ({"name": "openai", "model": None}, "judge.model"),
    ({"name": "openai", "base_url": "localhost:8000"}, "judge.base_url"),
    ({"name": "openai", "prompt_version": "v0"}, "judge.prompt_version"),
    ({"name": "openai", "max_retries": -1}, "judge.max_retries"),
    ({"name": "hf", "model": "x", "cache": True, "cache_path": None}, "judge.cache_path"),
    ({"name": "openai", "_target_": "mukv.judge.oracle.OracleJudge"}, "judge._target_"),
])
def test_bad_judge_settings_name_the_field(override, field):
    options = {"model": "m", "cache": False, **override}
    if options["name"] == "openai":
        options.setdefault("api_key_env", None)
    cfg = judge_cfg(**options)
    with pytest.raises(ConfigError) as err:
        validate_judge_config(cfg)
    assert err.value.field == field


# --------------------------------------------------------------------------------------------- exact
@pytest.mark.parametrize("reference,prediction,ok", [
    ("red", "Red.", True), ("red", "red, it was", True), ("red", "reddish", False), ("red", "not red", False),
    ("B", "B", True), ("(B)", "b) the red one", True), ("B", "The answer is (B).", True), ("B", "C. blue", False),
    ("B", "", False), ("A", "a red circle", False), ("A", "A. a red circle", True), ("3", "3 circles", True),
])
def test_exact_match_and_multiple_choice_letters(reference, prediction, ok):
    v = ExactMatchJudge().judge("q", reference, prediction)
    assert v.correct is ok and v.score == (5.0 if ok else 0.0)


# ------------------------------------------------------------------------------------------ hf judge
def test_hf_judge_loads_a_local_causal_lm_and_counts_what_it_cannot_parse(tmp_path, monkeypatch):
    import torch
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mukv.judge.hf import HFJudge
    from mukv.models.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048))
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    judge = HFJudge(str(tmp_path / "lm"), "v1", device="cpu", dtype="float32", max_tokens=8,
                    cache=JudgmentCache(tmp_path / "c.sqlite"))
    asked = []
    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = auto.from_pretrained.__func__
        monkeypatch.setattr(auto, "from_pretrained",
                            classmethod(lambda c, *a, _r=real, **kw: asked.append(kw.get("local_files_only"))
                                        or _r(c, *a, **kw)))
    judge.prepare()
    assert asked == [True, True]  # a folder (or the Hub cache) loads with no request to the Hub
    prompt = judge.tokenizer.decode(judge._prompt_ids(get_prompt("v1").messages("q", "red", "red")))
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")  # chat template
    replies = [judge.complete(get_prompt("v1").messages("q", "red", "red")) for _ in range(2)]
    assert replies[0] == replies[1]  # greedy
    verdict = judge.judge("q", "red", "red")
    try:
        expected = parse_reply(replies[0])
        assert (verdict.correct, verdict.score) == (expected[0], float(expected[1]))
    except JudgeReplyError:  # a random model's noise: an invalid judgment, counted
        assert verdict.correct is None and "unparsable judge reply" in verdict.error
        assert judge.describe()["unparsable_replies"] == 1
    with pytest.raises(ConfigError, match="judge.model"):
        HFJudge(str(tmp_path / "nowhere"), "v1").prepare()
    asked.clear()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="judge.model.*cannot be reached"):  # an uncached Hub id, offline
        HFJudge("nobody/no-such-judge", "v1").prepare()
    assert asked == [True]  # from the cache alone: no retries against the Hub


# -------------------------------------------------------------------------------- the pipeline, judged
def run_cli(*overrides: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mukv.run", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


PIPELINE = ("model=tiny", "experiment=smoke", "engine.max_new_tokens=2", "judge=openai", "judge.model=judge-model",
            "judge.api_key_env=MUKV_TEST_JUDGE_KEY", "judge.max_retries=1", "judge.backoff_s=0.01")


def test_pipeline_with_openai_judge_caches_judgments_and_counts_failures(tmp_path, monkeypatch):
    env = {"MUKV_TEST_JUDGE_KEY": "sk-test"}
    db = tmp_path / "judgments.sqlite"
    with FakeOpenAI() as server:
        common = (*PIPELINE, f"judge.base_url={server.base_url}", f"judge.cache_path={db}")
        first = run_cli(f"hydra.run.dir={tmp_path}/r1", *common, env_extra=env)
        assert first.returncode == 0, first.stderr[-3000:]
        asked = len(server.requests)
        second = run_cli(f"hydra.run.dir={tmp_path}/r2", *common, env_extra=env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert len(server.requests) == asked  # the re-run made zero requests
    preds = pd.read_csv(tmp_path / "r1" / "predictions.csv", keep_default_na=False)
    assert asked == len(preds) > 0 and (preds.judge_error == "").all()
    m1 = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert m1["judge"]["requests"] == asked and m2["judge"]["cache_hits"] == asked and m2["judge"]["requests"] == 0
    assert m1["judged"] == m2["judged"] == len(preds) and m1["accuracy"] == m2["accuracy"]

    with FakeOpenAI(lambda n, body: (500, None)) as down:
        failed = run_cli(f"hydra.run.dir={tmp_path}/r3", *PIPELINE, f"judge.base_url={down.base_url}",
                         f"judge.cache_path={tmp_path}/other.sqlite", env_extra=env)
    assert failed.returncode == 0, failed.stderr[-3000:]  # judge failures are recorded, never a crash
    preds = pd.read_csv(tmp_path / "r3" / "predictions.csv", keep_default_na=False)
    assert (preds.judge_correct == "").all() and preds.judge_error.str.contains("HTTP 500").all()
    m3 = json.loads((tmp_path / "r3" / "metrics.json").read_text())
    assert m3["invalid_judgments"] == len(preds) and m3["judged"] == 0 and m3["accuracy"] is None
    assert m3["judge"]["request_failures"] == len(preds)

    # Judging resumes without streaming again once the endpoint is back; a second pass costs nothing.
    from mukv.report.rejudge import rejudge

    monkeypatch.setenv("MUKV_TEST_JUDGE_KEY", "sk-test")
    with FakeOpenAI() as back:
        m4 = rejudge(tmp_path / "r3", [f"judge.base_url={back.base_url}"])
        assert len(back.requests) == len(preds)
        m5 = rejudge(tmp_path / "r3", [f"judge.base_url={back.base_url}"], only_invalid=True)
        assert len(back.requests) == len(preds) and m5["judge"]["judgments"] == 0
    after = pd.read_csv(tmp_path / "r3" / "predictions.csv", keep_default_na=False)
    assert (after.judge_error == "").all() and after.judge_correct.astype(str).isin(["True", "False"]).all()
    assert list(after.qid) == list(preds.qid) and list(after.prediction) == list(preds.prediction)
    assert m4["judged"] == len(preds) and m4["invalid_judgments"] == 0 and m4["accuracy"] == m1["accuracy"]
    assert m4["method"] == m3["method"] and m4["kv_bytes_total"] == m3["kv_bytes_total"]


def test_pipeline_stops_before_streaming_without_the_api_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MUKV_TEST_JUDGE_KEY"}
    proc = subprocess.run([sys.executable, "-m", "mukv.run", f"hydra.run.dir={tmp_path}/r", *PIPELINE,
                           f"judge.cache_path={tmp_path}/c.sqlite"], cwd=ROOT, env={**env, "HYDRA_FULL_ERROR": "0"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "MUKV_TEST_JUDGE_KEY" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "predictions.csv").exists()


# --------------------------------------------------------------------------- the API key stays with base_url
KEY = "sk-mukv-SECRET-0123456789"


class Loopback(LocalServer):
    """Any method on 127.0.0.1 in a thread; ``respond(handler) -> (status, headers, body)``; every request's
    method, path and headers are recorded."""

    def __init__(self, respond) -> None:
        self.requests: list[tuple[str, str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = respond(self)
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

        LocalServer.__init__(self, Handler)


def echo_headers(status: int, as_reply: bool = False):
    """A server that writes the request's headers (Authorization included) into its answer."""
    def respond(handler):
        echoed = "".join(f"{k}: {v}\n" for k, v in handler.headers.items())
        if as_reply:
            payload = {"choices": [{"message": {"role": "assistant", "content": f"cannot judge; you sent {echoed}"}}]}
        else:
            payload = {"error": {"message": "bad request", "request_headers": echoed}}
        return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()
    return respond


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_is_not_followed_and_never_gets_the_key(code):
    reply = {"choices": [{"message": {"role": "assistant", "content": "{'pred': 'yes', 'score': 5}"}}]}
    with Loopback(lambda h: (200, {}, json.dumps(reply).encode())) as elsewhere:
        target = f"{elsewhere.base_url}/chat/completions"
        with Loopback(lambda h: (code, {"Location": target}, b"")) as endpoint:
            judge = OpenAIJudge("judge-model", endpoint.base_url, KEY, "v1", max_retries=2, backoff_s=0.01)
            verdict = judge.judge("q", "red", "red")
    assert elsewhere.requests == []  # urllib used to follow a 302 there, Authorization header and all
    assert len(endpoint.requests) == 1  # refused at once, not retried
    assert verdict.correct is None and f"HTTP {code} redirect" in verdict.error and target in verdict.error
    assert "judge.base_url" in verdict.error and KEY not in verdict.error


@pytest.mark.parametrize("status,as_reply", [(400, False), (500, False), (200, True)])
def test_a_server_echoing_the_key_never_gets_it_into_verdicts_or_logs(caplog, status, as_reply):
    caplog.set_level("DEBUG")
    with Loopback(echo_headers(status, as_reply)) as server:
        judge = OpenAIJudge("judge-model", server.base_url, KEY, "v1", max_retries=1, backoff_s=0.01)
        verdicts = [judge.judge(f"q{i}", "red", "red") for i in range(2)]
    assert all(v.correct is None for v in verdicts) and server.requests
    assert all(dict(h)["Authorization"] == f"Bearer {KEY}" for _, _, h in server.requests)  # the key was sent
    for v in verdicts:
        assert KEY not in v.error and "Bearer [redacted]" in v.error, v.error  # ... and echoed back, redacted
    assert KEY not in caplog.text and KEY not in json.dumps(judge.describe()) and KEY not in judge._last_failure


def test_a_key_echoed_where_the_error_text_is_cut_leaves_no_part_of_it():
    body = ("x" * 290 + KEY + " and more").encode()  # the first 300 characters end inside the key
    with Loopback(lambda h: (400, {}, body)) as server:
        verdict = OpenAIJudge("judge-model", server.base_url, KEY, "v1", max_retries=0).judge("q", "red", "red")
    assert "HTTP 400" in verdict.error and KEY[:6] not in verdict.error and "[redacted]" in verdict.error


def test_an_unexpected_client_error_carrying_the_key_is_logged_redacted(caplog):
    from mukv.judge.llm import LLMJudge

    class Leaky(LLMJudge):
        name = "leaky"

        def complete(self, messages):
            raise ValueError(f"request failed with headers {{'Authorization': 'Bearer {KEY}'}} and key {KEY}")

    judge = Leaky("m", "v1")
    judge.secrets = (KEY,)
    caplog.set_level("DEBUG")
    verdict = judge.judge("q", "a", "a")
    assert verdict.correct is None and "ValueError" in verdict.error and KEY not in verdict.error
    assert KEY not in caplog.text and "[redacted]" in caplog.text


def test_no_file_of_a_run_holds_the_key_when_the_judge_echoes_it(tmp_path):
    out = tmp_path / "run"
    with Loopback(echo_headers(400)) as server:
        proc = run_cli(f"hydra.run.dir={out}", *PIPELINE, f"judge.base_url={server.base_url}",
                       f"judge.cache_path={tmp_path}/judgments.sqlite", "logger=wandb",
                       env_extra={"MUKV_TEST_JUDGE_KEY": KEY, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server.requests and KEY not in proc.stdout + proc.stderr
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert preds.judge_error.str.contains("Bearer [redacted]", regex=False).all()  # the echo, redacted
    files = [p for p in [*out.rglob("*"), *tmp_path.glob("judgments.sqlite*")] if p.is_file()]
    assert any(p.name == "run.log" for p in files) and any(p.suffix == ".wandb" for p in files)
    assert [p for p in files if KEY.encode() in p.read_bytes()] == []
