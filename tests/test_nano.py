"""The nano model as evaluation uses it: the shipped checkpoint is complete, loads and answers held-out streams,
and the engine reports which evidence each method recalled. Its training recipe (mukv_nano) is tested in
tests/test_nano_layouts.py (the layouts against the streaming methods), test_nano_signals.py and
test_nano_train.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mukv.cache import FullCache, SlidingWindowCache
from mukv.data.synthetic import CHANCE, GRID, QUESTION_TYPES, SyntheticSpec, make_synthetic_dataset
from mukv.engine import EngineSettings, StreamingEngine
from mukv.judge.exact import ExactMatchJudge
from mukv.models.loading import load_video_llm, model_geometry
from mukv.models.nano import ASSET_DIR, build_word_tokenizer

TOKENS_PER_FRAME = GRID * GRID  # one visual token per grid cell

@pytest.fixture(scope="module")
def nano():
    return load_video_llm("nano", None, device="cpu", dtype="float32")


# ------------------------------------------------------------------------------------------ checkpoint
def test_shipped_checkpoint_is_complete_and_small():
    names = {p.name for p in ASSET_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "mukv_nano.json"} <= names
    total = sum(p.stat().st_size for p in ASSET_DIR.iterdir())
    assert total < 20 * 2**20, total
    geo = model_geometry("nano", None, "cpu", "float32")
    assert geo.tokens_per_frame == TOKENS_PER_FRAME


def test_word_tokenizer_round_trip():
    tok = build_word_tokenizer()
    ids = tok("What colour was the star?<|im_end|>", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["what", "colour", "was", "the", "star", "?", "<|im_end|>"]
    assert tok.decode(tok("red", add_special_tokens=False).input_ids + ids[-1:], skip_special_tokens=True) == "red"
    assert tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False).input_ids) == ["[unk]"]
    # with the cell words, the grid's "row r" / "column c" are one token each; other numbers stay apart
    cells = build_word_tokenizer(with_cell_words=True)
    ids = cells("What shape is at row 2 column 4 now? row 7", add_special_tokens=False).input_ids
    assert cells.convert_ids_to_tokens(ids) == ["what", "shape", "is", "at", "row 2", "column 4", "now", "?", "row",
                                                "7"]
    # the shipped tokenizer is the one its recipe trains with
    from mukv.models.nano import read_meta

    shipped = load_video_llm("nano", None, "cpu", "float32").tokenizer
    settings = read_meta(ASSET_DIR)["settings"]  # mukv_nano's record nests it (net.cell_words); older ones did not
    recipe = settings.get("net", settings).get("cell_words", False)
    assert shipped.get_vocab() == build_word_tokenizer(with_cell_words=recipe).get_vocab()


def test_shipped_checkpoint_answers_held_out_streams(nano):
    """cache=full within the training length, held-out seeds: the issue's target of >= 90% on detail questions,
    and every other type well above chance.

    Measured on 1,000 held-out questions (BENCHMARKS.md section 1): detail 100%, count 100%, current 100%,
    order 78%, motion 75%; here (40 or so of each) detail 100, motion 80, current 100, order 85, count 100
    on count-only streams and on the mixed ones. A checkpoint at 90% on detail passes with p ~ 0.6, one at 80%
    fails with p > 0.9. Current, order and motion must reach 75%: an earlier checkpoint fails order (53%,
    chance 50%), one before it current (34%, chance 33%), and one before that motion (77% in range, fails
    with p ~ 0.5). Count is asked twice: on mixed streams like the benchmark's (50% overall, and 40%, twice
    chance, on the streams that have rings: a checkpoint that only tells none from some, 62% in range, fails
    that), and on streams with count questions only, which show rings but no needles or balls (75%): the
    checkpoint shipped before this one counted 68% in range and 12% there.
    """
    judge = ExactMatchJudge()
    right: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    counted: list[tuple[str, bool]] = []  # (answer, right) of the count questions of the mixed streams

    def on_answer(rec):
        if (rec.qtype,) == spec.question_types:  # not the count questions of streams whose needles ran out
            right[rec.qtype].append(judge.judge(rec.question, rec.answer, rec.prediction).correct)

    def on_mixed_answer(rec):
        if rec.qtype == "count":
            counted.append((rec.answer, judge.judge(rec.question, rec.answer, rec.prediction).correct))

    engine = StreamingEngine(nano, FullCache(), EngineSettings(max_new_tokens=2, progress=False))
    detail = SyntheticSpec(num_videos=16, duration_s=48, sample_fps=0.5, questions_per_video=5, seed=500,
                           question_types=("detail",))
    motion = SyntheticSpec(num_videos=40, duration_s=20, sample_fps=0.5, questions_per_video=1, seed=600,
                           question_types=("motion",), question_times="end")
    current = SyntheticSpec(num_videos=20, duration_s=48, sample_fps=0.5, questions_per_video=2, seed=800,
                            question_types=("current",))
    order = SyntheticSpec(num_videos=20, duration_s=48, sample_fps=0.5, questions_per_video=2, seed=900,
                          question_types=("order",))
    count = SyntheticSpec(num_videos=20, duration_s=48, sample_fps=0.5, questions_per_video=2, seed=700,
                          question_types=("count",))
    mixed = SyntheticSpec(num_videos=40, duration_s=60, sample_fps=0.5, questions_per_video=5, seed=3000)
    for spec in (detail, motion, current, order, count):
        for video in make_synthetic_dataset(spec):
            engine.run_video(video, on_answer)
    for video in make_synthetic_dataset(mixed):
        engine.run_video(video, on_mixed_answer)
    for qtype in ("detail", "motion", "current", "order", "count"):
        assert len(right[qtype]) >= 30, (qtype, len(right[qtype]))
    assert np.mean(right["detail"]) >= 0.9, right["detail"]
    for qtype in ("motion", "current", "order"):
        assert np.mean(right[qtype]) >= 0.75 > CHANCE[qtype] + 0.2, (qtype, right[qtype])
    rings = [ok for answer, ok in counted if answer != "0"]
    assert len(counted) >= 30 and len(rings) >= 15 and len({answer for answer, _ in counted}) >= 3, counted
    assert np.mean([ok for _, ok in counted]) >= 0.5, counted
    assert np.mean(rings) >= 0.4 >= 2 * CHANCE["count"], counted  # counts, not only "none" / "some"
    assert np.mean(right["count"]) >= 0.75, right["count"]  # and counts whatever else is on screen


def test_asset_folder_is_tracked_by_git_and_packaged():
    root = Path(__file__).resolve().parents[1]
    ignore = (root / ".gitignore").read_text()
    assert "assets" not in ignore
    assert "assets/**/*" in (root / "setup.cfg").read_text()


# ------------------------------------------------------------------------------------ recall diagnostic
def _evidence_rows(nano, method, videos) -> list:
    rows = []
    engine = StreamingEngine(nano, method, EngineSettings(max_new_tokens=1, progress=False))
    for video in videos:
        engine.run_video(video, rows.append)
    return [r for r in rows if r.qtype in ("detail", "current", "motion")]


@pytest.fixture(scope="module")
def recall_videos():
    """Held-out streams of 24 frames with detail, current and motion questions spread over the stream."""
    return make_synthetic_dataset(SyntheticSpec(num_videos=2, duration_s=48, sample_fps=0.5, questions_per_video=6,
                                                seed=321, question_types=("detail", "current", "motion")))


def test_recalled_evidence_full_window_and_uniform(nano, recall_videos):
    """`evidence_recalled` is the share of a question's evidence cells in the context the method recalled:
    everything for the full cache, the needle's tokens iff its frame lies in the window or the sample."""
    from mukv.cache.uniform import UniformSampling as Uniform

    full = _evidence_rows(nano, FullCache(), recall_videos)
    assert full and all(r.evidence_recalled == 1.0 for r in full)
    window = _evidence_rows(nano, SlidingWindowCache(n_local=4 * TOKENS_PER_FRAME), recall_videos)
    for r in window:
        frames = [f for f, _ in r.meta["evidence_cells"]]
        want = sum(f >= r.frames_seen - 4 for f in frames) / len(frames)
        assert r.evidence_recalled == want, (r.qtype, frames, r.frames_seen)
    assert {r.evidence_recalled for r in window} >= {0.0, 1.0}
    uniform = _evidence_rows(nano, Uniform(num_frames=5), recall_videos)
    for r in uniform:
        sample = set(np.linspace(0, r.frames_seen - 1, 5).round().astype(int).tolist())
        frames = [f for f, _ in r.meta["evidence_cells"]]
        assert r.evidence_recalled == sum(f in sample for f in frames) / len(frames)


@pytest.mark.parametrize("patch_layout", ["raster", "quadrant"])
def test_recalled_evidence_mukv_and_rekv(nano, recall_videos, patch_layout):
    """MuKV records which video token each kept token is (raster or quadrant patch blocks): untrimmed, with
    every block recalled, all evidence is in context; trimmed, a needle counts only if its own token was
    kept. ReKV retrieving every frame recalls everything."""
    from mukv.cache import CACHE_METHODS
    from mukv.engine import evidence_recalled

    mukv = CACHE_METHODS["mukv"](top_k=[1000, 1000, 1000], keep_ratio=[1.0, 1.0, 1.0], patch_layout=patch_layout)
    rows = _evidence_rows(nano, mukv, recall_videos)
    assert rows and all(r.evidence_recalled == 1.0 for r in rows)
    for b in mukv.store.blocks:
        toks = np.array(b.meta["video_tokens"])
        frame, cell = np.divmod(toks, TOKENS_PER_FRAME)
        if len(toks) == 4:  # a patch block: 4 consecutive raster cells, or one 2x2 quadrant of a frame
            rows_, cols = np.divmod(cell, 4)
            if patch_layout == "raster":
                assert (np.diff(toks) == 1).all()
            else:
                assert len(set(frame)) == 1 and np.ptp(rows_) == 1 and np.ptp(cols) == 1
                assert set(rows_ % 2) == {0, 1} and rows_.min() % 2 == 0 and cols.min() % 2 == 0
        else:
            assert (np.diff(toks) == 1).all() and toks[0] % 4 == 0
    # published keep ratios: 0.1 of a 4-token patch block is 0 tokens, so patch blocks are kept whole (as the
    # published trimming returns them) and, every block recalled, all evidence is in context
    published = CACHE_METHODS["mukv"](top_k=[1000, 1000, 1000], patch_layout=patch_layout)
    rows = _evidence_rows(nano, published, recall_videos[:1])
    assert rows and all(r.evidence_recalled == 1.0 for r in rows)
    trimmed = CACHE_METHODS["mukv"](top_k=[1000, 1000, 1000], patch_layout=patch_layout, keep_floor="one")
    rows = _evidence_rows(nano, trimmed, recall_videos[:1])
    kept = {t for b in trimmed.store.blocks for t in b.meta["video_tokens"]}
    assert any(r.evidence_recalled < 1.0 for r in rows)
    for r in rows:  # every block is recalled: recall is exactly what trimming kept
        assert r.evidence_recalled == evidence_recalled(
            r.meta, [t for t in kept if t < r.frames_seen * TOKENS_PER_FRAME], TOKENS_PER_FRAME)
    rekv = _evidence_rows(nano, CACHE_METHODS["rekv"](retrieve_size=64), recall_videos)
    assert rekv and all(r.evidence_recalled == 1.0 for r in rekv)


def test_evidence_recalled_falls_back_to_frames():
    """A model with more visual tokens per frame than grid cells: recall is counted by frame; methods that
    recall whole frames report frames."""
    from mukv.engine import evidence_recalled

    meta = {"evidence_cells": [[2, 5], [3, 6]], "grid": 4}
    assert evidence_recalled(meta, [2 * 16 + 5], 16) == 0.5
    assert evidence_recalled(meta, [2 * 16 + 4, 3 * 16 + 6], 16) == 0.5
    assert evidence_recalled(meta, [2 * 196 + 100], 196) == 0.5
    assert evidence_recalled(meta, None, 16) is None and evidence_recalled({}, [1], 16) is None
    assert evidence_recalled(meta, None, 16, frames=[3, 9]) == 0.5  # methods that recall whole frames
    assert evidence_recalled(meta, range(2 * 16 + 5, 3 * 16 + 7), 16) == 1.0  # a window
