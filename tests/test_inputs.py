"""Bad input that used to pass unnoticed or crash after the model loaded (issue 24): questions past the real end
of their video, video paths that escape the data root, values that crash or hang late, deeply nested JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mukv.config import register_configs
from mukv.data.rvs import load_rvs_annotations
from mukv.data.types import Question, VideoSample
from mukv.errors import ConfigError, DataError
from mukv.inputs import screen_past_end
from mukv.train_eval import validate_config
from mukv.video.sources import ArraySource, Mp4Source, NpySource, write_mp4

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "mukv.run", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, no traceback, nothing loaded, and one line of the output naming the field or file."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "loading model" not in output, output[-3000:]
    assert any(all(n in line for n in needles) for line in proc.stderr.splitlines()), proc.stderr[-3000:]


def write_npy(path: Path, frames: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(0).integers(0, 256, (frames, 56, 56, 3), dtype=np.uint8))
    return path


def write_annotation(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def record(video_path: str, end_times: list[float], duration: float = 10.0) -> dict:
    return {"video_id": "v1", "video_path": video_path, "duration": duration,
            "conversations": [{"question": f"What is shown at {t:g}?", "answer": "a", "end_time": t}
                              for t in end_times]}


RVS = ("model=tiny", "dataset=rvs_movie", "engine.max_new_tokens=2", "engine.progress=false")


# ----------------------------------------------------------------------------- questions past the real video
def test_sources_know_their_real_length(tmp_path):
    write_mp4(tmp_path / "v.mp4", np.zeros((10, 32, 32, 3), dtype=np.uint8), fps=5)
    assert Mp4Source(tmp_path / "v.mp4", 1.0).duration_s == pytest.approx(2.0)
    assert NpySource(write_npy(tmp_path / "v.npy", 7), 0.5).duration_s == 7.0
    assert ArraySource(np.zeros((6, 8, 8, 3), dtype=np.uint8), 2.0).duration_s == 3.0


def _sample(end_times: list[float]) -> VideoSample:
    questions = [Question(f"v_q{i}", "What?", "a", 0.0, t) for i, t in enumerate(end_times)]
    return VideoSample("v", 1e300, questions, ArraySource(np.zeros((10, 8, 8, 3), dtype=np.uint8), 1.0))


def test_screen_past_end_records_failures_once_or_answers_and_flags():
    recorded = []
    video = _sample([5.0, 10.9, 11.5, 1e300])  # the file holds 10 s; within 1 s of the end is the end
    screen_past_end(video, "fail", "full", skip={"v_q3"}, record=recorded.append)
    assert [q.qid for q in video.questions] == ["v_q0", "v_q1"]
    assert [r.qid for r in recorded] == ["v_q2"]  # v_q3 was recorded before a resume: not twice
    (r,) = recorded
    assert r.prediction == "" and "past the end" in r.error and "10.0 s long" in r.error
    assert r.meta["past_end_s"] == pytest.approx(1.5) and r.latency_s is None

    recorded.clear()
    video = _sample([5.0, 11.5, 1e300])
    screen_past_end(video, "answer", "full", skip=(), record=recorded.append)
    assert not recorded and [q.qid for q in video.questions] == ["v_q0", "v_q1", "v_q2"]
    assert ["past_end_s" in q.meta for q in video.questions] == [False, True, True]


def test_a_question_past_the_real_video_is_failed_or_flagged_and_counted(tmp_path):
    write_npy(tmp_path / "videos" / "v1.npy", 10)  # 10 s at 1 fps; the annotation claims 1e300 s
    ann = write_annotation(tmp_path / "ann.json", [record("videos/v1.npy", [4, 8, 1e300], duration=1e300)])
    data = (f"dataset.annotation={ann}", f"dataset.data_root={tmp_path}")

    failed = run_cli(*RVS, *data, f"hydra.run.dir={tmp_path}/fail")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "1 question(s) failed" in failed.stderr
    assert "the annotation says it lasts 1e+300 s; the file holds 10.0 s" in failed.stdout + failed.stderr
    preds = pd.read_csv(tmp_path / "fail" / "predictions.csv", keep_default_na=False)
    assert len(preds) == 3
    past = preds[preds.end_time.astype(float) > 1e299].iloc[0]
    assert "past the end of video" in past.error and past.prediction == "" and past.judge_correct == ""
    assert (preds[preds.end_time.astype(float) < 100].error == "").all()
    metrics = json.loads((tmp_path / "fail" / "metrics.json").read_text())
    assert metrics["past_end_questions"] == 1 and metrics["failed_questions"] == 1 and metrics["questions"] == 3
    assert metrics["mean_latency_s"] > 0  # the failed row has no timings to pull the means down

    answered = run_cli(*RVS, *data, "dataset.past_end=answer", f"hydra.run.dir={tmp_path}/answer")
    assert answered.returncode == 0, answered.stderr[-3000:]
    preds = pd.read_csv(tmp_path / "answer" / "predictions.csv", keep_default_na=False)
    assert len(preds) == 3 and (preds.error == "").all()
    assert [("past_end_s" in json.loads(m)) for m in preds.meta] == [False, False, True]
    metrics = json.loads((tmp_path / "answer" / "metrics.json").read_text())
    assert metrics["past_end_questions"] == 1 and metrics["failed_questions"] == 0


# ---------------------------------------------------------------------------------- paths outside the root
def test_video_paths_may_not_escape_the_data_root(tmp_path):
    root = tmp_path / "root"
    write_npy(root / "v.npy", 4)
    write_npy(tmp_path / "outside" / "x.npy", 4)
    (root / "link.npy").symlink_to(tmp_path / "outside" / "x.npy")
    (root / "inner.npy").symlink_to(root / "v.npy")
    (root / "sub").mkdir()
    ann = tmp_path / "ann.json"
    for escaping in ("../outside/x.npy", "sub/../../outside/x.npy", "link.npy", str(tmp_path / "outside/x.npy"),
                     "/data/rvs/../outside/x.npy"):
        write_annotation(ann, [record(escaping, [2])])
        with pytest.raises(DataError, match="outside the data root") as err:
            load_rvs_annotations(ann, data_root=root, sample_fps=1.0)
        assert "field 'video_path'" in str(err.value) and "record v1" in str(err.value)
        (video,) = load_rvs_annotations(ann, data_root=root, sample_fps=1.0, allow_outside_root=True)
        assert len(video.source) == 4
    for inside in ("v.npy", "inner.npy", "sub/../v.npy", "/data/rvs/v.npy"):
        write_annotation(ann, [record(inside, [2])])
        assert len(load_rvs_annotations(ann, data_root=root, sample_fps=1.0)[0].source) == 4


def test_the_cli_refuses_a_video_outside_the_data_root_unless_told(tmp_path):
    write_npy(tmp_path / "outside" / "x.npy", 4)
    (tmp_path / "root").mkdir()
    ann = write_annotation(tmp_path / "ann.json", [record("../outside/x.npy", [2])])
    data = (f"dataset.annotation={ann}", f"dataset.data_root={tmp_path}/root")
    assert_user_error(run_cli(*RVS, *data, f"hydra.run.dir={tmp_path}/r"), "video_path", "outside the data root")
    ok = run_cli(*RVS, *data, "dataset.allow_outside_root=true", f"hydra.run.dir={tmp_path}/r2")
    assert ok.returncode == 0, ok.stderr[-3000:]


# ------------------------------------------------------------------------- values that crashed or hung late
@pytest.mark.parametrize("overrides,field", [
    (["cache=rekv", "cache.ram_budget_gb=nan"], "cache.ram_budget_gb"),
    (["cache=mukv", "cache.ram_budget_gb=inf"], "cache.ram_budget_gb"),
    (["engine.max_new_tokens=1000000000"], "engine.max_new_tokens"),
    (["dataset.synthetic.duration_s=1e9"], "dataset.synthetic.duration_s"),
    (["dataset.past_end=maybe"], "dataset.past_end"),
])
def test_values_that_crashed_or_hung_after_the_model_loaded_fail_first(tmp_path, overrides, field):
    assert_user_error(run_cli(*overrides, f"hydra.run.dir={tmp_path}/r"), f"'{field}'")


def test_an_unwritable_spill_dir_fails_before_the_model_loads(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    proc = run_cli("cache=rekv", "cache.ram_budget_gb=0", f"cache.spill_dir={tmp_path}/a_file/spill",
                   f"hydra.run.dir={tmp_path}/r")
    assert_user_error(proc, "'cache.spill_dir'", "cannot write")


def test_bounds_are_checked_with_the_config():
    """The same checks in process (the CLI tests above run them through ``python -m mukv.run``)."""
    for override, field in [("engine.max_new_tokens=32769", "engine.max_new_tokens"),
                            ("dataset.synthetic.duration_s=400001", "dataset.synthetic.duration_s"),
                            ("dataset.data_root=null", "dataset.data_root")]:
        extra = ["dataset=rvs_movie", f"dataset.annotation={CONF / 'eval.yaml'}"] if "data_root" in field else []
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("eval", overrides=[*extra, override])
        cfg.paths.root_dir = str(ROOT)
        with pytest.raises(ConfigError, match=field):
            validate_config(cfg)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # the limits themselves pass
        validate_config(compose("eval", overrides=["engine.max_new_tokens=32768",
                                                     "dataset.synthetic.duration_s=400000"]))


def test_deeply_nested_json_is_a_data_error_not_a_recursion_error(tmp_path):
    ann = tmp_path / "deep.json"
    ann.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_rvs_annotations(ann, data_root=tmp_path, sample_fps=1.0)
    ann.write_text(json.dumps([record("v.npy", [2])])[:-1] + ", " + "[" * 50_000 + "]" * 50_000 + "]")
    with pytest.raises(DataError, match="nested too deeply"):
        load_rvs_annotations(ann, data_root=tmp_path, sample_fps=1.0)
    write_npy(tmp_path / "v.npy", 4)
    ann.write_text("[" * 100_000 + "]" * 100_000)
    assert_user_error(run_cli(*RVS, f"dataset.annotation={ann}", f"dataset.data_root={tmp_path}",
                              f"hydra.run.dir={tmp_path}/r"), str(ann), "nested too deeply")
