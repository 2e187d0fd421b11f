"""MuKV's token-importance signals and block selection (pure functions) against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mukv.cache import rerank as rr
from mukv.cache import signals


def step_keys(g: int = 64, change: int = 23, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Keys (g, d) of a sequence with one sharp change between tokens change-1 and change: flat at 0, a
    jump to 1, a short plateau, then a slow ramp back to 0 (so the circular wrap-around is smooth)."""
    x = torch.zeros(g)
    x[change:change + 8] = 1.0
    x[change + 8:] = torch.linspace(1.0, 0.0, g - change - 8)
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return x[:, None] * u[None, :]


# ------------------------------------------------------------------------------- frequency signals
def test_diff_scores_the_sharp_change_highest_and_the_first_token_zero():
    keys = step_keys()
    diff = signals.token_difference(keys)
    assert int(diff.argmax()) == 23
    assert float(diff[0]) == 0.0  # no predecessor: compared with itself
    direct = torch.stack([torch.zeros(())] + [(keys[i] - keys[i - 1]).norm() for i in range(1, 64)])
    torch.testing.assert_close(diff, direct)


def test_fft_scores_the_sharp_change_highest():
    fft = signals.fft_high_frequency(step_keys())
    assert set(fft.topk(2).indices.tolist()) == {22, 23}  # the two tokens either side of the jump


def test_fft_equals_the_published_formula_in_numpy():
    """rfft per dimension, magnitudes of the bins below max(1, bins // 2) zeroed, inverse with the original
    phase (magnitude * exp(i * angle)), absolute value averaged over dimensions."""
    keys = torch.randn(2, 3, 37, 5, generator=torch.Generator().manual_seed(1))  # batched blocks, odd g
    got = signals.fft_high_frequency(keys)
    for idx in np.ndindex(2, 3):
        k = keys[idx].numpy().astype(np.float64).T  # (d, g)
        spec = np.fft.rfft(k, axis=-1)
        mag = np.abs(spec)
        start = max(1, mag.shape[-1] // 2)
        mag[:, :start] = 0
        high = np.fft.irfft(mag * np.exp(1j * np.angle(spec)), n=k.shape[-1], axis=-1)
        np.testing.assert_allclose(got[idx].numpy(), np.abs(high).mean(axis=0), rtol=1e-4, atol=1e-5)


def test_spectral_entropy_is_one_value_per_block_and_normalises_to_zero():
    keys = torch.randn(3, 20, 6, generator=torch.Generator().manual_seed(2))
    ent = signals.spectral_entropy(keys)
    assert ent.shape == (3, 20)
    assert torch.all(ent == ent[:, :1])
    assert not torch.allclose(ent[0, 0], ent[1, 0])
    power = torch.fft.rfft(keys[0], dim=0).abs() ** 2
    p = power / power.sum(0, keepdim=True)
    torch.testing.assert_close(ent[0, 0], -(p * torch.log(p + 1e-10)).sum(0).mean(), rtol=1e-4, atol=1e-5)
    assert torch.all(signals.frequency_signal(keys, "spectral_entropy") == 0)


def test_minmax_normalises_and_guards_constant_input():
    x = torch.tensor([[2.0, 4.0, 3.0], [5.0, 5.0, 5.0]])
    torch.testing.assert_close(signals.minmax(x), torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------- attention signal
def test_attention_received_equals_a_direct_computation():
    torch.manual_seed(3)
    probs = torch.randn(2, 3, 5, 8).softmax(-1)  # (B, H, Lq, Lk)
    n_prefix = 3
    got = signals.attention_received(probs, n_prefix)
    direct = torch.tensor([sum(float(probs[b, h, q, j]) for b in range(2) for h in range(3) for q in range(5)) / 6
                           for j in range(n_prefix, 8)])
    torch.testing.assert_close(got, direct)
    per_block = signals.attention_received(probs, n_prefix, per_block=True)
    for b in range(2):
        torch.testing.assert_close(per_block[b], signals.attention_received(probs[b:b + 1], n_prefix))
    norm = signals.attention_signal([(got, 1.0)])
    assert float(norm.min()) == 0.0 and float(norm.max()) == 1.0
    assert int(norm.argmax()) == int(direct.argmax())


@pytest.mark.parametrize("strategy,layers,expected", [
    ("last", 24, [(23, 1.0)]), ("second_last", 24, [(22, 1.0)]), ("middle", 24, [(12, 1.0)]),
    ("last_5", 24, [(19, 0.1), (20, 0.15), (21, 0.2), (22, 0.25), (23, 0.3)]),
    ("last_5", 2, [(0, 0.25), (1, 0.3)]), ("second_last", 1, [(0, 1.0)]),
])
def test_attention_layer_strategies(strategy, layers, expected):
    assert signals.attention_layers(strategy, layers) == expected


def test_last_5_weighted_sum_then_normalised():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(signals.attention_signal([(a, 0.25), (b, 0.3)]), torch.tensor([0.25 / 0.3, 0.0, 1.0]))


# ----------------------------------------------------------------------- combination and selection
def test_scores_combine_alpha_weighted_and_methods_use_one_signal():
    torch.manual_seed(4)
    received = [(torch.rand(2, 10), 1.0)]
    keys = torch.randn(2, 10, 4)
    att, freq = signals.attention_signal(received), signals.frequency_signal(keys, "fft")
    torch.testing.assert_close(signals.token_scores(received, keys, 0.7, "attention_fft_weighted", "fft"),
                               0.7 * att + 0.3 * freq)
    torch.testing.assert_close(signals.token_scores(received, None, 0.7, "attention_only", "fft"), att)
    torch.testing.assert_close(signals.token_scores(None, keys, 0.7, "fft_only", "fft"), freq)


def test_select_top_is_the_top_set_in_position_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.5], [0.7, 0.1, 0.2, 0.0, 0.9]])
    assert signals.select_top(scores, 3).tolist() == [[1, 3, 4], [0, 2, 4]]
    assert signals.keep_count(784, 0.8) == 627 and signals.keep_count(196, 0.1) == 19
    assert signals.keep_count(49, 0.1) == 4


def test_dedup_drops_a_near_identical_lower_scored_token():
    keys = torch.eye(10)
    keys[7] = keys[2] + 0.01  # token 7 duplicates token 2
    scores = torch.linspace(1.0, 0.1, 10)  # token 0 best
    scores[7] = 0.95  # a high-scoring duplicate of token 2
    plain = signals.select_top(scores, 5)
    dedup = signals.select_with_dedup(scores, keys, 5, 0.9)
    assert 7 in plain.tolist() and 2 in plain.tolist()
    assert 7 in dedup.tolist() and 2 not in dedup.tolist()  # the better-scored of the pair survives
    assert dedup.tolist() == sorted(dedup.tolist()) and len(dedup) == 5
    # nothing similar: the same tokens as without de-duplication
    torch.testing.assert_close(signals.select_with_dedup(scores, torch.eye(10), 5, 0.9), plain)


# ------------------------------------------------------------------------------------------ rerank
def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def direct_rerank(query, reprs, top_k, alpha, beta, top_n, reverse=False):
    """The published two-stage selection written with Python lists and numpy (``reverse``: the published
    ``rerank_reverse``, each reranked candidate list reversed before the cut)."""
    q = query.double().numpy()
    cands = []
    for r, k in zip(reprs, top_k, strict=True):
        sims = [(_cos(q, v.double().numpy()), i) for i, v in enumerate(r)]
        sims.sort(key=lambda x: -x[0])
        cands.append(sims[:2 * k])
    fine, medium, coarse = cands
    ctx = np.mean([reprs[2][i].double().numpy() for _, i in coarse[:top_n]], axis=0)
    out = []
    for (cand, w, r, k) in ((fine, beta, reprs[0], top_k[0]), (medium, alpha, reprs[1], top_k[1])):
        scored = [((1 - w) * s + w * _cos(r[i].double().numpy(), ctx), i) for s, i in cand]
        scored.sort(key=lambda x: -x[0])
        out.append((scored[::-1] if reverse else scored)[:k])
    out.append((coarse[::-1] if reverse else coarse)[:top_k[2]])
    return out


def test_rerank_equals_a_direct_computation():
    g = torch.Generator().manual_seed(5)
    query = torch.randn(12, generator=g)
    reprs = [torch.randn(n, 12, generator=g) for n in (30, 15, 9)]
    top_k = [4, 3, 2]
    got = rr.select_blocks(query, reprs, top_k, rerank=True, alpha=0.3, beta=0.6, top_n=3)
    ref = direct_rerank(query, reprs, top_k, 0.3, 0.6, 3)
    for sel, r in zip(got, ref, strict=True):
        assert sel.indices.tolist() == [i for _, i in r]
        np.testing.assert_allclose(sel.scores.numpy(), [s for s, _ in r], rtol=1e-5, atol=1e-6)
    # the rerank changes the choice here (so this comparison can tell the two apart)
    plain = rr.select_blocks(query, reprs, top_k, rerank=False)
    assert [s.indices.tolist() for s in plain] != [s.indices.tolist() for s in got]
    assert plain[2].indices.tolist() == got[2].indices.tolist()  # segments keep their stage-1 choice


def test_rerank_without_coarse_blocks_uses_the_query_as_context():
    g = torch.Generator().manual_seed(6)
    query = torch.randn(8, generator=g)
    reprs = [torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g), torch.zeros(0, 8)]
    got = rr.select_blocks(query, reprs, [2, 2, 1], alpha=0.5, beta=0.5)
    sims = rr.cosine(query, reprs[1])  # context = query: score = 0.5 sim + 0.5 sim = sim
    assert got[1].indices.tolist() == sims.topk(2).indices.tolist()
    assert got[2].indices.numel() == 0
    assert math.isclose(float(got[1].scores[0]), float(sims.max()), rel_tol=1e-5)


def pairwise_dedup(scores, keys, k, threshold):
    """The published pairwise loop, literally (candidates best first; the better of a similar pair stays)."""
    n_cand = min(int(k * 1.2), len(scores))
    cand = scores.topk(n_cand).indices.tolist()
    if n_cand <= k:
        return sorted(cand[:k])
    v = keys[cand] / keys[cand].norm(dim=1, keepdim=True)
    sim = v @ v.T
    keep = [True] * n_cand
    for i in range(n_cand):
        if not keep[i]:
            continue
        for j in range(i + 1, n_cand):
            if sim[i, j] > threshold:
                if scores[cand[i]] < scores[cand[j]]:
                    keep[i] = False
                    break
                keep[j] = False
    kept = [c for c, m in zip(cand, keep, strict=True) if m]
    if len(kept) > k:
        kept = sorted(kept, key=lambda c: -float(scores[c]))[:k]
    return sorted(kept)


@pytest.mark.parametrize("seed", range(4))
def test_dedup_equals_the_published_pairwise_loop(seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(60, 3, generator=g)  # 3 dimensions: many pairs above 0.9 cosine
    scores = torch.rand(60, generator=g)
    got = signals.select_with_dedup(scores, keys, 20, 0.9).tolist()
    assert got == pairwise_dedup(scores, keys, 20, 0.9)
    assert len(got) < 20  # de-duplication removed tokens here


def test_tied_scores_select_the_published_candidates():
    """Published: ``topk(min(int(1.2 k), g))[:k]``; among ties torch's topk returns other indices for another
    k, so this is not ``topk(k)`` (49 tied scores, k = 20)."""
    tied = torch.zeros(2, 49)
    got = signals.select_top(tied, 20)
    published = tied[0].topk(24).indices[:20].sort().values
    assert got[0].tolist() == got[1].tolist() == published.tolist()
    assert published.tolist() != tied[0].topk(20).indices.sort().values.tolist()


def test_rerank_reverse_takes_the_reranked_candidates_worst_first():
    """The published ``rerank_reverse``: each granularity's reranked candidate list (2 x top_k) reversed,
    then cut to top_k; segments by their stage-1 scores."""
    g = torch.Generator().manual_seed(5)
    query = torch.randn(12, generator=g)
    reprs = [torch.randn(n, 12, generator=g) for n in (30, 15, 9)]
    top_k = [4, 3, 2]
    got = rr.select_blocks(query, reprs, top_k, rerank=True, alpha=0.3, beta=0.6, top_n=3, reverse=True)
    ref = direct_rerank(query, reprs, top_k, 0.3, 0.6, 3, reverse=True)
    for sel, r in zip(got, ref, strict=True):
        assert sel.indices.tolist() == [i for _, i in r]
        np.testing.assert_allclose(sel.scores.numpy(), [s for s, _ in r], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs rerank"):
        rr.select_blocks(query, reprs, top_k, rerank=False, reverse=True)
