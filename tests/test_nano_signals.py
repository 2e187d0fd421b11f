"""The training signals of mukv_nano: each one's targets are what its docstring says, its loss is learned
in a few steps, the loop adds exactly weight x term for each enabled signal, and ``until`` releases it."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mukv.cache.kernels import attention_weights
from mukv.data.synthetic import (
    COLOUR_NAMES,
    DIRECTIONS,
    GRID,
    MOTION_SHAPE,
    NEEDLE_SHAPES,
    QUESTION_TYPES,
    SHAPES,
    TRAIN_SEED_BASE,
)
from mukv.models import attention_hook
from mukv.models.adapter import DEFAULT_INIT_PROMPT
from mukv.models.nano import build_nano, build_word_tokenizer, cell_words
from mukv.models.rope import RotaryTable
from mukv_nano.curriculum import Curriculum
from mukv_nano.examples import TOKENS_PER_FRAME, make_example
from mukv_nano.forward import (
    AttentionTargets,
    Batch,
    CountTargets,
    EncodingTargets,
    QuestionBatch,
    answer_attention,
    answer_positions,
    encoding_log_prob,
    pixels_of,
    visual_tokens,
)
from mukv_nano.layouts import LAYOUTS, build_layout
from mukv_nano.probes import earlier_needle_targets, previous_ball_targets
from mukv_nano.recipe import SIGNALS, NetConfig
from mukv_nano.signals import SignalConfig, answer_word_separation, attention_targets, count_targets
from mukv_nano.train import batch_loss


def make_signal(name: str, model, tokenizer, cell_words: bool = False, **knobs):
    """The signal ``name`` with its config's defaults but ``knobs``."""
    cls = SIGNALS[name]
    return cls(cls.Config(**knobs), model, tokenizer, NetConfig(cell_words=cell_words))


def _setup(with_cell_words: bool = False):
    model, tok = build_nano(seed=0, with_cell_words=with_cell_words)
    model.model.language_model.config._attn_implementation = attention_hook.register()
    model.train()
    rope = RotaryTable(model.model.language_model.rotary_emb.inv_freq)
    return model, tok, rope, tok(DEFAULT_INIT_PROMPT, add_special_tokens=False).input_ids


def _signal_steps(model, signal, weight, rope, tok, init, examples, part: str, steps: int) -> list[float]:
    """``steps`` AdamW steps on ``examples`` (full layout) with one signal; the value of its term ``part``."""
    opt = torch.optim.AdamW(list(model.parameters()) + list(signal.parameters()), lr=3e-3)
    values = []
    for _ in range(steps):
        parts: dict[str, float] = {}
        loss, _ = batch_loss(model, rope, tok, init, examples, "full", random.Random(0), [(signal, weight)], parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(parts[part])
    return values


# ------------------------------------------------------------------------------------ the interface
def test_every_signal_has_its_own_config_with_weight_and_until():
    """One config dataclass per signal (``weight``, ``until`` and its own knobs), and no knob twice."""
    assert list(SIGNALS) == ["probe", "attend", "count", "motion", "order", "parse", "count_probe", "separate"]
    for name, cls in SIGNALS.items():
        assert cls.name == name and issubclass(cls.Config, SignalConfig) and cls.Config is not SignalConfig
        knobs = {f.name for f in dataclasses.fields(cls.Config)}
        assert {"weight", "until"} <= knobs, name
        assert cls.Config().weight > 0, name  # every signal is in the recipe
    assert len({cls.Config for cls in SIGNALS.values()}) == len(SIGNALS)


def test_the_loss_is_the_answer_loss_plus_each_enabled_signal_times_its_weight():
    """``batch_loss`` adds weight x term for every signal it is given (and records each term), under every
    layout; signals that supervise inside a causal encoding add nothing under the others."""
    model, tok, rope, init = _setup(with_cell_words=True)
    examples = [make_example(TRAIN_SEED_BASE + 70 + i, 6, 0.5, 4.0, questions=8) for i in range(2)]
    signals = [make_signal(name, model, tok, cell_words=True) for name in SIGNALS]
    weights = [0.5, 1.5, 0.25, 2.0, 0.75, 1.25, 0.3, 3.0]
    owner = {"probe": "probe", "attend": "attend", "count": "count", "motion": "motion", "previous_ball": "motion",
             "order": "order", "earlier_needle": "order", "parse": "parse", "parse_attend": "parse",
             "count_probe": "count_probe", "separate": "separate"}
    weight_of = {s.name: w for s, w in zip(signals, weights, strict=True)}
    with torch.no_grad():
        for name in LAYOUTS:
            base, _ = batch_loss(model, rope, tok, init, examples, name, random.Random(5))
            parts: dict[str, float] = {}
            total, _ = batch_loss(model, rope, tok, init, examples, name, random.Random(5),
                                  list(zip(signals, weights, strict=True)), parts)
            causal = name in ("full", "uniform", "rekv")
            assert ({"motion", "order"} <= set(parts)) == causal and "probe" in parts and "separate" in parts
            want = float(base) + sum(weight_of[owner[k]] * v for k, v in parts.items())
            assert float(total) == pytest.approx(want, rel=1e-5), name


def test_until_releases_a_signal_and_the_cell_probe_drops_after_the_ramp():
    """``until``: the weight holds before that fraction of the schedule and is 0 from it on (null: never
    released); the cell probe's weight falls to ``late_factor`` of it from ``curriculum.ramp_end``."""
    model, tok = build_nano(seed=0)
    curriculum = Curriculum()
    attend = make_signal("attend", model, tok, weight=0.7, until=0.5)
    assert attend.weight_at(0.2, curriculum) == 0.7 and attend.weight_at(0.5, curriculum) == 0.0
    assert make_signal("attend", model, tok, weight=0.7, until=1.0).weight_at(0.99, curriculum) == 0.7
    order = make_signal("order", model, tok, weight=0.4, until=0.5)
    assert order.weight_at(0.49, curriculum) == 0.4 and order.weight_at(0.5, curriculum) == 0.0
    count = make_signal("count", model, tok)
    assert count.cfg.until is None and count.weight_at(1.0, curriculum) == count.cfg.weight  # to the last step
    probe = make_signal("probe", model, tok, weight=0.5)
    assert probe.weight_at(curriculum.ramp_end - 1e-9, curriculum) == 0.5
    assert probe.weight_at(curriculum.ramp_end, curriculum) == 0.5 * probe.cfg.late_factor
    assert probe.weight_at(0.9, Curriculum(ramp_end=0.95)) == 0.5


# --------------------------------------------------------------------------------- attention targets
def test_count_supervision_is_learned():
    """`signals.count`: a few steps with the count head's cross-entropy bring its attention towards the
    rings + init prompt."""
    model, tok, rope, init = _setup()
    examples = [make_example(TRAIN_SEED_BASE + i, 6, 0.5, 8.0, types=("count",), questions=1) for i in range(4)]
    ce = _signal_steps(model, make_signal("count", model, tok, layer=1, head=3), 5.0, rope, tok, init, examples,
                       "count", 6)
    assert ce[-1] < 0.8 * ce[0], ce


@pytest.mark.parametrize("layout_name", ["full", "uniform", "window", "rekv", "mukv"])
def test_attention_targets_mark_each_questions_evidence(layout_name):
    """`signals.attend`: the supervised context entries of a question are its evidence, under every layout
    (``uniform`` drops and renumbers frames): the needle of a detail question (its colour), the asked cell in
    the last frame for current (its shape), the four ball tokens of a motion run."""
    n_init, n_frames = 5, 12
    examples = [make_example(TRAIN_SEED_BASE + 40 + i, n_frames, 0.5, 4.0, questions=12) for i in range(4)]
    layout, kept = build_layout(layout_name, examples, n_init, n_frames, random.Random(3))
    if kept is not None:
        examples = [ex.keep_frames(k) for ex, k in zip(examples, kept, strict=True)]
    tok = build_word_tokenizer()
    qb = QuestionBatch(tok, examples)
    targets = attention_targets(layout, examples, qb, n_init, (0,))
    seen = set()
    for i, ex in enumerate(examples):
        for j, q in enumerate(ex.questions):
            video = (layout.ctx_idx[i][targets.target[i, j]] - n_init).tolist()
            frame, cell = np.divmod(np.array(video, dtype=int), TOKENS_PER_FRAME)
            if q.qtype in ("count", "order") or (layout_name == "window" and not video):
                assert not video or q.qtype not in ("count", "order")
                continue
            seen.add(q.qtype)
            if q.qtype == "detail":
                assert len(video) == 1 and COLOUR_NAMES[ex.cell_colour[frame[0], cell[0]]] == q.answer
            elif q.qtype == "current":
                assert len(video) == 1 and frame[0] == len(ex.frames) - 1
                assert SHAPES[ex.cell_shape[frame[0], cell[0]]] == q.answer
            else:
                # a window may hold only the end of the run
                assert (len(video) == 4 or layout_name == "window") and all(SHAPES[ex.cell_shape[f, c]] == MOTION_SHAPE
                                                                            for f, c in zip(frame, cell, strict=True))
    assert seen == {"detail", "current", "motion"} or layout_name == "window"


def test_attention_targets_supervise_only_the_chosen_types():
    """`signals.attend.types`: questions of other types get no target (the recipe supervises "current" only)."""
    examples = [make_example(TRAIN_SEED_BASE + 40 + i, 8, 0.5, 4.0, questions=12) for i in range(3)]
    layout, _ = build_layout("full", examples, 5, 8, random.Random(0))
    qb = QuestionBatch(build_word_tokenizer(), examples)
    every = attention_targets(layout, examples, qb, 5, (0,))
    current = attention_targets(layout, examples, qb, 5, (0,), "mean", ("current",))
    assert current.head == "mean"
    for i, ex in enumerate(examples):
        for j, q in enumerate(ex.questions):
            assert torch.equal(current.target[i, j], every.target[i, j] if q.qtype == "current"
                               else torch.zeros_like(every.target[i, j]))
    assert current.target.any() and (every.target.sum() > current.target.sum())
    model, tok = build_nano(seed=0)
    signal = make_signal("attend", model, tok)  # the recipe's knobs reach the targets
    (made,) = signal.targets(Batch(examples, qb, layout, n_init=5))
    assert made.layers == (2, 3) and made.head == "mean" and torch.equal(made.target, current.target)


def test_evidence_log_mass_is_the_attention_on_the_evidence():
    """The supervised quantity is the softmax attention mass each head puts on the evidence, from the
    answer position, over exactly the keys that position may see; `signals.attend.head` picks the best head,
    the heads' mean mass, or one head."""

    def _evidence_log_mass(qq, keys, mask, scaling, t, q_len):
        t.record(*answer_attention(qq, keys, mask, scaling, t.answer_pos, q_len), q_len)
        return t.log_mass[-1]

    torch.manual_seed(0)
    b, h, hk, d, n_q, q_len, c = 2, 4, 2, 8, 3, 5, 7
    qq = torch.randn(b, h, n_q * q_len, d)
    keys = torch.randn(b, hk, c + n_q * q_len, d)
    j = torch.arange(n_q * q_len)
    own = ((j[:, None] // q_len) == (j[None, :] // q_len)) & (j[None, :] <= j[:, None])
    valid = torch.rand(b, c) > 0.2
    mask = torch.cat((valid[:, None, :].expand(b, n_q * q_len, c), own.expand(b, -1, -1)), dim=-1)
    answer_pos = torch.tensor([[2, 4, 1], [3, 0, -1]])
    target = (torch.rand(b, n_q, c) > 0.6) & valid[:, None]
    target[0, 0] = False
    target[0, 0, int(valid[0].nonzero()[0])] = True
    got = _evidence_log_mass(qq, keys, mask, 0.3, AttentionTargets((0,), answer_pos, target), q_len)
    p = attention_weights(qq, keys, 0.3, mask[:, None])
    want = torch.zeros(b, h, n_q)
    for i in range(b):
        for q in range(n_q):
            if answer_pos[i, q] < 0 or not target[i, q].any():
                continue
            row = q * q_len + int(answer_pos[i, q])
            want[i, :, q] = p[i, :, row, :c][:, target[i, q]].sum(-1).log()
            assert torch.allclose(got[i, :, q], want[i, :, q], atol=1e-5), (i, q)
    supervised = target.any(-1) & (answer_pos >= 0)
    for head, reduce in (("best", lambda m: m.amax(1)), ("mean", lambda m: m.exp().mean(1).log()), ("2", lambda m: m[:, 2])):
        t = AttentionTargets((0,), answer_pos, target, head, log_mass=[got])
        assert torch.allclose(t.loss(), -reduce(want)[supervised].mean(), atol=1e-5), head
    assert AttentionTargets((0,), answer_pos, target, "best", log_mass=[got]).loss() <= AttentionTargets(
        (0,), answer_pos, target, "mean", log_mass=[got]).loss()
    # targets among each question's own tokens (the cell words the asked-cell probe reads): only keys the
    # answer position may see count, and a question with no context target is supervised through them
    own_target = torch.rand(b, n_q, q_len) > 0.5
    t = AttentionTargets((0,), answer_pos, torch.zeros_like(target), "best", own_target)
    got = _evidence_log_mass(qq, keys, mask, 0.3, t, q_len)
    for i in range(b):
        for q in range(n_q):
            row = q * q_len + int(answer_pos[i, q])
            seen = own_target[i, q] & (torch.arange(q_len) <= int(answer_pos[i, q]))
            if answer_pos[i, q] < 0 or not seen.any():
                continue
            want = p[i, :, row, c + q * q_len: c + (q + 1) * q_len][:, seen].sum(-1).log()
            assert torch.allclose(got[i, :, q], want, atol=1e-5), (i, q)


def test_count_targets_spread_over_the_rings_in_context_and_the_sink():
    """`signals.count`: at a "count" answer the supervised head's target is uniform over the rings the layout
    keeps and the init prompt's n tokens, so that k rings give it k / (k + n) of the mass; the recorded loss
    is the cross-entropy of that head's attention to it."""
    _, tok = build_nano(0)
    n_init = 3
    exs = [make_example(TRAIN_SEED_BASE + s, 16, 0.5, 4.0, types=("count", "detail"), questions=2) for s in range(6)]
    counts = [int(next(q for q in ex.questions if q.qtype == "count").answer) for ex in exs]
    assert [len(ex.ring_tokens) for ex in exs] == counts and max(counts) > 0
    qb = QuestionBatch(tok, exs)
    for name in ("full", "uniform", "rekv", "window"):
        layout, kept = build_layout(name, exs, n_init, 16, random.Random(1))
        seen = exs if kept is None else [ex.keep_frames(k) for ex, k in zip(exs, kept, strict=True)]
        t = count_targets(layout, seen, qb, n_init, 1, 0)
        for i, ex in enumerate(exs):
            # the original video token behind each context entry (None: the init prompt or padding)
            frames = kept[i] if kept is not None else list(range(16))
            original = [None if not v or x < n_init else frames[(x - n_init) // TOKENS_PER_FRAME] * TOKENS_PER_FRAME
                        + (x - n_init) % TOKENS_PER_FRAME for x, v in zip(layout.ctx_idx[i].tolist(),
                                                                         layout.ctx_valid[i].tolist(), strict=True)]
            want = list(range(n_init)) + [k for k, o in enumerate(original) if o in ex.ring_tokens]
            for j, q in enumerate(ex.questions):
                row = t.target[i, j]
                if q.qtype != "count":
                    assert not row.any()
                    continue
                assert (row > 0).nonzero().flatten().tolist() == want, (name, i)
                assert bool(layout.ctx_valid[i, :n_init].all()) and layout.ctx_idx[i, :n_init].tolist() == list(range(n_init))
                assert torch.allclose(row[want], torch.full((len(want),), 1 / len(want)))
            if name == "full":
                assert len(want) == len(ex.ring_tokens) + n_init
    # the loss: cross-entropy of one head's attention at the answer position to the target
    torch.manual_seed(0)
    b, h, d, n_q, q_len, c = 2, 4, 8, 2, 5, 6
    qq, keys = torch.randn(b, h, n_q * q_len, d), torch.randn(b, 2, c + n_q * q_len, d)
    j = torch.arange(n_q * q_len)
    own = ((j[:, None] // q_len) == (j[None, :] // q_len)) & (j[None, :] <= j[:, None])
    mask = torch.cat((torch.ones(b, n_q * q_len, c, dtype=torch.bool), own.expand(b, -1, -1)), dim=-1)
    answer_pos = torch.tensor([[1, 3], [2, -1]])
    target = torch.zeros(b, n_q, c)
    target[0, 1, [0, 2, 5]] = 1 / 3
    target[1, 0, [0]] = 1.0
    t = CountTargets(1, 2, answer_pos, target)
    t.record(*answer_attention(qq, keys, mask, 0.3, answer_pos, q_len), q_len)
    p = attention_weights(qq, keys, 0.3, mask[:, None])
    want = [-(p[0, 2, q_len + 3, [0, 2, 5]].log().mean()), -p[1, 2, 2, 0].log()]
    assert torch.allclose(t.loss(), torch.stack(want).mean(), atol=1e-5)
    assert CountTargets(1, 2, answer_pos, torch.zeros(b, n_q, c)).loss() is None


def test_encoding_supervision_can_be_kept_to_chosen_heads():
    """`signals.order.attend_heads` / `signals.motion.attend_heads`: the encoding pattern is scored on those
    heads only (the best of them), so two patterns can be given separate heads of one layer."""
    torch.manual_seed(0)
    d, n = 16, 6
    rope = RotaryTable(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    qe, ke = torch.randn(1, 4, n, d), torch.randn(1, 2, n, d)
    rows, keys, valid = torch.tensor([[3, 5]]), torch.tensor([[1, 2]]), torch.tensor([[True, True]])
    mass: list = []
    every = encoding_log_prob(qe, ke, 0.25, EncodingTargets((0,), rows, keys, valid, head_mass=mass), rope)
    per_head = mass[0]  # (H,) the mean attention of each head on the pairs
    for heads in ((0,), (2, 3), (1, 3)):
        got = encoding_log_prob(qe, ke, 0.25, EncodingTargets((0,), rows, keys, valid, heads=heads), rope)
        single = [encoding_log_prob(qe, ke, 0.25, EncodingTargets((0,), rows, keys, valid, heads=(h,)), rope)
                  for h in heads]
        torch.testing.assert_close(got, torch.stack(single).amax(0))
        assert (got <= every + 1e-6).all()
    assert per_head.shape == (4,)
    best = int(per_head.argmax())
    others = tuple(h for h in range(4) if h != best)
    assert not torch.allclose(encoding_log_prob(qe, ke, 0.25, EncodingTargets((0,), rows, keys, valid, heads=others),
                                                rope), every)  # leaving out the best head changes the score
    model, tok = build_nano(seed=0)
    examples = [make_example(TRAIN_SEED_BASE + 40 + i, 16, 0.5, 8.0, types=("order", "motion"), questions=2)
                for i in range(2)]
    batch = Batch(examples, QuestionBatch(tok, examples), n_init=5)
    (order,) = make_signal("order", model, tok, attend_heads=[0, 1]).targets(batch)
    (motion,) = make_signal("motion", model, tok, attend_heads=[2, 3]).targets(batch)
    assert order.heads == (0, 1) and motion.heads == (2, 3) and order.layers == motion.layers == (0, 1)
    assert make_signal("order", model, tok, attend_layers=[]).targets(batch) == ()  # [] off


# ------------------------------------------------------------------------------------------ probes
def _train_probe(model, probe, pixels, examples, opt, steps: int) -> None:
    """``steps`` optimiser steps on the probe loss alone (vision tower, projector and probe)."""
    for _ in range(steps):
        loss = probe.probe_loss(visual_tokens(model, pixels), examples)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_cell_probe_puts_the_cell_into_the_visual_tokens():
    """`signals.probe.cells`: a few steps of the probe loss alone make each visual token say which cell it is
    (chance 1/16; a recipe without it left a fresh linear probe at about 11%)."""
    model, tok = build_nano(seed=0)
    torch.manual_seed(0)
    examples = [make_example(TRAIN_SEED_BASE + i, 3, 0.5, 8.0) for i in range(4)]
    pixels = pixels_of(np.concatenate([ex.frames for ex in examples]))
    probe = make_signal("probe", model, tok, words=False, cells=True)
    assert make_signal("probe", model, tok, words=False, cells=False).cell is None  # only when asked
    opt = torch.optim.AdamW(list(model.parameters()) + list(probe.parameters()), lr=3e-3)
    target = torch.arange(16).repeat(len(pixels))

    def cell_accuracy() -> float:
        with torch.no_grad():
            vis = visual_tokens(model, pixels).reshape(-1, model.config.text_config.hidden_size)
            return float((probe.cell(vis).argmax(-1) == target).float().mean())

    before = cell_accuracy()
    _train_probe(model, probe, pixels, examples, opt, 200)
    assert before < 0.25 and cell_accuracy() > 0.8


def test_word_probe_grounds_the_answer_words_in_what_they_name():
    """`signals.probe.words`: the probe scores each visual token's shape and colour by its cosine to the
    language model's own embeddings of the shape and colour names, and its row and column through the digit
    words (here; the recipe's cell words, `net.cell_words`, take longer to separate the shapes). A few steps
    of that loss alone give every shape word an embedding that picks out its own tokens (the trap it guards
    against: answer words the model cannot yet tell apart drifting to cosine 0.99)."""
    model, tokenizer = build_nano(seed=0)
    torch.manual_seed(0)
    examples = [make_example(TRAIN_SEED_BASE + i, 3, 0.5, 8.0) for i in range(6)]
    pixels = pixels_of(np.concatenate([ex.frames for ex in examples]))
    probe = make_signal("probe", model, tokenizer, cell_words=False, words=True, cells=True)
    embeddings = model.get_input_embeddings().weight
    assert all(p is not embeddings for p in probe.parameters())  # the model owns the words; no copy to train
    shape_ids = tokenizer.convert_tokens_to_ids(list(SHAPES))
    assert len(set(shape_ids)) == len(SHAPES) and len(set(tokenizer.convert_tokens_to_ids(list(COLOUR_NAMES)))) == 6
    shapes = torch.from_numpy(np.concatenate([ex.cell_shape for ex in examples]).reshape(-1))
    drawn = shapes < len(SHAPES)

    def shape_accuracy() -> float:
        """Each drawn token's nearest shape word (cosine), against the shape it shows."""
        with torch.no_grad():
            vis = visual_tokens(model, pixels).reshape(-1, embeddings.shape[1])[drawn]
            sim = F.normalize(vis, dim=-1) @ F.normalize(embeddings[shape_ids], dim=-1).T
            return float((sim.argmax(-1) == shapes[drawn]).float().mean())

    before = shape_accuracy()
    opt = torch.optim.AdamW(list(model.parameters()) + list(probe.parameters()), lr=3e-3)
    _train_probe(model, probe, pixels, examples, opt, 150)
    assert before < 0.5 and shape_accuracy() > 0.9


def test_motion_probe_reads_the_ball_after_its_first_frame():
    """`signals.motion`: the direction probe is trained at the ball tokens of frames 2-4 of a run (the first
    cannot know where the ball goes), labelled with the run's direction; `attend_layers` pairs each of them
    with the ball of the frame before."""
    model, tokenizer = build_nano(seed=0)
    probe = make_signal("motion", model, tokenizer, weight=1.0, layer=1, words=False)
    assert probe.causal_only and probe.reads_hidden
    examples = [make_example(TRAIN_SEED_BASE + 60 + i, 8, 0.5, 4.0, types=("motion",)) for i in range(3)]
    n_init, d = 4, model.config.text_config.hidden_size
    hidden = torch.zeros(3, n_init + 8 * TOKENS_PER_FRAME, d)
    rows, keys, valid = previous_ball_targets(examples, n_init)
    assert valid.sum() == 9
    for i, ex in enumerate(examples):
        (q,) = ex.questions
        run = [n_init + f * TOKENS_PER_FRAME + c for f, c in zip(q.meta["run_frames"], q.meta["run_cells"], strict=True)]
        assert all(SHAPES[ex.cell_shape[(t - n_init) // 16, (t - n_init) % 16]] == MOTION_SHAPE for t in run)
        assert rows[i][valid[i]].tolist() == run[1:] and keys[i][valid[i]].tolist() == run[:-1]
        # the right direction at frames 2-4, a wrong one at the first frame
        for k, t in enumerate(run):
            hidden[i, t, (DIRECTIONS.index(q.answer) + (0 if k else 1)) % 4] = 1.0
    with torch.no_grad():
        probe.head.weight.zero_()
        probe.head.bias.zero_()
        probe.head.weight[:, :4] = 100.0 * torch.eye(4)
    batch = Batch(examples, QuestionBatch(tokenizer, examples), n_init=n_init, hidden=(None, hidden))
    terms = probe.loss(batch, probe.targets(batch))
    assert set(terms) == {"motion", "previous_ball"} and float(terms["motion"].detach()) < 1e-3


def test_motion_probe_scores_against_the_direction_words():
    """`signals.motion.words`: the probe's class scores are dot products with the direction words' embeddings,
    so its gradient reaches those words (and moving a word moves its score)."""
    model, tokenizer = build_nano(seed=0)
    probe = make_signal("motion", model, tokenizer, weight=1.0, words=True)
    ids = tokenizer.convert_tokens_to_ids(list(DIRECTIONS))
    h = torch.randn(5, model.config.text_config.hidden_size)
    words = model.get_input_embeddings().weight
    z = probe.head(torch.nn.functional.layer_norm(h, h.shape[-1:]))
    assert torch.allclose(probe.logits(h), z @ words[ids].T, atol=1e-5)
    probe.logits(h)[:, 3].sum().backward()
    assert words.grad[ids[3]].abs().sum() > 0 and words.grad[ids[0]].abs().sum() == 0


def test_order_probe_labels_each_needle_with_the_needles_before_it():
    """`signals.order`: at each needle token the probe is asked, per needle shape, whether that needle was
    shown earlier (so the later needle of an order question carries the answer word); `attend_layers` pairs
    each needle token with every earlier one."""
    examples = [make_example(TRAIN_SEED_BASE + 40 + i, 16, 0.5, 8.0, types=("order", "detail"), questions=3)
                for i in range(6)]
    n_init = 5
    orders = 0
    for ex in examples:
        shapes = [shape for _, shape in ex.needle_tokens]
        assert len(set(shapes)) == len(shapes) and set(shapes) <= set(NEEDLE_SHAPES)
        where = {shape: t for t, shape in ex.needle_tokens}
        for q in ex.questions:
            if q.qtype == "order":
                orders += 1
                first, second = q.answer, q.meta["second_shape"]
                assert where[first] // TOKENS_PER_FRAME == q.meta["first_frame"] < where[second] // TOKENS_PER_FRAME
    assert orders >= 4
    rows, keys, valid = earlier_needle_targets(examples, n_init)
    for i, ex in enumerate(examples):
        want = sorted((n_init + t, n_init + u) for t, _ in ex.needle_tokens for u, _ in ex.needle_tokens if u < t)
        assert sorted(zip(rows[i][valid[i]].tolist(), keys[i][valid[i]].tolist(), strict=True)) == want
    model, tok = build_nano(seed=0)
    probe = make_signal("order", model, tok, weight=1.0, layer=1)
    n_tok = 16 * TOKENS_PER_FRAME
    hidden = tuple(torch.randn(len(examples), n_init + n_tok, model.config.text_config.hidden_size) for _ in range(3))
    logits, labels = [], []
    for i, ex in enumerate(examples):
        for t, _ in ex.needle_tokens:
            logits.append(probe.logits(hidden[1][i, n_init + t]))
            labels.append([float(any(u < t and other == s for u, other in ex.needle_tokens)) for s in NEEDLE_SHAPES])
    want = F.binary_cross_entropy_with_logits(torch.stack(logits), torch.tensor(labels))
    batch = Batch(examples, QuestionBatch(tok, examples), n_init=n_init, hidden=hidden)
    assert torch.allclose(probe.loss(batch, ())["order"], want)
    assert 0 < sum(map(sum, labels)) < len(labels) * len(NEEDLE_SHAPES)


def test_asked_cell_probe_reads_current_answers_through_the_cell_words():
    """`signals.parse`: the probe is trained at the answer position of "current" questions only, labelled
    with the asked row and column, and scores them against the "row r" / "column c" embeddings; its attention
    targets are each current question's own "row r" and "column c" tokens."""
    model, tok = build_nano(seed=0, with_cell_words=True)
    probe = make_signal("parse", model, tok, cell_words=True, weight=1.0, layer=1)
    examples = [make_example(TRAIN_SEED_BASE + 80 + i, 4, 0.5, 4.0, types=("current", "detail"), questions=2)
                for i in range(3)]
    qb = QuestionBatch(tok, examples)
    n_context, d = 7, model.config.text_config.hidden_size
    hidden = torch.randn(3, n_context + qb.n_q * qb.q_len, d, requires_grad=True)
    layout, _ = build_layout("full", examples, n_context, 4, random.Random(0))
    batch = Batch(examples, qb, layout, n_context=n_context, hidden=(None, hidden))
    targets = probe.targets(batch)
    probe.loss(batch, targets)["parse"].backward()
    touched = {(i, t) for i, t in (hidden.grad.abs().sum(-1) > 0).nonzero().tolist()}
    want = {(i, n_context + j * qb.q_len + int(qb.answer_pos[i, j])) for i, ex in enumerate(examples)
            for j, q in enumerate(ex.questions) if q.qtype == "current"}
    assert want and touched == want
    # the class scores are the maps against the cell words' embeddings
    ids = tok.convert_tokens_to_ids(cell_words())
    h = torch.randn(2, d)
    words = model.get_input_embeddings().weight
    rows, cols = probe.logits(h)
    hn = F.layer_norm(h, (d,))
    assert torch.allclose(rows, probe.row(hn) @ words[ids[:GRID]].T, atol=1e-5)
    assert torch.allclose(cols, probe.col(hn) @ words[ids[GRID:]].T, atol=1e-5)
    # its attention targets: each current question's "row r" and "column c" tokens, nothing in the context
    (attend,) = targets
    assert attend.layers == (0, 1) and not attend.target.any()
    for i, ex in enumerate(examples):
        for j, q in enumerate(ex.questions):
            words = tok.convert_ids_to_tokens(qb.ids[i, j][attend.question_target[i, j]].tolist())
            cell = q.meta["cell"] if q.qtype == "current" else None
            assert words == ([] if cell is None else [f"row {cell // GRID + 1}", f"column {cell % GRID + 1}"])
    detail_only = [make_example(TRAIN_SEED_BASE + 90, 4, 0.5, 4.0, types=("detail",), questions=1)]
    assert probe.probe_loss((None, hidden), detail_only, QuestionBatch(tok, detail_only), n_context) is None


def test_count_probe_reads_the_count_at_count_answers_through_the_digit_words():
    """`signals.count_probe`: the readout scores the hidden state at each count answer against the digit
    words' embeddings, its target is the question's count, and a few steps lower its cross-entropy."""
    model, tok, rope, init = _setup()
    probe = make_signal("count_probe", model, tok, weight=1.0)
    assert tok.convert_ids_to_tokens(probe.digit_ids) == ["0", "1", "2", "3", "4"]
    examples = [make_example(TRAIN_SEED_BASE + 40 + i, 4, 0.5, 8.0, types=("count", "detail"), questions=2)
                for i in range(4)]
    qb = QuestionBatch(tok, examples)
    items, cols, questions = answer_positions(examples, qb, 100, "count")
    assert [q.qtype for q in questions] == ["count"] * 4 and items.tolist() == [0, 1, 2, 3]
    for i, c, q in zip(items.tolist(), cols.tolist(), questions, strict=True):
        j = examples[i].questions.index(q)
        assert c == 100 + j * qb.q_len + int(qb.answer_pos[i, j])
        assert int(qb.answer_tok[i, j]) == tok.convert_tokens_to_ids(q.answer)  # the token that answers it
    assert answer_positions(examples, qb, 100, "motion") is None
    ce = _signal_steps(model, probe, 1.0, rope, tok, init, examples, "count_probe", 6)
    assert ce[-1] < 0.7 * ce[0], ce


def test_answer_word_separation_pushes_collapsed_words_apart():
    """`signals.separate`: zero while an answer set's embeddings are below the margin, positive when two words
    collapse, and a few gradient steps on it alone bring the pair below the margin."""
    words = torch.nn.Embedding(6, 16)
    with torch.no_grad():
        words.weight.copy_(torch.eye(6, 16))
    assert float(answer_word_separation(words, [[0, 1, 2], [3, 4]], 0.2).detach()) == 0.0
    with torch.no_grad():
        words.weight[1] = words.weight[0] + 0.05 * torch.randn(16)  # "up" and "down" at cosine ~0.98
    opt = torch.optim.SGD(words.parameters(), lr=0.5)
    first = float(answer_word_separation(words, [[0, 1, 2], [3, 4]], 0.2).detach())
    assert first > 0.1
    for _ in range(50):
        opt.zero_grad()
        answer_word_separation(words, [[0, 1, 2], [3, 4]], 0.2).backward()
        opt.step()
    e = torch.nn.functional.normalize(words.weight[:2], dim=-1)
    assert float((e[0] @ e[1]).detach()) < 0.3
    model, tok = build_nano(seed=0)
    signal = make_signal("separate", model, tok)
    assert [tok.convert_ids_to_tokens(ids) for ids in signal.answer_sets][3] == list(DIRECTIONS)
    assert list(signal.parameters()) == []  # the words are the model's, trained once
    assert set(QUESTION_TYPES) >= {"count"}
