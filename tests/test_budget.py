"""One registry: every cache method says how a budget in frames maps onto its knobs and where it sorts, and
``budget_frames=N`` applies that mapping in a run (resolved config, fingerprint, metrics)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mukv.cache import CACHE_METHODS, budget_knobs, method_rank, ordered_methods
from mukv.cache.base import CacheMethod
from mukv.config import register_configs
from mukv.errors import ConfigError
from mukv.train_eval import apply_budget, train_eval

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    cfg.paths.root_dir = str(CONF.parent)
    return cfg


def test_the_shipped_methods_in_display_order():
    assert ordered_methods() == ["full", "sliding_window", "uniform", "rekv", "mukv"]
    assert sorted(["mukv", "zzz_unregistered", "full", "rekv"], key=method_rank) == ["full", "rekv", "mukv",
                                                                                      "zzz_unregistered"]


@pytest.mark.parametrize("frames,tpf,expected", [
    (16, 16, {"full": {}, "sliding_window": {"n_local": 256}, "uniform": {"num_frames": 16},
              "rekv": {"retrieve_size": 16}, "mukv": {"top_k": [5, 8, 3]}}),
    (64, 196, {"full": {}, "sliding_window": {"n_local": 12544}, "uniform": {"num_frames": 64},
               "rekv": {"retrieve_size": 64}, "mukv": {"top_k": [20, 32, 12]}}),  # the published settings
])
def test_budget_knobs_of_every_method(frames, tpf, expected):
    assert {m: budget_knobs(m, frames, tpf) for m in ordered_methods()} == expected


def test_every_budget_knob_is_a_knob_of_its_method():
    for name in ordered_methods():
        fields = {f.name for f in dataclasses.fields(CACHE_METHODS[name])}
        assert set(budget_knobs(name, 8, 16)) <= fields, name


def test_a_budget_knob_that_is_not_a_field_is_refused_not_dropped(monkeypatch):
    cls = CACHE_METHODS["rekv"]
    monkeypatch.setattr(cls, "budget_knobs", classmethod(lambda c, f, t: {"retrieve_size": f, "block_size": t}))
    with pytest.raises(ConfigError, match="block_size"):
        budget_knobs("rekv", 8, 16)


def test_budget_frames_writes_the_knobs_into_the_config():
    cfg = compose_cfg("cache=mukv", "budget_frames=32")
    assert apply_budget(cfg, 16) == {"top_k": [10, 16, 6]} and list(cfg.cache.top_k) == [10, 16, 6]
    untouched = compose_cfg("cache=mukv")
    assert apply_budget(untouched, 16) == {} and list(untouched.cache.top_k) == [20, 32, 12]
    assert apply_budget(compose_cfg("cache=full", "budget_frames=8"), 16) == {}  # full has no budget


def test_a_run_with_budget_frames_records_and_uses_the_knobs(tmp_path):
    cfg = compose_cfg("experiment=smoke", "cache=rekv", "budget_frames=3", "dataset.synthetic.questions_per_video=1")
    cfg.paths.output_dir = str(tmp_path)
    result = train_eval(cfg, tmp_path)
    assert result.ok and result.metrics["budget_frames"] == 3 and result.metrics["budget_knobs"] == {"retrieve_size": 3}
    assert "retrieve_size: 3" in (tmp_path / "resolved_config.yaml").read_text()
    stored = json.loads((tmp_path / "fingerprint.json").read_text())["config"]
    assert stored["budget_frames"] == 3 and stored["cache"]["retrieve_size"] == 3
    # the recalled context: the init prompt and 3 frames of 16 tokens (the smoke stream shows more than 3)
    import pandas as pd

    from mukv.models.nano import load_nano_checkpoint  # noqa: F401  (the nano model's 16 tokens per frame)

    rows = pd.read_csv(tmp_path / "predictions.csv")
    assert (rows.frames_seen > 3).all() and (rows.online_tokens - rows.online_tokens.min() == 0).all()
    full = compose_cfg("experiment=smoke", "cache=rekv", "dataset.synthetic.questions_per_video=1")
    full.paths.output_dir = str(tmp_path / "unbudgeted")
    unbudgeted = pd.read_csv(train_eval(full, tmp_path / "unbudgeted").output_dir / "predictions.csv")
    assert (unbudgeted.online_tokens - rows.online_tokens == 16 * (unbudgeted.frames_seen - 3)).all()


def test_display_order_is_a_class_attribute_not_a_knob():
    assert "display_order" not in {f.name for f in dataclasses.fields(CACHE_METHODS["mukv"])}
    assert CacheMethod.display_order > max(CACHE_METHODS[m].display_order for m in ordered_methods())
