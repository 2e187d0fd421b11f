"""Every answer says whether its context reaches past the positions the model was trained on: at 10x the nano
model's training length the full cache answers from positions it never saw, a bounded window does not."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mukv.config import register_configs
from mukv.models.loading import load_video_llm
from mukv.train_eval import train_eval

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def test_the_nano_model_knows_its_trained_span():
    llm = load_video_llm("nano", None, device="cpu", dtype="float32")
    assert llm.trained_positions == len(llm.init_prompt_ids()) + 32 * 16  # init + the longest training stream
    assert load_video_llm("tiny", None, device="cpu", dtype="float32").trained_positions is None


@pytest.mark.parametrize("cache,extra,beyond", [
    ("full", ["dataset.synthetic.duration_s=40"], False),  # 20 frames: within the 32 trained
    ("full", ["dataset.synthetic.duration_s=200"], True),  # up to 100 frames at their encoding positions
    ("sliding_window", ["dataset.synthetic.duration_s=200", "budget_frames=8"], False),  # re-rotated from 0
])
def test_answers_past_the_trained_positions_are_flagged_and_counted(tmp_path, cache, extra, beyond):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["experiment=smoke", f"cache={cache}", "dataset.synthetic.question_times=end",
                                         *extra])
    cfg.paths.root_dir, cfg.paths.output_dir = str(CONF.parent), str(tmp_path)
    result = train_eval(cfg, tmp_path)
    rows = pd.read_csv(tmp_path / "predictions.csv")
    assert (rows.beyond_trained == beyond).all() and (rows.answer_position == rows.online_tokens).all()
    assert result.metrics["beyond_trained_questions"] == (len(rows) if beyond else 0)


def run_smoke(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["experiment=smoke", "dataset.synthetic.questions_per_video=5", *overrides])
    cfg.paths.root_dir, cfg.paths.output_dir = str(CONF.parent), str(tmp_path)
    train_eval(cfg, tmp_path)
    return pd.read_csv(tmp_path / "predictions.csv")


def test_the_position_bounded_full_cache_changes_only_answers_past_the_trained_span(tmp_path):
    """cache=full_bounded: within the trained span the same answers as cache=full; past it the answer's context
    ends at the span (positions scaled into it), so no answer is flagged beyond_trained."""
    long = ["dataset.synthetic.duration_s=200"]
    full = run_smoke(tmp_path / "full", "cache=full", *long)
    bounded = run_smoke(tmp_path / "bounded", "cache=full_bounded", *long)
    within = ~full.beyond_trained
    assert within.any() and (~within).any()
    assert (full.prediction[within] == bounded.prediction[within]).all()
    assert (bounded.answer_position[within] == full.answer_position[within]).all()
    span = load_video_llm("nano", None, device="cpu", dtype="float32").trained_positions
    assert (bounded.answer_position[~within] == span).all() and not bounded.beyond_trained.any()
    assert (bounded.online_tokens == full.online_tokens).all()  # the same tokens, other positions


def test_bounded_positions_need_a_span(tmp_path):
    from mukv.errors import ConfigError

    with pytest.raises(ConfigError, match="cache.bounded_span"):
        run_smoke(tmp_path / "tiny", "cache=full_bounded", "model=tiny")
    rows = run_smoke(tmp_path / "given", "cache=full_bounded", "model=tiny", "cache.bounded_span=64",
                     "dataset.synthetic.duration_s=60")
    assert rows.answer_position.max() <= 64
