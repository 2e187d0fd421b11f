"""Bad input never escapes as an unhandled exception; the same config and seed give the same answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from mukv.config import register_configs
from mukv.data.rvs import load_rvs_annotations
from mukv.errors import ConfigError, DataError, MukvError
from mukv.models.loading import model_geometry
from mukv.train_eval import build_method, train_eval, validate_config

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

# ----------------------------------------------------------------------------- annotation fuzzing
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10_000), st.text(max_size=6),
                         st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3)), max_leaves=8)
turn = st.fixed_dictionaries(
    {"question": st.one_of(st.text(max_size=8), json_scalars), "answer": st.one_of(st.text(max_size=4), json_scalars)},
    optional={"start_time": json_values, "end_time": st.one_of(st.integers(-5, 100), json_values)},
)
record = st.fixed_dictionaries(
    {},
    optional={"video_id": st.one_of(st.text(max_size=4), json_scalars), "video_path": st.one_of(st.just("/data/rvs/a.mp4"), json_scalars),
              "duration": st.one_of(st.integers(-1, 120), json_values), "conversations": st.one_of(st.lists(turn, max_size=3), json_values),
              "clip_start_time": json_values},
)
document = st.one_of(st.lists(st.one_of(record, json_values), max_size=4), json_values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=document)
def test_annotation_loader_fuzz_raises_only_data_errors(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("ann") / "a.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    try:
        videos = load_rvs_annotations(path, data_root=path.parent, sample_fps=0.5)
    except DataError as err:
        assert str(path) in str(err)
        return
    for v in videos:  # whatever loads is well-formed
        assert v.video_id and v.duration > 0 and math.isfinite(v.duration)
        assert [q.end_time for q in v.questions] == sorted(q.end_time for q in v.questions)
        assert all(0 <= q.start_time <= q.end_time and q.question for q in v.questions)


def test_annotation_loader_rejects_bytes_that_are_not_json(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"\xff\xfe[{\"video_id\":")
    with pytest.raises(DataError, match=str(path)):
        load_rvs_annotations(path, data_root=tmp_path, sample_fps=0.5)


# --------------------------------------------------------------------------------- config fuzzing
FIELDS = ["dataset.sample_fps", "engine.max_new_tokens", "engine.encode_chunk_size", "dataset.limit_videos",
          "dataset.synthetic.num_videos", "dataset.synthetic.duration_s", "cache.n_local", "cache.num_frames",
          "model.dtype", "model.device", "logger.mode", "judge.name", "mode", "dataset.kind", "cache.query_block"]
override_value = st.one_of(st.integers(-3, 5), st.floats(-2, 3, allow_nan=False), st.sampled_from(
    ["null", "abc", "true", "[1,2]", "{a: 1}", "''", "1e309", "nan", "-inf", "cuda:7", "fp8"]))


@settings(max_examples=60, deadline=None)
@given(cache=st.sampled_from(["full", "sliding_window", "uniform"]),
       overrides=st.lists(st.tuples(st.sampled_from(FIELDS), override_value), max_size=3))
def test_config_fuzz_fails_only_with_config_errors(cache, overrides):
    args = [f"cache={cache}"] + [f"{k}={v}" for k, v in overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=args)
    except (HydraException, OmegaConfBaseException):
        return  # rejected at compose time (unknown key for this method, wrong type), with the key named
    cfg.paths.root_dir, cfg.paths.output_dir = str(CONF.parent), "/tmp/mukv-fuzz"
    try:
        validate_config(cfg)
        method = build_method(cfg.cache)
        method.validate(model_geometry(cfg.model.kind, cfg.model.path, cfg.model.device, cfg.model.dtype))
    except MukvError as err:
        assert isinstance(err, ConfigError) and err.field in str(err)


# ---------------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_identical_predictions(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "cache=sliding_window", "cache.n_local=100"])
    cfg.paths.root_dir = str(CONF.parent)
    columns = ["qid", "prediction", "online_tokens", "kv_bytes", "frames_seen"]
    runs = []
    for name in ("a", "b"):
        cfg.paths.output_dir = str(tmp_path / name)
        result = train_eval(cfg)
        assert result.ok
        lines = (tmp_path / name / "predictions.csv").read_text().splitlines()
        header = lines[0].split(",")
        runs.append([[row.split(",")[header.index(c)] for c in columns] for row in lines[1:]])
    assert runs[0] == runs[1] and len(runs[0]) == 2
