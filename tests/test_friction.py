"""First-hour friction (issue 24): an offline Hub fails fast, the nano model warns on real data, every run
folder gets its figures, and every accuracy carries its 95% Wilson interval and question count."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mukv.report.metrics import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
NANO_WARNING = "model=nano knows only the synthetic benchmark"


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp_path: Path, how: str) -> dict[str, str]:
    """An empty Hugging Face cache and a Hub that cannot be reached: by ``HF_HUB_OFFLINE=1``, or by an
    endpoint on a closed local port (what a machine without network sees, whatever this machine has)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                        "HF_ENDPOINT")}
    env.update(HF_HOME=str(tmp_path / "hf"), HYDRA_FULL_ERROR="0", WANDB_MODE="offline")
    if how == "offline_env":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    return env


def run_cli(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "mukv.run", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# ----------------------------------------------------------------------------- 1. offline: fail fast
@pytest.mark.parametrize("how", ["closed_endpoint", "offline_env"])
def test_offline_hub_model_fails_fast_with_one_line_naming_model_path(tmp_path, how):
    """`model=llava_ov_0.5b` with no Hub: exit 2 in seconds, no retries, one line saying how to point
    model.path at a local folder (before: five retries with backoff, 35 s, a two-line error, twice)."""
    started = time.monotonic()
    proc = run_cli(f"hydra.run.dir={tmp_path}/r", "model=llava_ov_0.5b", env=offline_env(tmp_path, how))
    elapsed = time.monotonic() - started
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "Retry" not in text and "Retrying" not in text and "Traceback" not in text
    errors = [line for line in proc.stderr.splitlines() if "config field 'model.path'" in line]
    assert errors, proc.stderr[-3000:]
    for line in errors:  # the whole message on one line: the Hub id, and how to use a local folder instead
        assert HUB_ID in line and "model.path=DIR" in line and "local folder" in line
    assert "Check your internet connection" not in text  # transformers' second line is not passed on
    assert elapsed < 60, elapsed  # seconds of start-up, not the Hub client's backoff (24 s of sleeps before)
    assert not (tmp_path / "r" / "predictions.csv").exists()


def test_a_cached_hub_model_is_read_from_the_cache_when_the_hub_is_unreachable(tmp_path):
    """Offline but in the local cache: the config is read from it at once, with no attempt to reach the Hub."""
    from mukv.models.loading import tiny_config

    repo = tmp_path / "hf" / "hub" / "models--someone--cached-llava"
    snapshot = repo / "snapshots" / ("0" * 40)
    tiny_config(300).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    code = ("from mukv.models.loading import model_geometry; "
            "g = model_geometry('pretrained', 'someone/cached-llava', 'cpu', 'float32'); "
            "print('geometry', g.num_layers, g.tokens_per_frame)")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=offline_env(tmp_path, "closed_endpoint"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "geometry 2 16" in proc.stdout
    assert "Retry" not in proc.stderr and time.monotonic() - started < 60
    assert "Could not reach the Hub" not in proc.stderr  # decided once: no request was even tried


def test_a_model_folder_that_does_not_exist_is_named():
    from mukv.errors import ConfigError
    from mukv.models.loading import model_geometry

    with pytest.raises(ConfigError, match=r"model.path.*folder not found: /nonexistent/models/llava-ov-7b"):
        model_geometry("pretrained", "/nonexistent/models/llava-ov-7b", "cpu", "float32")


# ------------------------------------------------------------------------ 2. nano on real data warns
def test_nano_model_on_an_rvs_dataset_warns_once_before_streaming(tmp_path):
    (tmp_path / "ego").mkdir()
    frames = np.random.default_rng(0).integers(0, 255, (6, 112, 112, 3), dtype=np.uint8)
    np.save(tmp_path / "ego" / "v1.npy", frames)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"video_id": "v1", "video_path": "/data/rvs/ego/v1.npy", "duration": 6,
                                "conversations": [{"question": "what?", "answer": "x", "start_time": 0,
                                                   "end_time": 3}]}]))
    out = tmp_path / "r"
    proc = run_cli(f"hydra.run.dir={out}", "dataset=rvs_ego", f"dataset.annotation={ann}",
                   f"dataset.data_root={tmp_path}", "dataset.sample_fps=1", "engine.max_new_tokens=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = (out / "run.log").read_text()
    assert log_text.count(NANO_WARNING) == 1 and "rvs_ego" in log_text
    lines = log_text.splitlines()
    warned = next(i for i, line in enumerate(lines) if NANO_WARNING in line)
    loading = next(i for i, line in enumerate(lines) if "loading model" in line)
    assert warned < loading and "[WARNING]" in lines[warned]  # before the model loads and anything streams
    assert (proc.stdout + proc.stderr).count(NANO_WARNING) == 1


# --------------------------------------------- 3 + 4. figures in every run folder; accuracy with its interval
def test_every_run_folder_gets_figures_and_accuracy_with_interval_and_count(tmp_path):
    out = tmp_path / "r"
    proc = run_cli(f"hydra.run.dir={out}", "experiment=smoke")  # logger=none: no W&B
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("accuracy_by_age", "stream_memory_latency"):
        png = out / "figures" / f"{name}.png"
        assert png.is_file(), name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000, name
    assert not (out / "wandb").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    lo, hi = wilson_interval(metrics["correct"], metrics["judged"])
    assert metrics["judged"] == 2
    assert metrics["accuracy_lo"] == pytest.approx(lo) and metrics["accuracy_hi"] == pytest.approx(hi)
    assert lo <= metrics["accuracy"] <= hi
    for bucket in (*metrics["by_age"].values(), *metrics["by_type"].values()):
        assert bucket["accuracy_lo"] == pytest.approx(wilson_interval(bucket["correct"], bucket["judged"])[0])
    (line,) = [s for s in proc.stdout.splitlines() if s.strip().startswith("accuracy")]
    assert f"{100 * metrics['accuracy']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%, n=2 judged)" in line
    assert NANO_WARNING not in proc.stdout + proc.stderr  # the synthetic benchmark is what nano knows


def test_format_summary_without_judged_answers_has_no_interval():
    from mukv.train_eval import format_summary

    text = format_summary({"method": "full", "questions": 3, "accuracy": None, "judged": 0})
    assert "CI" not in text and "accuracy       None" in text


def test_results_tables_carry_the_interval_and_the_question_count(tmp_path):
    """reproduce-table's results.md / results.csv (and the multirun table built from them); a run written
    before metrics.json stored the interval gets it from its correct / judged counts."""
    from mukv.report.tables import RunInfo, results_frame, write_tables

    old = {"method": "full", "dataset": "syn", "questions": 10, "judged": 10, "correct": 5, "accuracy": 0.5}
    new = {"method": "rekv", "dataset": "syn", "questions": 8, "judged": 8, "correct": 8, "accuracy": 1.0,
           "accuracy_lo": wilson_interval(8, 8)[0], "accuracy_hi": 1.0}
    runs = [RunInfo(tmp_path / "a", old, {}), RunInfo(tmp_path / "b", new, {})]
    write_tables(runs, tmp_path / "t")
    md = (tmp_path / "t" / "results.md").read_text()
    lo, hi = wilson_interval(5, 10)
    assert f"| full | {50:.1f} ({100 * lo:.1f}-{100 * hi:.1f}), n=10 |" in md  # method x dataset table
    assert f"| 50.0 | {100 * lo:.1f}-{100 * hi:.1f} |" in md  # per-dataset table: acc %, 95% CI
    assert "| rekv | 100.0 (67.6-100.0), n=8 |" in md and "95% CI" in md
    df = results_frame(runs)
    assert df.accuracy_lo_pct.tolist() == pytest.approx([100 * lo, 100 * wilson_interval(8, 8)[0]])
    import pandas as pd

    csv = pd.read_csv(tmp_path / "t" / "results.csv")
    assert {"accuracy_lo_pct", "accuracy_hi_pct", "judged"} <= set(csv.columns)


def test_make_run_table_and_progress_lines_carry_the_interval_and_count(tmp_path, capsys):
    """`make run` is experiments/nano_benchmark.py --preset quick: each method's line and the table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nano_benchmark", ROOT / "experiments" / "nano_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    df = bench.main(["--preset", "quick", "--videos", "1", "--lengths", "40", "--methods", "full",
                     "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    (r,) = df.itertuples()
    lo, hi = wilson_interval(round(r.accuracy * r.questions), r.questions)
    assert f"(95% CI {100 * lo:.0f}-{100 * hi:.0f}%, n={r.questions})" in printed
    assert f"| {r.questions} | {100 * r.accuracy:.0f} ({100 * lo:.0f}-{100 * hi:.0f}) |" in printed


# ------------------------------------------------------------------------------------------ 5. make bench
def test_make_bench_says_how_long_it_takes_before_it_starts():
    proc = subprocess.run(["make", "-o", ".venv/.installed-dev", "--dry-run", "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    says = next(i for i, line in enumerate(lines) if "make bench takes about" in line)
    runs = next(i for i, line in enumerate(lines) if "mukv.bench" in line and "--model 0.5b" in line)
    assert says < runs
