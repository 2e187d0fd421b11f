"""InfiniPot-V: the compression rule on planted tensors (recent frames whole, TaR picks what the recent frames do
not repeat, value norms fill the rest, per head, pooled per layer quarter), and the streaming method on the tiny
model (no compression = the full cache; compression at the published points; original positions; flat memory)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_frames
from test_engine import stream

from mukv.cache import FullCache
from mukv.cache.base import budget_knobs, budget_knobs_for_tokens, video_tokens
from mukv.cache.infinipot_v import (
    InfiniPotV,
    compress_layer,
    pool_value_norms,
    pooling_of_layer,
    tar_patches,
)
from mukv.errors import ConfigError
from mukv.models.adapter import KVGeometry

TPF, D = 4, 8  # planted tensors: 4 tokens per frame (a 2 x 2 grid), head dim 8


def planted(frames: int = 8, heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys where every older frame repeats the recent frames at each patch, and values of norm 1."""
    g = torch.Generator().manual_seed(seed)
    patch_keys = torch.randn(heads, TPF, D, generator=g)
    keys = patch_keys[:, None].expand(-1, frames, -1, -1).reshape(1, heads, frames * TPF, D).clone()
    values = torch.nn.functional.normalize(torch.randn(1, heads, frames * TPF, D, generator=g), dim=-1)
    return keys, values


def slots(heads: int, length: int) -> torch.Tensor:
    return (torch.arange(length) % TPF).expand(heads, -1)


def test_recent_frames_stay_whole_and_tar_keeps_what_they_do_not_repeat():
    """8 frames, query_ratio 0.25: the 2 newest frames (8 tokens) are kept; with tar_ratio 1 the other 8 kept
    tokens are the older ones least like the recent frames at their patch: here the planted novel keys, which
    differ per head, although their value norms are the smallest."""
    keys, values = planted()
    novel = {0: [0, 5, 9, 14, 18, 19, 22, 23], 1: [1, 2, 3, 7, 11, 12, 13, 21]}
    for h, idx in novel.items():
        keys[0, h, idx] = -keys[0, h, idx]  # the opposite direction: cosine -1 with the recent frames
        values[0, h, idx] *= 0.01
    picked = compress_layer(keys, values, slots(2, 32), keep_tokens=16, tokens_per_frame=TPF, tar_ratio=1.0,
                            query_ratio=0.25)
    for h, idx in novel.items():
        assert picked[h].tolist() == [*idx, *range(24, 32)]  # time order


def test_value_norms_fill_the_rest_of_the_budget():
    """tar_ratio 0.5, 20 tokens kept: TaR's 10 are the 8 recent tokens and the 2 most novel older ones; the
    other 10 are the largest value norms among the rest."""
    keys, values = planted(heads=1)
    keys[0, 0, [3, 17]] = -keys[0, 0, [3, 17]]
    loud = [1, 2, 4, 6, 8, 10, 12, 13, 15, 20]
    values[0, 0, loud] *= 5
    picked = compress_layer(keys, values, slots(1, 32), 20, TPF, tar_ratio=0.5, query_ratio=0.25)
    assert picked[0].tolist() == sorted([3, 17, *loud, *range(24, 32)])
    # no TaR (tar_ratio 0): value norms alone, the recent frames no longer protected
    values[0, 0, 24:] *= 0.1
    only_norms = compress_layer(keys, values, slots(1, 32), 10, TPF, tar_ratio=0.0, query_ratio=0.25)
    assert only_norms[0].tolist() == loud


def test_tar_compares_by_the_patch_it_is_given():
    """The published rule compares a token with the recent tokens in the same cache slot modulo
    tokens_per_frame; once a compression has kept scattered tokens, that is not their patch. tar_patch=position
    gives each token its own patch (its video index modulo tokens_per_frame)."""
    tokens = torch.tensor([[1, 6, 8, 9, 12, 13, 14, 15]])
    assert tar_patches(tokens, TPF, "slot").tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert tar_patches(tokens, TPF, "position").tolist() == [[1, 2, 0, 1, 0, 1, 2, 3]]
    # the same keys scored under the two rules keep different tokens
    keys, values = planted(frames=2, heads=1)
    keys[0, 0, 1] = keys[0, 0, 4 + 2]  # the token of slot 1 repeats recent patch 2 (its own patch under position)
    keys[0, 0, 2] = keys[0, 0, 4 + 0]  # the token of slot 2 repeats recent patch 0 (its own patch under position)
    by = {rule: compress_layer(keys, values, tar_patches(tokens, TPF, rule), 5, TPF, 1.0, 0.5)[0].tolist()
          for rule in ("slot", "position")}
    assert by["slot"] != by["position"]


def test_adaptive_pooling_by_layer_quarter():
    assert [pooling_of_layer(i, 24) for i in (0, 5, 6, 12, 18, 23)] == [(3, 7), (3, 7), (2, 5), (1, 3), (0, 1), (0, 1)]
    assert pooling_of_layer(8, 9) == (0, 1)  # 9 layers: quarters of 2, the last takes the remainder
    norms = torch.arange(32.0).reshape(1, 32)
    assert torch.equal(pool_value_norms(norms, 0, 1, 2), norms)
    one_d = pool_value_norms(norms, 1, 3, 2)
    assert one_d[0, 5] == pytest.approx((4 + 5 + 6) / 3) and one_d[0, 0] == pytest.approx((0 + 0 + 1) / 3)
    # 2-D over 2 x 2 grids: the window shrinks to the grid side, made odd: below 3, no pooling
    assert torch.equal(pool_value_norms(norms, 2, 5, 2), norms)
    grid = torch.arange(2 * 16.0).reshape(1, 32)  # 2 frames of 4 x 4
    two_d = pool_value_norms(grid, 2, 5, 4)  # window min(5, 2 frames, 4, 4) = 2 -> odd 1: none
    assert torch.equal(two_d, grid)
    three = torch.arange(4 * 16.0).reshape(1, 64)  # 4 frames of 4 x 4: window 3
    pooled = pool_value_norms(three, 3, 7, 4).reshape(4, 4, 4)
    assert pooled[1, 1, 1] == pytest.approx(three.reshape(4, 4, 4)[:3, :3, :3].mean().item())


def test_budget_and_knob_validation():
    assert budget_knobs("infinipot_v", 16, 16) == {"block_frames": 16, "keep_frames": 12}
    assert budget_knobs("infinipot_v", 32, 196) == {"block_frames": 32, "keep_frames": 24}  # the published run
    assert video_tokens("infinipot_v", {"block_frames": 16}, 16) == 256
    assert budget_knobs_for_tokens("infinipot_v", 256, 16) == {"block_frames": 16, "keep_frames": 12}
    geometry = KVGeometry(2, 4, 2, 8, 32, 16, 4)
    InfiniPotV().validate(geometry)
    for knobs, field in [({"keep_frames": 32}, "cache.keep_frames"), ({"block_frames": 1}, "cache.block_frames"),
                         ({"tar_ratio": 0.2}, "cache.tar_ratio"),  # TaR's share cannot hold the 8 recent frames
                         ({"block_frames": 3, "keep_frames": 2}, "cache.query_ratio"),  # no whole recent frame
                         ({"tar_patch": "position", "query_ratio": 0.3, "tar_ratio": 1.0}, "cache.query_ratio"),
                         ({"tar_keys": "sideways"}, "cache.tar_keys")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            InfiniPotV(**knobs).validate(geometry)
    with pytest.raises(ConfigError, match=r"cache\.adaptive_pooling"):  # 15 tokens per frame: no square grid
        InfiniPotV(adaptive_pooling=True).validate(KVGeometry(2, 4, 2, 8, 32, 15, 4))


# ------------------------------------------------------------------------------------ the streaming method
def test_without_compression_it_is_the_full_cache(tiny_llm):
    frames = random_frames(7)
    full = stream(tiny_llm, FullCache(), frames, 3).answer("q")[0]
    method = InfiniPotV(block_frames=8, keep_frames=6)
    answer, context, _ = stream(tiny_llm, method, frames, 3).answer("q")
    assert context.detail.compressions == 0
    torch.testing.assert_close(answer.first_token_logits, full.first_token_logits, atol=1e-5, rtol=1e-5)


def test_compressions_happen_when_the_cache_is_full_and_do_not_depend_on_chunks(tiny_llm):
    """block 4, keep 3: frames 1-4 fill the cache, each later frame first cuts it back to 3 frames: 10 frames,
    6 compressions, 4 frames' worth per head at the question; the same whatever the engine's chunks."""
    frames = random_frames(10)
    answers = []
    for chunk in (1, 4, 10):
        method = InfiniPotV(block_frames=4, keep_frames=3)
        answer, context, _ = stream(tiny_llm, method, frames, chunk).answer("q")
        n_init = len(tiny_llm.init_prompt_ids())
        assert context.detail.compressions == 6 and context.online_tokens == n_init + 4 * 16
        assert method.stats().kv_tokens == n_init + 4 * 16
        answers.append(answer.first_token_logits)
    torch.testing.assert_close(answers[0], answers[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(answers[0], answers[2], atol=1e-5, rtol=1e-5)


def test_kept_tokens_keep_their_original_positions_and_memory_is_flat(tiny_llm):
    """Layer 0's keys do not depend on attention: each kept token's rotated key is the full cache's key of that
    token at its encoding position. The bytes held do not grow with the stream."""
    frames = random_frames(16)
    full = stream(tiny_llm, FullCache(), frames, 4).method.recall("q")
    method = InfiniPotV(block_frames=4, keep_frames=3, tar_keys="unrotated")
    stream(tiny_llm, method, frames[:8], 4)
    bytes_at_8 = method.stats().kv_bytes
    context = stream(tiny_llm, method, frames, 4).method.recall("q")
    n_init = len(tiny_llm.init_prompt_ids())
    assert method.stats().kv_bytes == bytes_at_8
    assert context.next_position == n_init + 16 * 16  # the answer starts after the last frame
    tokens = method.tokens[0]  # (kv_heads, kept) video token indices of layer 0
    assert not torch.equal(tokens[0], tokens[1])  # each KV head keeps its own tokens
    for h in range(tokens.shape[0]):
        expected = full.keys[0][0, h, n_init + tokens[h]]
        torch.testing.assert_close(context.keys[0][0, h, n_init:], expected, atol=1e-5, rtol=1e-5)
    assert set(context.recalled.tokens) >= set(tokens.flatten().tolist())


@pytest.mark.parametrize("knobs", [{}, {"adaptive_pooling": True, "tar_keys": "unrotated", "tar_patch": "position"}])
def test_layers_compressed_together_keep_what_each_layer_alone_keeps(tiny_llm, knobs):
    """``compress`` runs the layers that pool alike as one set of heads: every layer keeps what ``compress_layer``
    picks from that layer alone (its own pooling, its own keys)."""
    method = InfiniPotV(block_frames=4, keep_frames=3, **knobs)
    stream(tiny_llm, method, random_frames(4), 4)
    n_layers, tpf, rope = tiny_llm.geometry.num_layers, tiny_llm.geometry.tokens_per_frame, tiny_llm.rope
    expected = []
    for idx in range(n_layers):
        keys, tokens = method.keys[idx], method.tokens[idx]
        if knobs.get("tar_keys") == "unrotated":
            keys = rope.rotate(keys, -(method.n_init + tokens).float())
        pooling = pooling_of_layer(idx, n_layers) if method.adaptive_pooling else (0, 1)
        picked = compress_layer(keys, method.values[idx], tar_patches(tokens, tpf, method.tar_patch),
                                method.keep_frames * tpf, tpf, method.tar_ratio, method.query_ratio, pooling)
        expected.append(torch.gather(tokens, 1, picked))
    method.compress()
    assert len({tuple(t.flatten().tolist()) for t in expected}) > 1  # the layers choose apart
    for idx in range(n_layers):
        assert torch.equal(method.tokens[idx], expected[idx])
