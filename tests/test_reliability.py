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
from mukv.models.loading import model_geometry, model_loader
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
          "model.dtype", "model.device", "logger.mode", "judge.name", "judge._target_", "model._target_", "dataset._target_", "budget_frames",
          "cache.query_block"]
override_value = st.one_of(st.integers(-3, 5), st.floats(-2, 3, allow_nan=False), st.sampled_from(
    ["null", "abc", "true", "[1,2]", "{a: 1}", "''", "1e309", "nan", "-inf", "cuda:7", "fp8"]))


@settings(max_examples=60, deadline=None)
@given(cache=st.sampled_from(["full", "sliding_window", "uniform"]),
       overrides=st.lists(st.tuples(st.sampled_from(FIELDS), override_value), max_size=3))
def test_config_fuzz_fails_only_with_config_errors(cache, overrides):
    args = [f"cache={cache}"] + [f"{k}={v}" for k, v in overrides]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("eval", overrides=args)
    except (HydraException, OmegaConfBaseException):
        return  # rejected at compose time (unknown key for this method, wrong type), with the key named
    cfg.paths.root_dir, cfg.paths.output_dir = str(CONF.parent), "/tmp/mukv-fuzz"
    try:
        validate_config(cfg)
        method = build_method(cfg.cache)
        method.validate(model_loader(cfg.model).geometry(cfg.model))
    except MukvError as err:
        assert isinstance(err, ConfigError) and err.field in str(err)


# ---------------------------------------------------------------------------------- determinism
def test_same_config_and_seed_give_identical_predictions(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["experiment=smoke", "cache=sliding_window", "cache.n_local=100"])
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


# ---------------------------------------------------------------------------------------- resume
def _cli(out, *extra):
    import os
    import sys

    args = [sys.executable, "-m", "mukv.run", "model=tiny", "cache=sliding_window", "cache.n_local=200",
            "dataset.synthetic.num_videos=2", "dataset.synthetic.duration_s=120", "dataset.sample_fps=1",
            "dataset.synthetic.questions_per_video=6", "engine.max_new_tokens=24", "engine.progress=false",
            f"hydra.run.dir={out}", *extra]
    return args, {**os.environ, "HYDRA_FULL_ERROR": "0"}


def _records(path: Path) -> int:
    """Complete CSV records (header included) in a file another process may be writing."""
    import csv
    import io

    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text[: text.rfind("\n") + 1])))
    return sum(len(row) == len(rows[0]) for row in rows)  # a record cut inside a quoted answer is short


def _answers(out: Path) -> list[tuple[str, str, str]]:
    import csv

    with (out / "predictions.csv").open(newline="") as f:
        return sorted((r["qid"], r["prediction"], r["online_tokens"]) for r in csv.DictReader(f))


def test_a_run_killed_mid_video_resumes_and_ends_with_the_same_predictions(tmp_path):
    import signal
    import subprocess
    import time

    reference = tmp_path / "reference"
    args, env = _cli(reference)
    assert subprocess.run(args, env=env, capture_output=True, timeout=300).returncode == 0
    expected = _answers(reference)
    assert len(expected) == 12

    out = tmp_path / "killed"
    args, env = _cli(out)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    preds = out / "predictions.csv"
    deadline = time.time() + 240
    # Kill in the middle of the first video: after its second answer, before its last. Rows are counted as
    # CSV records: an answer may hold newlines (MuKV's published answer text keeps them).
    while time.time() < deadline and proc.poll() is None:
        if preds.exists() and _records(preds) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= _records(preds) < 13 and not (out / "metrics.json").exists()
    with preds.open("a") as f:  # a torn write that ends at a newline inside a quoted question
        f.write('syn-s0-v0001,syn-s0-v0001_q9,"How many rings\n')
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in (out / "run.log").read_text() and "reusing" in done.stdout
    assert _answers(out) == expected
    assert json.loads((out / "metrics.json").read_text())["questions"] == 12
    # every figure of memory_stats.csv and metrics.json is the uninterrupted run's, timing aside
    from test_resume import outputs

    (_, memory, metrics), (_, ref_memory, ref_metrics) = outputs(out), outputs(reference)
    assert memory.to_dict("records") == ref_memory.to_dict("records") and metrics == ref_metrics


def test_resume_false_moves_earlier_outputs_aside(tmp_path):
    import subprocess

    out = tmp_path / "run"
    args, env = _cli(out, "dataset.synthetic.num_videos=1", "engine.max_new_tokens=2")
    assert subprocess.run(args, env=env, capture_output=True, timeout=300).returncode == 0
    first = _answers(out)
    assert subprocess.run(args + ["resume=false"], env=env, capture_output=True, timeout=300).returncode == 0
    (backup,) = out.glob("previous-*")
    assert _answers(backup) == first == _answers(out)


@pytest.mark.parametrize("cache,override,field", [
    ("rekv", "cache.retrieve_size=0", "cache.retrieve_size"),
    ("rekv", "cache.n_local=-5", "cache.n_local"),
    ("rekv", "cache.retrieve_chunk_size=3", "cache.retrieve_chunk_size"),
    ("uniform", "cache.num_frames=0", "cache.num_frames"),
    ("sliding_window", "cache.n_local=0", "cache.n_local"),
    ("mukv", "cache.keep_ratio=[0.1,0.0,0.8]", "cache.keep_ratio"),
    ("mukv", "cache.keep_ratio=[0.1,1.5,0.8]", "cache.keep_ratio"),
    ("mukv", "cache.top_k=[20,-1,12]", "cache.top_k"),
    ("mukv", "cache.granularities=[0.3,1.0,4.0]", "cache.granularities"),
])
def test_bad_budgets_and_ratios_are_rejected_before_the_model_loads(cache, override, field):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=[f"cache={cache}", override])
    with pytest.raises(ConfigError) as err:
        build_method(cfg.cache).validate(model_geometry("tiny", None, "cpu", "float32"))
    assert field in str(err.value)
