"""HERMES: the layer hierarchy, scores and consistency on planted tensors, and the streaming method on the tiny
model (no compression = the full cache; the pseudo-question's attention is a stock eager forward's; recency
layers keep the newest tokens, long-term layers keep the most attended and fold the rest into one summary;
per-layer positions, compaction near the model's maximum; history prompts; flat memory)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import random_frames
from test_engine import stream
from test_presses import offline_attentions

from mukv.cache import FullCache
from mukv.cache.base import budget_knobs_for_tokens, video_tokens
from mukv.cache.hermes import (
    SUMMARY_TOKEN,
    Hermes,
    consistent_scores,
    history_prompts,
    layer_tiers,
    tier_score,
    tier_scores,
)
from mukv.errors import ConfigError
from mukv.models.adapter import KVGeometry

TPF = 16  # the tiny model's tokens per frame


# ------------------------------------------------------------------------------------ planted tensors
def test_layer_tiers_are_the_published_hierarchy():
    """28 layers (Qwen2-7B), short 0.1, long 0.3: layers 0-1 recency, 19-27 attention, 2-18 interpolated."""
    tiers = layer_tiers(28, 0.1, 0.3, (0.1, 0.3, 0.4))
    assert [t.name for t in tiers] == ["short"] * 2 + ["mid"] * 17 + ["long"] * 9
    assert [t.prompt for t in tiers[:2]] == ["local"] * 2 and {t.prompt for t in tiers[19:]} == {"global"}
    assert (tiers[0].recency_weight, tiers[0].recency_k, tiers[0].gamma) == (1.0, 20.0, 0.1)
    assert (tiers[27].recency_weight, tiers[27].gamma) == (0.0, 0.4)
    mid = tiers[2:19]
    assert mid[0].recency_weight == 1.0 and mid[0].recency_k == 20.0 and mid[0].prompt == "mixed"
    progress = 16 / 17
    assert mid[-1].recency_weight == pytest.approx(1 - 0.9 * progress)
    assert mid[-1].recency_k == pytest.approx(20 - 19.5 * progress)
    assert all(a.recency_weight > b.recency_weight for a, b in zip(mid, mid[1:], strict=False))


def test_tier_scores_weigh_recency_against_attention():
    attention = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.2])
    short, _, long_ = layer_tiers(3, 1 / 3, 1 / 3, (0.1, 0.3, 0.4))
    assert tier_score(attention, short).argsort(descending=True).tolist() == [4, 3, 2, 1, 0]  # newest first
    assert tier_score(attention, long_).argsort(descending=True).tolist() == [0, 2, 4, 1, 3]  # most attended
    expected = (attention - 0.05) / (0.45 + 1e-6)
    torch.testing.assert_close(tier_score(attention, long_), expected)


def test_consistency_mixes_each_layer_with_the_next_from_the_top_down():
    tiers = layer_tiers(3, 1 / 3, 1 / 3, (0.1, 0.3, 0.4))
    s = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])]
    out = consistent_scores(s, tiers)
    mid = 0.7 * s[1] + 0.3 * s[2]
    torch.testing.assert_close(out[2], s[2])
    torch.testing.assert_close(out[1], mid)
    torch.testing.assert_close(out[0], 0.9 * s[0] + 0.1 * mid)  # the already mixed layer below
    longer = consistent_scores([torch.zeros(4), torch.tensor([0.0, 1.0])], tiers[1:])  # lengths differ
    torch.testing.assert_close(longer[0], 0.3 * torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_history_prompts_prefix_the_last_turn():
    local, global_ = history_prompts("L.", "G.", "What is red?", "B) the cup")
    assert local == "Find recent details related to: Question: What is red? Answer: the cup. L."
    assert global_ == "Context summary: Question: What is red? Answer: the cup. G."


def test_budget_and_knob_validation():
    geometry = KVGeometry(2, 4, 2, 8, 32, TPF, 4)
    assert video_tokens("hermes", {"kv_frames": 3}, TPF) == 48
    assert video_tokens("hermes", {"kv_size": 50, "compress_every": 2}, TPF) == 66
    assert budget_knobs_for_tokens("hermes", 256, TPF) == {"kv_frames": 16, "kv_size": None}
    for knobs, field in [({"kv_frames": 0}, "kv_frames"), ({"kv_size": 1}, "kv_size"),
                         ({"compress_every": 0}, "compress_every"), ({"gamma_mid": 1.5}, "gamma_mid"),
                         ({"short_ratio": 0.6, "long_ratio": 0.6}, "long_ratio"), ({"local_prompt": " "}, "local_prompt")]:
        with pytest.raises(ConfigError, match=f"cache.{field}"):
            Hermes(**knobs).validate(geometry)


# ------------------------------------------------------------------------------------ the streaming method
def test_without_compression_it_is_the_full_cache(tiny_llm):
    frames = random_frames(7)
    full = stream(tiny_llm, FullCache(), frames, 3).answer("q")[0]
    answer, context, _ = stream(tiny_llm, Hermes(kv_frames=10), frames, 3).answer("q")
    assert context.detail.compressions == 0 and context.layer_positions == [context.next_position] * 2
    torch.testing.assert_close(answer.first_token_logits, full.first_token_logits, atol=1e-5, rtol=1e-5)


def test_pseudo_question_attention_is_a_stock_eager_forwards(tiny_llm):
    """Over init + 2 frames: each layer's score signal is the eager attention of the pseudo-question's tokens,
    averaged over heads and tokens, on the cached tokens after the init prompt."""
    method = Hermes(kv_frames=10)
    stream(tiny_llm, method, random_frames(2), 2)
    text = method.pseudo_questions()["global"]
    ids = tiny_llm.tokenize(text)
    ours = method.pseudo_attention(text, {0, 1})
    reference, n_init = offline_attentions(tiny_llm, ids)
    for layer, attn in enumerate(reference):
        expected = attn.mean(0)[-len(ids):, n_init:n_init + 2 * TPF].mean(0)
        torch.testing.assert_close(ours[layer], expected, atol=1e-5, rtol=1e-4)


def test_a_probe_stops_after_the_last_layer_it_reads(tiny_llm):
    """The pseudo-question read in layer 0 alone runs layer 0 alone (layer 1 would compute what nobody reads):
    the same attention bit for bit, the model's layers restored afterwards, also when the forward fails."""
    method = Hermes(kv_frames=10)
    stream(tiny_llm, method, random_frames(2), 2)
    text = method.pseudo_questions()["global"]
    layers = tiny_llm.language_model.layers
    ran = []
    hook = layers[1].register_forward_pre_hook(lambda module, args: ran.append(1))
    try:
        both = method.pseudo_attention(text, {0, 1})
        assert len(ran) == 1
        first = method.pseudo_attention(text, {0})
        assert len(ran) == 1 and set(first) == {0}  # layer 1 did not run
    finally:
        hook.remove()
    assert torch.equal(first[0], both[0])
    assert tiny_llm.language_model.layers is layers and len(layers) == 2
    with pytest.raises(RuntimeError, match="planted"), tiny_llm.first_layers(1):
        assert len(tiny_llm.language_model.layers) == 1
        raise RuntimeError("planted")
    assert tiny_llm.language_model.layers is layers


def test_tier_scores_of_every_layer_at_once_are_each_layers_own():
    """The batched tier scores are, bit for bit, the release's per-layer computation (min-max of the attention
    and of the recency, weighted by the tier), and the cascade is the release's loop."""
    tiers = layer_tiers(24, 0.1, 0.3, (0.1, 0.3, 0.4))

    def min_max(x):
        return (x - x.min()) / (x.max() - x.min() + 1e-6)

    def one_layer(attention, tier):
        n = attention.numel()
        distance = (n - 1 - torch.arange(n, dtype=torch.float32)) / max(n - 1, 1)
        recency = torch.exp(-tier.recency_k * distance)
        return min_max(attention.float()) * (1 - tier.recency_weight) + min_max(recency) * tier.recency_weight

    gen = torch.Generator().manual_seed(0)
    for n in (1, 9, 3000):
        attention = torch.rand(24, n, generator=gen)
        batched = tier_scores(attention, tiers)
        assert all(torch.equal(batched[i], one_layer(attention[i], t)) for i, t in enumerate(tiers))
        expected = [row.clone() for row in batched]
        for i in range(22, -1, -1):
            expected[i] = (1 - tiers[i].gamma) * expected[i] + tiers[i].gamma * expected[i + 1]
        assert all(torch.equal(a, b) for a, b in zip(consistent_scores(list(batched), tiers), expected, strict=True))


def test_compression_recency_layers_keep_the_newest_long_layers_fold_a_summary(tiny_llm):
    """Layer 0 short-term (recency alone, gamma 0): the newest kv_size tokens; layer 1 long-term: the kv_size - 1
    most attended by the global pseudo-question, the rest folded into one token (mean value, mean key re-rotated
    to the position after the last kept one)."""
    method = Hermes(kv_frames=10, short_ratio=0.5, long_ratio=0.5, gamma_short=0.0)
    stream(tiny_llm, method, random_frames(4), 4)
    before_k, before_v = [k.clone() for k in method.keys], [v.clone() for v in method.values]
    attention = method.pseudo_attention(method.pseudo_questions()["global"], {1})[1]
    method.kv_size = 40
    method.compress()
    n_init, rope = method.n_init, tiny_llm.rope
    assert method.tokens[0][0].tolist() == list(range(64 - 40, 64))
    assert method.positions[0].tolist() == [n_init + t for t in range(24, 64)]
    kept = attention.topk(39).indices.sort().values
    assert method.tokens[1][0, :-1].tolist() == kept.tolist() and int(method.tokens[1][0, -1]) == SUMMARY_TOKEN
    at = n_init + int(kept[-1]) + 1
    assert method.positions[1].tolist() == [n_init + t for t in kept.tolist()] + [at]
    assert method.next_positions == [n_init + 64, at + 1]
    dropped = torch.ones(64, dtype=torch.bool)
    dropped[kept] = False
    torch.testing.assert_close(method.values[1][:, :, -1], before_v[1][:, :, dropped].mean(-2))
    moved = rope.rotate(before_k[1][:, :, dropped], (at - n_init - torch.arange(64)[dropped]).float())
    torch.testing.assert_close(method.keys[1][:, :, -1], moved.mean(-2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.keys[1][:, :, :-1], before_k[1][:, :, kept])
    assert all(t.shape[-1] == 40 for t in method.tokens)


def layer0_keys_at(method, full_context, n_init: int) -> None:
    """Layer 0's keys do not depend on attention: every kept video token's key is the full cache's key of that
    token re-rotated to the position the method records for it."""
    rope = method.llm.rope
    tokens, positions = method.tokens[0][0], method.positions[0]
    video = tokens >= 0
    original = full_context.keys[0][:, :, n_init + tokens[video]]
    expected = rope.rotate(original, (positions[video] - n_init - tokens[video]).float())
    torch.testing.assert_close(method.keys[0][:, :, video], expected, atol=1e-4, rtol=1e-4)


def test_layers_continue_from_their_own_positions_and_memory_is_flat(tiny_llm):
    """All layers long-term: each compression puts a summary after the last kept token, so a layer's later
    frames go after it (positions drift from the original ones, per layer); chunks do not change anything."""
    frames = random_frames(12)
    full = stream(tiny_llm, FullCache(), frames, 4).method.recall("q")
    answers = []
    for chunk in (1, 5, 12):
        method = Hermes(kv_frames=3, short_ratio=0.0, long_ratio=1.0)
        engine = stream(tiny_llm, method, frames[:8], chunk)
        bytes_at_8 = method.stats().kv_bytes
        engine.encode_until(engine_sample(frames), 8, 12, None)
        answer, context, _ = engine.answer("q")
        n_init = method.n_init
        assert method.stats().kv_bytes == bytes_at_8 and context.online_tokens == n_init + 48
        assert context.detail.compressions == 12  # after every frame: the published check counts the init prompt
        assert context.layer_positions == [int(p[-1]) + 1 for p in method.positions]
        assert context.next_position == max(context.layer_positions)
        assert any(int(p[-1]) != n_init + 12 * TPF for p in method.positions)  # drifted from the stream's
        layer0_keys_at(method, full, n_init)
        answers.append(answer.first_token_logits)
    torch.testing.assert_close(answers[0], answers[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(answers[0], answers[2], atol=1e-5, rtol=1e-5)


def engine_sample(frames):
    from conftest import ArrayFrames

    from mukv.data.types import VideoSample

    return VideoSample("v", len(frames), [], ArrayFrames(frames))


def test_positions_are_reindexed_near_the_models_maximum(tiny_llm):
    frames = random_frames(8)
    full = stream(tiny_llm, FullCache(), frames, 4).method.recall("q")
    margin = tiny_llm.config.text_config.max_position_embeddings - 80  # compact once a position passes 80
    method = Hermes(kv_frames=2, short_ratio=0.0, long_ratio=1.0, compact_margin=margin)
    stream(tiny_llm, method, frames, 2)
    n_init = method.n_init
    assert method.compactions >= 1
    for positions in method.positions:
        assert int(positions[-1]) <= 80 + TPF + 1
        assert positions.tolist() == list(range(n_init, n_init + positions.numel()))  # contiguous (summary last)
    layer0_keys_at(method, full, n_init)


def test_compaction_follows_the_exact_positions_without_reading_them_far_from_the_limit(tiny_llm):
    """Positions stay on the device; the host keeps an upper bound of each layer's next position and reads the exact
    ones only once the bound passes the limit: compaction happens exactly when a next position does, and the bound
    is never below the position (short, middle and long layers: with and without summaries)."""
    margin = tiny_llm.config.text_config.max_position_embeddings - 120
    checks = []

    class Checked(Hermes):
        def compress(self):
            exact = self.next_positions
            assert all(b >= p for b, p in zip(self.next_bound, exact, strict=True))
            before = self.compactions
            super().compress()
            checks.append((max(exact) - 1 > 120, self.compactions > before))
            assert all(b >= p for b, p in zip(self.next_bound, self.next_positions, strict=True))
            if self.compactions > before:
                assert self.next_bound == self.next_positions

    stream(tiny_llm, Checked(kv_frames=2, short_ratio=0.34, long_ratio=0.34, compact_margin=margin), random_frames(12), 3)
    assert all(expected == done for expected, done in checks) and any(done for _, done in checks)
    assert not all(done for _, done in checks)


def test_history_prompts_follow_the_engines_answers(tiny_llm):
    method = Hermes(kv_frames=10)
    engine = stream(tiny_llm, method, random_frames(2), 2)
    assert method.pseudo_questions()["local"] == method.local_prompt
    answer = engine.answer("what is red?")[0]
    assert method.last_turn == ("what is red?", answer.text)
    assert method.pseudo_questions()["local"].startswith("Find recent details related to: Question: what is red?")
    assert not dataclasses.replace(method, history_prompts=False).history_prompts
    method.history_prompts = False
    assert method.pseudo_questions()["mixed"] == f"{method.local_prompt}; {method.global_prompt}"


def test_the_answer_starts_each_layer_at_its_own_position(tiny_llm):
    """RoPE is relative: shifting layer 1's keys and its prompt position by the same amount leaves the answer
    as it was; shifting the keys alone does not."""
    engine = stream(tiny_llm, FullCache(), random_frames(3), 3)
    base = engine.answer("q")[0].first_token_logits
    context = engine.method.recall("q")
    shifted = dataclasses.replace(context, keys=[context.keys[0], tiny_llm.rope.rotate(
        context.keys[1], torch.full((context.keys[1].shape[-2],), 1000.0))])
    engine.method.recall = lambda q: dataclasses.replace(
        shifted, layer_positions=[context.next_position, context.next_position + 1000])
    torch.testing.assert_close(engine.answer("q")[0].first_token_logits, base, atol=1e-5, rtol=1e-5)
    engine.method.recall = lambda q: shifted
    assert (engine.answer("q")[0].first_token_logits - base).abs().max() > 1e-4  # 10x the tolerance above
