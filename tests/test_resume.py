"""A run folder never lies: resume after a kill at every stage gives the uninterrupted run's files, results
made under another fingerprint are not reused silently, one run per folder, torn rows, stale spill folders,
and a dataset that selects nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ArrayFrames, random_frames
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mukv.cache.block_store import SPILL_OWNER, StoreOptions, clean_stale_spill_dirs
from mukv.config import register_configs
from mukv.data.types import Question, VideoSample
from mukv.engine import EngineSettings, StreamingEngine
from mukv.errors import MukvError, VideoError
from mukv.report.outputs import RowJournal, journal_path
from mukv.resume import FAULT_EXIT, LOCK, FaultInjected, RunLock, RunLockedError, StaleResultsError
from mukv.train_eval import train_eval

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()

# Two short synthetic videos, two questions each, ReKV offloading every block to spill files.
BASE = ["model=tiny", "cache=rekv", "cache.n_local=64", "cache.ram_budget_gb=0", "dataset.synthetic.num_videos=2",
        "dataset.synthetic.duration_s=40", "dataset.synthetic.questions_per_video=2", "engine.max_new_tokens=4",
        "engine.progress=false", "engine.answer_text=keep_newlines"]
TIMING_COLUMNS = {"encode_s", "recall_s", "ttft_s", "latency_s", "encode_fps", "peak_rss_bytes", "peak_cuda_bytes"}


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=list(overrides))
    cfg.paths.root_dir = str(ROOT)
    cfg.paths.output_dir = "/nonexistent/set-by-the-test"
    return cfg


def run_cli(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mukv.run", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}, timeout=300)


def without_timing(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c in TIMING_COLUMNS]).reset_index(drop=True)


def outputs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(predictions, memory_stats, metrics) of a run folder, timing left out."""
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    memory = pd.read_csv(out / "memory_stats.csv", keep_default_na=False)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics = {k: v for k, v in metrics.items() if not k.endswith("_s") and k not in TIMING_COLUMNS}
    return without_timing(preds), without_timing(memory), metrics


def assert_same_outputs(out: Path, reference: Path) -> None:
    preds, memory, metrics = outputs(out)
    ref_preds, ref_memory, ref_metrics = outputs(reference)
    pd.testing.assert_frame_equal(memory, ref_memory)
    pd.testing.assert_frame_equal(preds, ref_preds)
    assert metrics == ref_metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    spill = tmp_path_factory.mktemp("reference-spill")
    assert train_eval(config(*BASE, f"cache.spill_dir={spill}"), out).ok
    memory = pd.read_csv(out / "memory_stats.csv")
    assert len(memory) == 2 and (memory.frames_encoded == 19).all() and (memory.questions == 2).all()
    return out


# ----------------------------------------------------------------------------- kills at every stage
@pytest.mark.parametrize("fault", ["answer:1", "answer:2", "video:1", "answer:3", "metrics:1"])
def test_a_run_stopped_at_any_stage_resumes_to_the_uninterrupted_files(tmp_path, reference, monkeypatch, fault):
    """answer:2 is the kill between a video's last answer and its memory row (the resumed row said
    frames_encoded 0, and metrics.json's KV bytes, frames, hours and GB per hour were wrong); every figure of
    memory_stats.csv and metrics.json must be the uninterrupted run's, timing aside."""
    cfg = config(*BASE, f"cache.spill_dir={tmp_path / 'spill'}")
    monkeypatch.setenv("MUKV_FAULT", f"{fault}:raise")
    with pytest.raises(FaultInjected):
        train_eval(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.delenv("MUKV_FAULT")
    assert train_eval(cfg, tmp_path / "run").ok
    assert_same_outputs(tmp_path / "run", reference)


def test_a_killed_process_leaves_lock_and_spill_folder_and_the_next_start_takes_both_over(tmp_path, reference,
                                                                                           caplog):
    """A real kill (os._exit, no clean-up) after the first answer: the lock file and the spill folder stay
    behind; the next start takes the lock over, removes the folder and ends with the uninterrupted files."""
    out, spill = tmp_path / "run", tmp_path / "spill"
    proc = run_cli(*BASE, f"cache.spill_dir={spill}", f"hydra.run.dir={out}", env={"MUKV_FAULT": "answer:1"})
    assert proc.returncode == FAULT_EXIT, proc.stderr[-2000:]
    left = list(spill.glob("mukv-blocks-*"))
    assert len(left) == 1 and (left[0] / SPILL_OWNER).is_file() and (out / LOCK).is_file()
    with caplog.at_level("INFO", logger="mukv"):
        assert train_eval(config(*BASE, f"cache.spill_dir={spill}"), out).ok
    assert not left[0].exists() and not (out / LOCK).exists()
    assert "took over the lock left by pid" in caplog.text and "spill folder(s) left by runs that died" in caplog.text
    assert "reusing 1 answered question(s) and 0 finished video(s)" in caplog.text
    assert_same_outputs(out, reference)


def test_a_video_that_fails_mid_stream_records_what_was_streamed(tiny_llm):
    """The row of a video that breaks mid-stream said frames_encoded 0; it now holds what was streamed and
    answered until the error."""

    class BreaksAt(ArrayFrames):
        def frames(self, start, stop):
            if stop > 12:
                raise VideoError("v.mp4", f"frames {start}:{stop} could not be decoded")
            return super().frames(start, stop)

    from mukv.cache import SlidingWindowCache

    questions = [Question(f"q{i}", f"question {i}", "a", 0.0, t) for i, t in enumerate((4.0, 8.0, 16.0))]
    sample = VideoSample("v", 20.0, questions, BreaksAt(random_frames(20)))
    engine = StreamingEngine(tiny_llm, SlidingWindowCache(n_local=64),
                             EngineSettings(encode_chunk_size=4, max_new_tokens=2, progress=False))
    answers = []
    with pytest.raises(VideoError) as err:
        engine.run_video(sample, answers.append, skip={"q0"})
    record = err.value.video_record
    assert [a.qid for a in answers] == ["q1"]
    assert record.frames_encoded == 12 and record.questions == 2 and record.kv_bytes > 0 and "12:16" in record.error


# --------------------------------------------------------------------------------------- fingerprint
def test_results_made_under_another_setup_are_not_reused_silently(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = config(*BASE, "dataset.synthetic.num_videos=1", "cache.ram_budget_gb=null")
    assert train_eval(cfg, out).ok
    stored = json.loads((out / "fingerprint.json").read_text())
    assert {"config", "annotation", "checkpoint", "code", "versions", "git_commit"} <= set(stored)
    assert "progress" not in stored["config"]["engine"] and "engine.py" in stored["code"]
    # the same command in the same folder reuses, and says what it reused
    with caplog.at_level("INFO", logger="mukv"):
        assert train_eval(cfg, out).ok
    assert "reusing 2 answered question(s) and 1 finished video(s) of 1" in caplog.text
    # a config edit (a YAML file, or hydra.run.dir pointing two commands at one folder)
    with pytest.raises(StaleResultsError, match=r"engine.max_new_tokens: 4 -> 6.*resume=false.*resume=force"):
        train_eval(config(*BASE, "dataset.synthetic.num_videos=1", "cache.ram_budget_gb=null",
                          "engine.max_new_tokens=6"), out)
    # results made by other code (the stored digest of engine.py differs from the file's)
    stored["code"]["engine.py"] = "0" * 16
    (out / "fingerprint.json").write_text(json.dumps(stored))
    with pytest.raises(StaleResultsError, match="code: mukv/engine.py changed"):
        train_eval(cfg, out)
    # resume=force reuses them and says so; the fingerprint then records what it was reused despite
    caplog.clear()
    with caplog.at_level("INFO", logger="mukv"):
        cfg.resume = "force"
        assert train_eval(cfg, out).ok
    assert "resume=force: reusing 2 answered question(s)" in caplog.text and "mukv/engine.py" in caplog.text
    assert json.loads((out / "fingerprint.json").read_text())["reused_despite"] == ["code: mukv/engine.py changed"]
    # a folder without a fingerprint (results from before fingerprints) is not trusted either
    (out / "fingerprint.json").unlink()
    cfg.resume = True
    with pytest.raises(StaleResultsError, match="no readable fingerprint.json"):
        train_eval(cfg, out)
    cfg.resume = "sometimes"
    with pytest.raises(MukvError, match="config field 'resume'"):
        train_eval(cfg, out)


def test_an_edited_checkpoint_is_named(tmp_path):
    from mukv.models.nano import ASSET_DIR

    ckpt = tmp_path / "nano"
    shutil.copytree(ASSET_DIR, ckpt)
    cfg = config("experiment=smoke", "model=nano", f"model.path={ckpt}", "engine.max_new_tokens=2")
    assert train_eval(cfg, tmp_path / "run").ok
    with (ckpt / "model.safetensors").open("r+b") as f:  # retrained in place, say
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(StaleResultsError, match=f"checkpoint {ckpt}: model.safetensors changed"):
        train_eval(cfg, tmp_path / "run")


GOOD_VIDEO = {"video_id": "v1", "video_path": "/data/rvs/ego/v1.npy", "duration": 12,
              "conversations": [{"question": "what?", "answer": "x", "start_time": 0, "end_time": 6}]}


def test_an_edited_annotation_file_is_named_by_the_same_command(tmp_path):
    """The same command after an edit to the annotation file returned the old predictions (exit 0) and never
    asked the new question."""
    (tmp_path / "ego").mkdir()
    np.save(tmp_path / "ego" / "v1.npy", random_frames(12))
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([GOOD_VIDEO]))
    out = tmp_path / "run"
    args = ["model=tiny", "dataset=rvs_ego", f"dataset.annotation={ann}", f"dataset.data_root={tmp_path}",
            "dataset.sample_fps=1", "engine.max_new_tokens=2", "engine.progress=false"]
    assert train_eval(config(*args), out).ok
    edited = dict(GOOD_VIDEO, conversations=GOOD_VIDEO["conversations"] + [
        {"question": "and now?", "answer": "y", "start_time": 0, "end_time": 10}])
    ann.write_text(json.dumps([edited]))
    proc = run_cli(*args, f"hydra.run.dir={out}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"annotation file {ann}: content changed" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(*args, f"hydra.run.dir={out}", "resume=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(pd.read_csv(out / "predictions.csv").question) == ["what?", "and now?"]
    (backup,) = out.glob("previous-*")
    assert {"predictions.csv", "predictions.jsonl", "fingerprint.json"} <= {p.name for p in backup.iterdir()}
    proc = run_cli(*args, f"hydra.run.dir={out}")  # the same command again: says on stdout what it reused
    assert proc.returncode == 0 and "reusing 2 answered question(s) and 1 finished video(s) of 1" in proc.stdout


# ---------------------------------------------------------------------------------------------- lock
def test_a_second_run_into_a_held_folder_exits_2_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom mukv.resume import RunLock\nRunLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\ntime.sleep(600)"), str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("experiment=smoke", "model=tiny", f"hydra.run.dir={out}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in proc.stderr
        assert not (out / "predictions.jsonl").exists() and not (out / "predictions.csv").exists()
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == holder.pid  # left behind by the kill
    with RunLock(out) as lock:
        assert lock.stale["pid"] == holder.pid
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    assert not (out / LOCK).exists()


def test_a_lock_naming_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "since": "then"}))
    with pytest.raises(RunLockedError, match=f"pid 1 on host elsewhere.example.*delete {tmp_path / LOCK}"):
        RunLock(tmp_path).acquire()


# ----------------------------------------------------------------------------------- torn rows
ROW_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ['a "quoted"\nanswer', "line one\r\nline two", "\n", ",", '"', "é\u2028x"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(ROW_TEXT, min_size=1, max_size=5), cut=st.floats(0, 1), csv_cut=st.floats(0, 1))
def test_any_prefix_of_the_journal_is_readable_and_resumable(tmp_path_factory, texts, cut, csv_cut):
    folder = tmp_path_factory.mktemp("journal")
    csv_path = folder / "predictions.csv"
    journal = RowJournal(csv_path)
    rows = [{"qid": f"q{i}", "prediction": t, "score": i / 3, "meta": {"k": t}} for i, t in enumerate(texts)]
    for row in rows:
        journal.append(row)
    data, table = journal_path(csv_path).read_bytes(), csv_path.read_bytes()
    journal_path(csv_path).write_bytes(data[: int(cut * len(data))])  # a kill mid-write, at any byte
    csv_path.write_bytes(table[: int(csv_cut * len(table))])
    resumed = RowJournal(csv_path)
    complete = data[: int(cut * len(data))].count(b"\n")
    assert [r["qid"] for r in resumed.rows] == [r["qid"] for r in rows[:complete]]
    assert [r["prediction"] for r in resumed.rows] == texts[:complete]
    resumed.append({"qid": "new", "prediction": 'x\n"y', "score": 0.5, "meta": {}})
    resumed.sync()
    again = RowJournal(csv_path)
    assert [r["qid"] for r in again.rows] == [r["qid"] for r in rows[:complete]] + ["new"]
    table = pd.read_csv(csv_path, keep_default_na=False, dtype=str)
    assert list(table.qid) == [r["qid"] for r in again.rows]
    assert list(table.prediction) == [r["prediction"] for r in again.rows]


def test_a_whole_csv_judged_again_in_place_is_kept_and_a_short_one_is_rendered_again(tmp_path):
    csv_path = tmp_path / "predictions.csv"
    journal = RowJournal(csv_path, ident="qid")
    for i in range(3):
        journal.append({"qid": f"q{i}", "prediction": "a\nb", "judge_correct": False})
    table = pd.read_csv(csv_path, keep_default_na=False, dtype=str)
    table["judge_correct"] = "True"  # as mukv.report.rejudge rewrites it
    table.to_csv(csv_path, index=False)
    assert not RowJournal(csv_path, ident="qid").sync()
    assert (pd.read_csv(csv_path, keep_default_na=False, dtype=str).judge_correct == "True").all()
    csv_path.write_text(csv_path.read_text()[:-5])  # its last row cut short
    assert RowJournal(csv_path, ident="qid").sync()
    table = pd.read_csv(csv_path, keep_default_na=False, dtype=str)
    assert list(table.qid) == ["q0", "q1", "q2"] and (table.judge_correct == "False").all()


def test_a_csv_row_torn_inside_a_quoted_question_no_longer_breaks_the_folder(tmp_path, reference, monkeypatch):
    """A torn write ending at a newline inside a quoted field made predictions.csv unreadable forever
    (pandas ParserError on every rerun)."""
    cfg = config(*BASE, f"cache.spill_dir={tmp_path / 'spill'}")
    monkeypatch.setenv("MUKV_FAULT", "answer:3:raise")
    with pytest.raises(FaultInjected):
        train_eval(cfg, tmp_path / "run")
    monkeypatch.delenv("MUKV_FAULT")
    with (tmp_path / "run" / "predictions.csv").open("a") as f:
        f.write('syn-s0-v0001,syn-s0-v0001_q1,"How many rings have\n')
    assert train_eval(cfg, tmp_path / "run").ok
    assert_same_outputs(tmp_path / "run", reference)


# ------------------------------------------------------------------------------------ spill folders
def test_only_spill_folders_of_dead_processes_of_this_host_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    made = {}
    for name, owner in {"dead": {"pid": dead.pid, "host": host}, "live": {"pid": os.getpid(), "host": host},
                        "remote": {"pid": dead.pid, "host": "elsewhere.example"}, "no-owner": None}.items():
        d = tmp_path / f"mukv-blocks-{name}"
        d.mkdir()
        (d / "00000000.k").write_bytes(b"kv")
        if owner:
            (d / SPILL_OWNER).write_text(json.dumps(owner))
        made[name] = d
    other = tmp_path / "not-ours"
    other.mkdir()
    (other / SPILL_OWNER).write_text(json.dumps({"pid": dead.pid, "host": host}))
    assert clean_stale_spill_dirs(tmp_path) == [made["dead"]]
    assert [n for n, d in made.items() if d.exists()] == ["live", "remote", "no-owner"] and other.exists()
    # the next store that spills there cleans at its start too
    (made["dead"]).mkdir()
    (made["dead"] / SPILL_OWNER).write_text(json.dumps({"pid": dead.pid, "host": host}))
    StoreOptions(ram_budget_gb=0, spill_dir=str(tmp_path / "fresh-parent")).new_store(torch.device("cpu"))
    assert made["dead"].exists()  # another parent: untouched
    StoreOptions(ram_budget_gb=0, spill_dir=str(tmp_path)).new_store(torch.device("cpu"))
    assert not made["dead"].exists()


# --------------------------------------------------------------------------------- empty selections
@pytest.mark.parametrize("case", ["empty_annotation", "unknown_video_id"])
def test_a_dataset_that_selects_nothing_exits_2(tmp_path, case):
    if case == "empty_annotation":
        ann = tmp_path / "ann.json"
        ann.write_text("[]")
        args, expected = ["dataset=rvs_ego", f"dataset.annotation={ann}", f"dataset.data_root={tmp_path}"], str(ann)
    else:
        args, expected = ["dataset.video_ids=[syn-s0-v9999]"], "config field 'dataset.video_ids'"
    smoke = [] if case == "empty_annotation" else ["experiment=smoke"]  # smoke sizes a synthetic stream
    proc = run_cli(*smoke, "model=tiny", f"hydra.run.dir={tmp_path / 'run'}", *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "loading model" not in proc.stdout and not (tmp_path / "run" / "predictions.csv").exists()
