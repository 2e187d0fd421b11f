"""The presses (kvpress's scorers as per-block compressors): on the first block of a stream, the tokens each layer
keeps are those a direct computation of the press's definition picks, from a stock offline forward (eager
attention) or from the full cache's keys; blocks, chunks and keep_ratio 1 behave as the mechanics say."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_frames
from test_engine import stream

from mukv.cache import FullCache
from mukv.cache.base import CACHE_METHODS
from mukv.cache.press import PressBlock
from mukv.errors import ConfigError
from mukv.models.adapter import KVGeometry

PRESSES = ["knorm", "streaming_llm", "tova", "snapkv", "expected_attention"]
KEEP = 0.25  # of a 2-frame block of 32 tokens: 8


def top(scores: torch.Tensor, k: int) -> list[int]:
    return scores.topk(k).indices.sort().values.tolist()


def first_block(llm, name: str, **knobs):
    """A press after exactly one block of 2 frames: its kept tokens per layer (layer 0's first head; one set for
    all heads)."""
    method = CACHE_METHODS[name](block_frames=2, keep_ratio=KEEP, **knobs)
    stream(llm, method, random_frames(2), 1)
    assert method.blocks_done == 1
    for layer in method.tokens:
        assert all(torch.equal(layer[0], layer[h]) for h in range(layer.shape[0]))  # one set for all heads
    return [layer[0].tolist() for layer in method.tokens]


def offline_attentions(llm, extra_ids: list[int] | None = None) -> tuple[list[torch.Tensor], int]:
    """Attention probabilities of a stock eager forward over init + 2 frames (+ extra tokens), per layer."""
    vis = llm.encode_frames(random_frames(2)).reshape(1, -1, llm.geometry.hidden_size)
    parts = [llm.embed_ids(llm.init_prompt_ids()), vis] + ([llm.embed_ids(extra_ids)] if extra_ids else [])
    lm = llm.language_model
    before = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=torch.cat(parts, 1), output_attentions=True)
    finally:
        lm.config._attn_implementation = before
    return [a[0].float() for a in out.attentions], len(llm.init_prompt_ids())


def test_knorm_keeps_the_smallest_key_norms(tiny_llm):
    full = stream(tiny_llm, FullCache(), random_frames(2), 2).method.recall("q")
    n_init = len(tiny_llm.init_prompt_ids())
    expected = [top(-k[0, :, n_init:].norm(dim=-1).mean(0), 8) for k in full.keys]
    assert first_block(tiny_llm, "knorm") == expected


def test_streaming_llm_keeps_the_block_sinks_and_its_end():
    from mukv.cache.streaming_llm import StreamingLLMPress

    press = StreamingLLMPress(keep_ratio=0.25, n_sink=4)
    press.keys = [torch.zeros(1, 2, 32, 8)]
    scores = press.score(PressBlock(start=0, length=32))[0]
    assert top(scores.mean(0), 8) == [0, 1, 2, 3, 28, 29, 30, 31]


def test_tova_keeps_what_the_last_token_attends_to(tiny_llm):
    attentions, n_init = offline_attentions(tiny_llm)
    expected = []
    for a in attentions:
        scores = a[:, -1, n_init:].mean(0)
        scores[-1] = scores.max() + 1
        expected.append(top(scores, 8))
    assert first_block(tiny_llm, "tova") == expected


def test_snapkv_scores_by_the_template_tokens_after_the_frames(tiny_llm):
    window = tiny_llm.question_prompt_ids("")
    attentions, n_init = offline_attentions(tiny_llm, window)
    kv_heads = tiny_llm.geometry.num_kv_heads
    expected = []
    for a in attentions:
        obs = a[:, -len(window):, n_init:n_init + 32].mean(1)  # (q_heads, block)
        pooled = torch.nn.functional.avg_pool1d(obs[:, None], 5, stride=1, padding=2)[:, 0]
        expected.append(top(pooled.view(kv_heads, -1, 32).mean(1).mean(0), 8))
    assert first_block(tiny_llm, "snapkv") == expected


def test_expected_attention_averages_rope_and_adds_the_covariance_term(tiny_llm):
    """The averaged RoPE matrix applied to x is the mean of x rotated to each future position; the score is the
    softmax of k . R mu / sqrt(d) + k^T R cov R^T k / (2 d), group-averaged, times ||v||, sinks kept."""
    from mukv.cache.expected_attention import ExpectedAttentionPress

    press = ExpectedAttentionPress(n_future_positions=7, n_sink=2)
    press.llm = tiny_llm
    d = tiny_llm.geometry.head_dim
    x = torch.randn(3, d)
    rotated = torch.stack([tiny_llm.rope.rotate(x, torch.full((3,), p)) for p in range(40, 47)]).mean(0)
    rot = press.average_rope(40, x.device)
    torch.testing.assert_close(x @ rot.T, rotated, atol=1e-5, rtol=1e-5)
    # planted block in two layers (scored together): 2 KV heads, 4 query heads, 6 tokens (2 sinks)
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 1, 2, 6, d, generator=g), torch.randn(2, 1, 2, 6, d, generator=g)
    press.keys, press.values, press.n_init = list(keys), list(values), 0
    q = torch.randn(2, 4, 5, d, generator=g)  # per layer, the block's pre-RoPE queries, sinks left out
    block = PressBlock(start=0, length=6, first_token=0, query_sum={i: q[i].sum(1) for i in range(2)},
                       query_outer={i: q[i].transpose(1, 2) @ q[i] for i in range(2)}, query_count=5)
    both = press.score(block)
    assert both.shape == (2, 2, 6)
    rot = press.average_rope(6, x.device)
    for layer in range(2):
        scores = both[layer]
        mu = q[layer].mean(1) @ rot.T
        cov = rot @ torch.stack([torch.cov(q[layer, h].T, correction=0) for h in range(4)]) @ rot.T
        k = keys[layer, 0, :, 2:].repeat_interleave(2, 0)
        direct = (k @ mu[..., None])[..., 0] / math.sqrt(d) + torch.einsum("hnd,hde,hne->hn", k, cov, k) / (2 * d)
        direct = torch.softmax(direct, -1).view(2, 2, -1).mean(1) * values[layer, 0, :, 2:].norm(dim=-1)
        torch.testing.assert_close(scores[:, 2:], direct, atol=1e-5, rtol=1e-4)
        assert (scores[:, :2] > scores[:, 2:].max()).all()  # the sinks are kept


@pytest.mark.parametrize("name", PRESSES)
def test_blocks_chunks_and_keep_ratio_one(tiny_llm, name):
    """10 frames in blocks of 4 at keep 0.25: two blocks cut to 16 tokens each plus the 2 frames of the open block;
    the same answer whatever the engine's chunks; keep_ratio 1 is the full cache."""
    frames = random_frames(10)
    answers = []
    for chunk in (1, 3):
        method = CACHE_METHODS[name](block_frames=4, keep_ratio=0.25)
        answer, context, _ = stream(tiny_llm, method, frames, chunk).answer("q")
        assert (context.detail.blocks, context.detail.held_tokens) == (2, 16 + 16 + 32)
        answers.append(answer.first_token_logits)
    torch.testing.assert_close(answers[0], answers[1], atol=1e-5, rtol=1e-5)
    full = stream(tiny_llm, FullCache(), frames, 3).answer("q")[0].first_token_logits
    whole = stream(tiny_llm, CACHE_METHODS[name](block_frames=4, keep_ratio=1.0), frames, 3).answer("q")[0]
    torch.testing.assert_close(whole.first_token_logits, full, atol=1e-5, rtol=1e-5)


def test_press_knobs_are_checked():
    geometry = KVGeometry(2, 4, 2, 8, 32, 16, 4)
    for name, knobs, field in [("knorm", {"keep_ratio": 0}, "cache.keep_ratio"),
                               ("tova", {"block_frames": 0}, "cache.block_frames"),
                               ("snapkv", {"kernel_size": 4}, "cache.kernel_size"),
                               ("streaming_llm", {"n_sink": 200}, "cache.n_sink"),
                               ("expected_attention", {"n_future_positions": 0}, "cache.n_future_positions")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            CACHE_METHODS[name](**knobs).validate(geometry)
