"""``engine.compile``: the decoder layers compiled (torch.compile, the inductor backend on the CPU) give the
eager path's answers, with fewer operator calls per chunk and per answer token (issue #30)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg

from mukv.bench import MethodSpec, build_bench_method, ops_row
from mukv.cache import ordered_methods
from mukv.engine import EngineSettings, StreamingEngine
from mukv.models.loading import build_tiny

QUESTION = "What happened just before the person opened the door?"
CHUNK, BUDGET_FRAMES = 8, 16  # as tests/test_ops.py


def stream_and_answer(llm, name: str, compile_mode: str):
    method = build_bench_method(MethodSpec(name), llm.geometry.tokens_per_frame, ["budget_frames=4"])
    engine = StreamingEngine(llm, method, EngineSettings(encode_chunk_size=4, max_new_tokens=6, progress=False,
                                                         compile=compile_mode))
    gen = torch.Generator().manual_seed(1)
    g = llm.geometry
    steps = 4 // g.frames_per_step
    with torch.inference_mode():
        method.start_video(llm.init_prompt_ids())
        for first in range(0, 12, 4):
            method.ingest(llm.visual_tokens(torch.randn(steps, g.tokens_per_frame, g.hidden_size, generator=gen)),
                          first // g.frames_per_step)
        answer, context, _ = engine.answer(QUESTION)
    return answer, context


# method: compiled, (operator calls per chunk / the EAGER plain forward of the same tokens, per answer token / the
# eager plain decode step): the target is 1.2 for both; measured 2026-12-03, the window in one sliding-window call (tests/test_ops.py's
# settings: 4 layers, 8-frame chunks, 16-frame budgets), about +3%
COMPILED_CEILINGS = {
    "full": (0.71, 0.57),
    "sliding_window": (0.67, 0.57),
    "uniform": (None, 0.57),  # 0.531 in a fresh process, 0.553 (as the others) after other compiled tests
    "rekv": (0.77, 0.57),
    "mukv": (1.03, 0.57),
    "streamkv": (1.23, 0.64),
    "infinipot_v": (0.80, 0.57),
    "hermes": (0.76, 0.62),
    "knorm": (0.74, 0.57),
    "streaming_llm": (0.73, 0.57),
    "tova": (0.83, 0.57),
    "snapkv": (0.80, 0.57),
    "expected_attention": (1.06, 0.57),
}


@pytest.fixture(scope="module")
def models():
    eager = build_tiny(0, torch.device("cpu"), torch.float32, text_layers=4)
    compiled = build_tiny(0, torch.device("cpu"), torch.float32, text_layers=4)
    compiled.compile("default")  # here, not by whichever test runs first (workers split the tests)
    return eager, compiled


@pytest.mark.parametrize("name", ["rekv", "mukv", "sliding_window"])
def test_compiled_layers_answer_as_eager_ones(models, name):
    eager, compiled = models
    a, ca = stream_and_answer(eager, name, "none")
    b, cb = stream_and_answer(compiled, name, "default")
    assert compiled.compiled == "default" and eager.compiled is None
    for ka, kb in zip(ca.keys, cb.keys, strict=True):  # the recalled context: what the compiled stream encoded
        torch.testing.assert_close(kb, ka, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.first_token_logits, a.first_token_logits, atol=1e-4, rtol=1e-4)
    assert b.token_ids == a.token_ids


def test_every_registered_method_has_a_compiled_ceiling():
    assert not sorted(set(ordered_methods()) - set(COMPILED_CEILINGS)), "pin its compiled operator calls here"


@pytest.mark.parametrize("name", ordered_methods())
def test_compiled_layers_make_fewer_operator_calls(models, name):
    """The compiled layers' operator calls of a steady chunk and of an answer token, pinned against the eager
    plain forward and decode step (ops_row's references are eager even for compiled layers)."""
    eager, compiled = models
    chunk_max, decode_max = COMPILED_CEILINGS[name]
    rows = [ops_row(llm, build_bench_method(MethodSpec(name), llm.geometry.tokens_per_frame,
                                            [f"budget_frames={BUDGET_FRAMES}"]), CHUNK) for llm in (eager, compiled)]
    assert compiled.compiled == "default"
    e, c = rows
    if chunk_max is not None:
        assert c["chunk_ops"] <= chunk_max * e["plain_ops"], (name, e["chunk_ops"], c["chunk_ops"], e["plain_ops"])
    assert c["decode_ops"] <= decode_max * e["plain_decode_ops"], (name, c["decode_ops"], e["plain_decode_ops"])
    assert c["host_reads"] == e["host_reads"], name


def test_compile_mode_is_checked_at_compose_time():
    assert compose_cfg().engine.compile.value == "none"
    assert compose_cfg("engine.compile=reduce_overhead").engine.compile.torch_mode == "reduce-overhead"
    with pytest.raises(Exception, match="compile"):
        compose_cfg("engine.compile=fast")


def test_compiled_qwen_vl_layers_answer_as_eager_ones():
    """The other model family: Qwen3-VL (M-RoPE offsets through position ids, deepstack features) compiled."""
    from mukv.bench import random_qwen

    a, ca = stream_and_answer(random_qwen("qwen3-vl-tiny", torch.float32, "cpu", (128, 128)), "rekv", "none")
    b, cb = stream_and_answer(random_qwen("qwen3-vl-tiny", torch.float32, "cpu", (128, 128)), "rekv", "default")
    torch.testing.assert_close(b.first_token_logits, a.first_token_logits, atol=1e-4, rtol=1e-4)
    assert b.token_ids == a.token_ids
