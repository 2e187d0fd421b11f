"""The default pipeline end to end, and bad input, the way a user meets them: ``python -m mukv.run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from wandb_reader import summary_and_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "mukv.run", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_default_pipeline_end_to_end_with_wandb_offline(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(f"hydra.run.dir={out}", "logger=wandb", "engine.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("resolved_config.yaml", "run.log", "predictions.csv", "memory_stats.csv", "metrics.json",
                 ".hydra/config.yaml"):
        assert (out / name).is_file(), name
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    # The default dataset: 2 synthetic videos with 4 questions each, answered in end_time order.
    assert len(preds) == 8 and set(preds.video_id.unique()) == {"syn-s0-v0000", "syn-s0-v0001"}
    for col in ("video_id", "question", "answer", "prediction", "start_time", "end_time", "method",
                "online_tokens", "latency_s", "ttft_s", "judge_correct"):
        assert col in preds.columns, col
    for _, rows in preds.groupby("video_id"):
        assert list(rows.end_time) == sorted(rows.end_time)
    assert (preds.method == "full").all() and (preds.online_tokens > 0).all()
    memory = pd.read_csv(out / "memory_stats.csv", keep_default_na=False)
    assert len(memory) == 2 and (memory.kv_bytes > 0).all() and (memory.error == "").all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["questions"] == 8 and metrics["judged"] == 8 and metrics["method"] == "full"
    assert metrics["kv_bytes_total"] == int(memory.kv_bytes.sum())
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    summary, config, _ = summary_and_config(run_dir)
    assert summary["questions"] == 8 and summary["kv_bytes_total"] == metrics["kv_bytes_total"]
    assert summary["accuracy"] == metrics["accuracy"]
    assert config["cache"]["_target_"] == "mukv.cache.full.FullCache"
    tables = list((run_dir / "files" / "media" / "table").glob("*.table.json"))
    assert {t.name.split("_")[0] for t in tables} == {"predictions", "memory"}


def test_cfg_job_prints_the_resolved_config():
    proc = run_cli("--cfg", "job", "cache=sliding_window", "cache.n_local=123")
    assert proc.returncode == 0, proc.stderr
    assert "n_local: 123" in proc.stdout and "_target_: mukv.cache.sliding_window.SlidingWindowCache" in proc.stdout


def test_typo_fails_before_anything_runs(tmp_path):
    proc = run_cli(f"hydra.run.dir={tmp_path}/r", "cache.n_locl=5")
    assert proc.returncode != 0 and "n_locl" in proc.stderr
    assert not (tmp_path / "r" / "predictions.csv").exists()


def test_invalid_config_value_is_one_clear_error(tmp_path):
    proc = run_cli(f"hydra.run.dir={tmp_path}/r", "dataset.sample_fps=-1")
    assert proc.returncode == 2
    assert "config field 'dataset.sample_fps'" in proc.stderr and "Traceback" not in proc.stderr


def write_annotation(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


GOOD_RECORD = {"video_id": "v1", "video_path": "/data/rvs/ego/v1.npy", "duration": 10,
               "conversations": [{"question": "what?", "answer": "x", "start_time": 0, "end_time": 4}]}


def test_malformed_annotation_record_names_file_and_field(tmp_path):
    bad = dict(GOOD_RECORD, conversations=[{"question": "what?", "answer": "x", "start_time": 0}])
    ann = write_annotation(tmp_path / "ann.json", [bad])
    proc = run_cli(f"hydra.run.dir={tmp_path}/r", "dataset=rvs_ego", f"dataset.annotation={ann}",
                   f"dataset.data_root={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(ann) in proc.stderr and "end_time" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_video_is_named_before_the_model_loads(tmp_path):
    ann = write_annotation(tmp_path / "ann.json", [GOOD_RECORD])
    proc = run_cli(f"hydra.run.dir={tmp_path}/r", "dataset=rvs_ego", f"dataset.annotation={ann}",
                   f"dataset.data_root={tmp_path}")
    assert proc.returncode == 2
    assert str(tmp_path / "ego" / "v1.npy") in proc.stderr and "Traceback" not in proc.stderr
    assert "loading model" not in (tmp_path / "r" / "run.log").read_text()


def test_a_broken_video_is_recorded_and_the_run_goes_on(tmp_path):
    (tmp_path / "ego").mkdir()
    frames = np.random.default_rng(0).integers(0, 255, (10, 112, 112, 3), dtype=np.uint8)
    np.save(tmp_path / "ego" / "v2.npy", frames)
    np.save(tmp_path / "ego" / "v1.npy", frames[..., 0])  # wrong shape: (N, H, W)
    ann = write_annotation(tmp_path / "ann.json", [GOOD_RECORD, dict(GOOD_RECORD, video_id="v2",
                                                                     video_path="/data/rvs/ego/v2.npy")])
    out = tmp_path / "r"
    proc = run_cli(f"hydra.run.dir={out}", "dataset=rvs_ego", f"dataset.annotation={ann}",
                   f"dataset.data_root={tmp_path}", "dataset.sample_fps=1", "engine.max_new_tokens=2")
    assert proc.returncode == 1, proc.stderr[-2000:]
    memory = pd.read_csv(out / "memory_stats.csv", keep_default_na=False).set_index("video_id")
    assert "v1.npy" in memory.loc["v1", "error"] and memory.loc["v2", "error"] == ""
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert list(preds.video_id) == ["v2"] and preds.frames_seen.iloc[0] == 4
