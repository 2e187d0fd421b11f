"""dataset=ovo_bench: the real annotation file (../shared/data/ovo/), malformed records, the official prompts'
meaning and scoring per task / category / overall, the published reference row, and `make reproduce-table
DATA=ovo` saying exactly what is missing."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import SHARED, compose_cfg

from mukv.config import register_configs
from mukv.data.choice import LETTERS, parse_options
from mukv.data.ovo_bench import FORWARD_TASKS, MULTIPLE_CHOICE_TASKS, TASK_CATEGORIES, TASKS, load_ovo_bench
from mukv.errors import DataError, VideoError
from mukv.judge.choice import ChoiceJudge

ROOT = Path(__file__).resolve().parents[1]
OVO_FILE = SHARED / "data" / "ovo" / "ovo_bench_new.json"
# The published record counts per task (OVO-Bench's ovo_bench_new.json)
RECORDS_PER_TASK = {"EPM": 297, "HLD": 186, "OJR": 184, "STU": 178, "OCR": 149, "ASI": 148, "ATR": 116, "ACR": 109,
                    "FPD": 101, "REC": 82, "CRR": 48, "SSR": 42}
register_configs()


@pytest.fixture(scope="module")
def raw() -> list[dict]:
    assert OVO_FILE.is_file(), f"the OVO-Bench annotation file is expected at {OVO_FILE} (../shared beside the repo)"
    return json.loads(OVO_FILE.read_text())


def ovo_cfg(*overrides: str, data_root: str = "/nonexistent/ovo-videos"):
    return compose_cfg("dataset=ovo_bench", f"dataset.annotation={OVO_FILE}", f"dataset.data_root={data_root}",
                       "dataset.check_videos=false", *overrides)


# ------------------------------------------------------------------------------------------ the real file
def test_every_record_of_the_real_file_parses(raw):
    from mukv.train_eval import build_dataset

    videos = build_dataset(ovo_cfg())
    questions = [q for v in videos for q in v.questions]
    records = Counter(q.qtype for q in questions if q.qtype in MULTIPLE_CHOICE_TASKS)
    records.update(Counter(q.qtype for q in {(q.qtype, q.meta["ovo_id"]): q for q in questions
                                             if q.qtype in FORWARD_TASKS}.values()))
    assert dict(records) == RECORDS_PER_TASK and sum(records.values()) == len(raw) == 1640
    probes = Counter(r["task"] for r in raw if "test_info" in r for _ in r["test_info"])
    assert Counter(q.qtype for q in questions if q.qtype in FORWARD_TASKS) == probes
    assert len(questions) == len({q.qid for q in questions}) == 1468 + sum(probes.values())
    # one sample per source video, streamed once; its questions in time order
    assert [v.video_id for v in videos] == list(dict.fromkeys(r["video"] for r in raw))
    assert all([q.end_time for q in v.questions] == sorted(q.end_time for q in v.questions) for v in videos)
    by_id = {r["id"]: r for r in raw}
    for v in videos:
        assert v.meta["video_path"] == f"/nonexistent/ovo-videos/{v.video_id}"
        for q in v.questions:
            rec = by_id[q.meta["ovo_id"]]
            assert rec["video"] == v.video_id and q.qtype == rec["task"] and q.meta["category"] in TASK_CATEGORIES
            realtime = rec["realtime"] if q.qtype in MULTIPLE_CHOICE_TASKS else rec["test_info"][q.meta["probe"]]["realtime"]
            assert q.end_time == max(math.ceil(realtime), 2.0)  # the official clip's end; a frame at 0.5 fps
            if q.qtype in MULTIPLE_CHOICE_TASKS:
                assert q.answer == LETTERS[rec["gt"]] and parse_options(q.question) == rec["options"]
                assert rec["question"] in q.question
            elif q.qtype == "REC":
                assert q.answer == str(rec["test_info"][q.meta["probe"]]["count"]) and rec["activity"] in q.question
            else:
                probe = rec["test_info"][q.meta["probe"]]
                assert q.answer == ("Yes" if probe["type"] == 1 else "No")
                assert (probe["step"] if q.qtype == "SSR" else rec["question"]) in q.question


def test_prompts_carry_the_official_instructions_meaning(raw):
    from mukv.data.choice import crr_prompt, rec_prompt, ssr_prompt

    mc = next(q for v in load_ovo_bench(OVO_FILE, "/x", 0.5, tasks=["EPM"]) for q in v.questions)
    assert mc.question.startswith("Question: ") and "\nOptions:\nA. " in mc.question
    assert "letter of the option" in mc.question and "nothing else" in mc.question
    assert "How many times did they breaking something?" in rec_prompt("breaking something")
    assert "single number" in rec_prompt("x") and "in total" in rec_prompt("x") and "one complete motion" in rec_prompt("x")
    assert "right now" in ssr_prompt("put on the hair extensions") and "Yes or No" in ssr_prompt("x")
    assert "latest frames" in crr_prompt("What happens?") and "enough information" in crr_prompt("x")
    assert "Yes or No" in crr_prompt("x")


def test_tasks_select_the_questions_and_drop_videos_without_any(raw):
    from mukv.train_eval import build_dataset

    videos = build_dataset(ovo_cfg("dataset.tasks=[REC,EPM]"))
    assert {q.qtype for v in videos for q in v.questions} == {"REC", "EPM"}
    assert len(videos) == len({r["video"] for r in raw if r["task"] in ("REC", "EPM")})
    assert sum(len(v.questions) for v in videos) == 297 + sum(len(r["test_info"]) for r in raw if r["task"] == "REC")
    with pytest.raises(Exception, match="tasks"):
        compose_cfg("dataset=ovo_bench", "dataset.tasks=[EPM,XYZ]")


# ------------------------------------------------------------------------------------------ malformed records
def _small(raw: list[dict]) -> list[dict]:
    """One record of each shape from the real file: EPM (multiple choice), REC, SSR, CRR."""
    return [copy.deepcopy(next(r for r in raw if r["task"] == t)) for t in ("EPM", "REC", "SSR", "CRR")]


def _set(path: str, value):
    def mutate(rec: dict) -> None:
        *keys, last = path.split(".")
        node = rec
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is KeyError:
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


DELETE = KeyError
MALFORMED = [  # (record index in _small, mutation, the field the error names)
    (0, _set("question", DELETE), "question"), (0, _set("question", "  "), "question"),
    (0, _set("options", "a, b"), "options"), (0, _set("options", ["only one"]), "options"),
    (0, _set("options.1", 3), "options[1]"), (0, _set("gt", 4), "gt"), (0, _set("gt", "2"), "gt"),
    (0, _set("gt", True), "gt"), (0, _set("gt", DELETE), "gt"), (0, _set("realtime", -1), "realtime"),
    (0, _set("realtime", "215"), "realtime"), (0, _set("realtime", float("inf")), "realtime"),
    (0, _set("task", "XYZ"), "task"), (0, _set("video", ""), "video"), (0, _set("id", "0"), "id"),
    (1, _set("id", 0), "id"), (1, _set("test_info", []), "test_info"), (1, _set("activity", DELETE), "activity"),
    (1, _set("test_info.1.count", -1), "test_info[1].count"), (1, _set("test_info.2.count", 1.5), "test_info[2].count"),
    (1, _set("test_info.0", 5), "test_info[0]"), (2, _set("test_info.2.type", 2), "test_info[2].type"),
    (2, _set("test_info.0.step", DELETE), "test_info[0].step"), (3, _set("test_info.0.realtime", DELETE),
                                                                 "test_info[0].realtime"),
    (3, _set("question", ""), "question"), (3, _set("test_info", {"realtime": 3}), "test_info"),
]


def test_a_valid_small_file_loads(raw, tmp_path):
    path = tmp_path / "ovo.json"
    path.write_text(json.dumps(_small(raw)))
    videos = load_ovo_bench(path, tmp_path, 0.5)
    assert sorted({q.qtype for v in videos for q in v.questions}) == ["CRR", "EPM", "REC", "SSR"]


@pytest.mark.parametrize("index,mutate,field", MALFORMED, ids=[f"{i}-{f}-{n}" for n, (i, _, f) in enumerate(MALFORMED)])
def test_a_malformed_record_is_one_error_naming_the_record_and_field(raw, tmp_path, index, mutate, field):
    records = _small(raw)
    mutate(records[index])
    path = tmp_path / "ovo.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as err:
        load_ovo_bench(path, tmp_path, 0.5)
    rid = records[index]["id"]
    assert err.value.field == field and str(err.value).startswith(f"{path}, record #{index}")
    if field != "id":
        assert err.value.record == f"#{index} (id {rid})"
    assert f"field '{field}'" in str(err.value)


def test_a_record_that_is_not_an_object_and_a_file_that_is_not_a_list(raw, tmp_path):
    path = tmp_path / "ovo.json"
    path.write_text(json.dumps([*_small(raw), "EPM"]))
    with pytest.raises(DataError, match=r"record #4: expected an object, got str"):
        load_ovo_bench(path, tmp_path, 0.5)
    path.write_text(json.dumps({"records": []}))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_ovo_bench(path, tmp_path, 0.5)


def test_a_bad_record_stops_the_run_with_one_line_before_any_model_loads(raw, tmp_path):
    records = _small(raw)
    records[2]["test_info"][1]["type"] = "yes"
    path = tmp_path / "ovo.json"
    path.write_text(json.dumps(records))
    proc = subprocess.run([sys.executable, "-m", "mukv.run", "dataset=ovo_bench", f"dataset.annotation={path}",
                           f"dataset.data_root={tmp_path}", "judge=choice", f"hydra.run.dir={tmp_path}/run"],
                          cwd=ROOT, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}, record #2 (id {records[2]['id']}), "
                                                   "field 'test_info[1].type': must be one of 0, 1")
    log = tmp_path / "run" / "run.log"
    assert not log.exists() or "loading model" not in log.read_text()


def test_missing_videos_and_paths_outside_the_root_are_named(raw, tmp_path):
    path = tmp_path / "ovo.json"
    records = _small(raw)
    path.write_text(json.dumps(records))
    with pytest.raises(VideoError, match=r"4 of 4 videos of .* not found under data root"):
        load_ovo_bench(path, tmp_path / "videos", 0.5, check_videos=True)
    records[1]["video"] = "../../elsewhere/x.mp4"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match="outside the data root") as err:
        load_ovo_bench(path, tmp_path / "videos", 0.5)
    assert err.value.field == "video" and err.value.record == f"#1 (id {records[1]['id']})"
    assert load_ovo_bench(path, tmp_path / "videos", 0.5, allow_outside_root=True)


# ------------------------------------------------------------------------------------------------ scoring
def test_scoring_reproduces_a_hand_computed_example_per_category():
    """Answers judged by judge=choice, then metrics.summarize with the dataset's own options: a task's accuracy
    over its questions / probes, a category the mean of its tasks', overall the mean of the categories'."""
    from mukv.data.choice import choice_prompt
    from mukv.data.datasets import OVOBenchDataset, scoring_options
    from mukv.report.metrics import summarize
    from mukv.train_eval import format_summary

    mc = choice_prompt("Q?", ["w", "x", "y", "z"])
    cases = [  # (task, question, reference, answer)
        ("EPM", mc, "A", "A"), ("EPM", mc, "B", "(B) x"),                       # EPM 2/2
        ("ASI", mc, "C", "C"), ("ASI", mc, "D", "I do not know"),               # ASI 1/2 (one invalid)
        ("HLD", mc, "A", "B"),                                                  # HLD 0/1 -> backward 0.5
        ("STU", mc, "D", "The answer is D"),                                    # STU 1/1
        ("OCR", mc, "A", "E"),                                                  # OCR 0/1 (past the options)
        ("OJR", mc, "A", "a"), ("OJR", mc, "B", "C"), ("OJR", mc, "C", "D"), ("OJR", mc, "D", "A"),  # 1/4
        ("REC", "", "3", "3"), ("REC", "", "3", "2"), ("REC", "", "3", "three"),  # REC 2/3
        ("SSR", "", "Yes", "Yes"), ("SSR", "", "Yes", "No"),                    # SSR 1/2
        ("CRR", "", "No", "No."),                                               # CRR 1/1
    ]
    judge, rows = ChoiceJudge(), []
    for i, (task, question, ref, answer) in enumerate(cases):
        v = judge.judge(question, ref, answer)
        rows.append({"qid": f"q{i}", "qtype": task, "start_time": 0.0, "end_time": 10.0, "error": "",
                     "judge_correct": v.correct, "judge_score": v.score, "judge_error": v.error})
    options = scoring_options(compose_cfg("dataset=ovo_bench").dataset)
    assert options == {"categories": TASK_CATEGORIES, "macro_average": True} and OVOBenchDataset.judge == "choice"
    m = summarize(pd.DataFrame(rows), pd.DataFrame(), 0.5, **options)
    assert m["accuracy_by_type"] == pytest.approx({"EPM": 1, "ASI": 0.5, "HLD": 0, "STU": 1, "OCR": 0, "OJR": 0.25,
                                                   "REC": 2 / 3, "SSR": 0.5, "CRR": 1})
    cats = m["by_category"]
    assert {c: cats[c]["macro_accuracy"] for c in cats} == pytest.approx(
        {"backward": 0.5, "realtime": 1.25 / 3, "forward": (2 / 3 + 0.5 + 1) / 3})
    assert {c: (cats[c]["correct"], cats[c]["judged"]) for c in cats} == {"backward": (3, 5), "realtime": (2, 6),
                                                                          "forward": (4, 6)}  # pooled, beside
    assert m["macro_accuracy"] == pytest.approx((0.5 + 1.25 / 3 + (2 / 3 + 0.5 + 1) / 3) / 3)  # 0.5463
    assert (m["judged"], m["correct"], m["invalid_answers"], m["invalid_judgments"]) == (17, 9, 2, 0)
    assert cats["backward"]["types"] == ["EPM", "ASI", "HLD"]
    text = format_summary({**m, "method": "full"})
    assert "mean of its types 50.00% (EPM 100.0%, ASI 50.0%, HLD 0.0%)" in text and "overall      54.63%" in text
    assert "invalid answ.  2" in text


def test_an_ovo_run_streams_each_video_once_in_time_order(raw, tmp_path):
    """The entry point on a small OVO-Bench file with real mp4 files (model=tiny: the answers are noise):
    every question of a video answered in time order, scored by judge=choice, with the per-task, per-category
    and overall scores in metrics.json equal to the ones computed here from the verdicts."""
    from mukv.train_eval import train_eval
    from mukv.video.sources import write_mp4

    records = _small(raw)
    for rec, name in zip(records, ["a.mp4", "a.mp4", "b.mp4", "b.mp4"], strict=True):
        rec["video"] = f"clips/{name}"
    records[0]["realtime"], records[2]["test_info"] = 7.4, [{"realtime": 9, "step": "s", "type": 1},
                                                            {"realtime": 3, "step": "s", "type": 0}]
    records[1]["test_info"] = [{"realtime": 5, "count": 1}, {"realtime": 2, "count": 0}]
    records[3]["test_info"] = [{"realtime": 4, "type": 0}, {"realtime": 8.5, "type": 1}]
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "clips").mkdir(exist_ok=True)
        write_mp4(tmp_path / "clips" / name, np.random.default_rng(0).integers(0, 255, (20, 64, 64, 3), np.uint8), fps=2)
    path = tmp_path / "ovo.json"
    path.write_text(json.dumps(records))
    cfg = compose_cfg("model=tiny", "dataset=ovo_bench", f"dataset.annotation={path}", f"dataset.data_root={tmp_path}",
                      "dataset.sample_fps=1", "judge=choice", "engine.max_new_tokens=2", "engine.progress=false")
    cfg.paths.output_dir = str(tmp_path / "run")
    result = train_eval(cfg, tmp_path / "run")
    assert result.ok, result.failures
    rows = pd.read_csv(tmp_path / "run" / "predictions.csv", keep_default_na=False)
    assert list(rows.video_id) == ["clips/a.mp4"] * 3 + ["clips/b.mp4"] * 4
    a, b = (records[0]["id"], records[1]["id"]), (records[2]["id"], records[3]["id"])
    assert list(rows.qid) == [f"ovo{a[1]}_p1", f"ovo{a[1]}_p0", f"ovo{a[0]}",  # ties keep the file's order
                              f"ovo{b[0]}_p1", f"ovo{b[1]}_p0", f"ovo{b[0]}_p0", f"ovo{b[1]}_p1"]
    assert list(rows.end_time) == [2, 5, 8, 3, 4, 9, 9] and list(rows.frames_seen) == [2, 5, 8, 3, 4, 9, 9]
    assert list(rows.answer) == ["0", "1", LETTERS[records[0]["gt"]], "No", "No", "Yes", "Yes"]
    memory = pd.read_csv(tmp_path / "run" / "memory_stats.csv", keep_default_na=False)
    assert list(memory.video_id) == ["clips/a.mp4", "clips/b.mp4"]  # each video streamed once
    correct = rows.judge_correct.astype(str) == "True"
    task_acc = correct.groupby(rows.qtype).mean().to_dict()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["accuracy_by_type"] == pytest.approx(task_acc)
    forward = np.mean([task_acc[t] for t in ("REC", "SSR", "CRR")])
    assert metrics["by_category"]["forward"]["macro_accuracy"] == pytest.approx(forward)
    assert metrics["macro_accuracy"] == pytest.approx((task_acc["EPM"] + forward) / 2)
    assert metrics["judged"] == 7 and metrics["invalid_answers"] == int(rows.judge_error.str.startswith("invalid").sum())


# ------------------------------------------------------------------------------------- the reference row
GRID = ROOT / "experiments" / "grids" / "ovo.yaml"
RESULTS = Path("/work/.mirror/JoeLeelyf+OVO-Bench/repo")  # the official repository, where a snapshot is at hand


def test_the_reference_row_counts_every_question_and_gives_the_published_scores(raw):
    from mukv.report.metrics import macro_scores

    (ref,) = yaml.safe_load(GRID.read_text())["references"]
    totals = {t: n for t, (_, n) in ref["correct_total"].items()}
    expected = Counter(r["task"] for r in raw if "options" in r)
    expected.update(Counter(r["task"] for r in raw if "test_info" in r for _ in r["test_info"]))
    assert totals == dict(expected) and list(totals) == list(TASKS)
    means, overall = macro_scores({t: c / n for t, (c, n) in ref["correct_total"].items()}, TASK_CATEGORIES)
    # OVO-Bench's score.py on results/LLaVA_OneVision: Backward 43.71, Realtime 64.02, Forward 50.50, Total 52.74
    assert {c: round(100 * v, 2) for c, v in means.items()} == {"backward": 43.71, "realtime": 64.02, "forward": 50.5}
    assert round(100 * overall, 2) == 52.74


@pytest.mark.skipif(not RESULTS.is_dir(), reason="no snapshot of JoeLeelyf/OVO-Bench on this machine")
def test_the_reference_counts_are_the_official_result_files_scored_here(tmp_path, raw):
    from mukv.data.ovo_bench import score_result_files

    files = []
    listing = subprocess.run(["git", "-C", str(RESULTS), "ls-tree", "--name-only", "HEAD", "results/LLaVA_OneVision/"],
                             capture_output=True, text=True, check=True).stdout.split()
    for name in listing:
        files.append(tmp_path / Path(name).name)
        files[-1].write_bytes(subprocess.run(["git", "-C", str(RESULTS), "show", f"HEAD:{name}"], capture_output=True,
                                             check=True).stdout)
    (ref,) = yaml.safe_load(GRID.read_text())["references"]
    stored = {t: tuple(v) for t, v in ref["correct_total"].items()}
    assert score_result_files(files, OVO_FILE) == stored == score_result_files(files)


def test_the_reference_row_is_rendered_beside_the_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import reproduce_table

    grid = reproduce_table.load_grid(GRID)
    breakdowns = reproduce_table.dataset_breakdowns(grid)
    assert breakdowns == {"ovo_bench": {c: list(t) for c, t in TASK_CATEGORIES.items()}}
    from mukv.report.tables import write_tables

    write_tables([], tmp_path, title=grid["title"], breakdowns=breakdowns, references=grid["references"])
    text = (tmp_path / "results.md").read_text()
    assert "No finished runs." in text and "## ovo_bench: accuracy by type (%)" in text
    (line,) = [ln for ln in text.splitlines() if "[reference]" in ln]
    assert line.startswith("| LLaVA-OV-7B offline (OVO-Bench, published) [reference] | 54.21 | 55.41 | 21.51 | 53.37 |")
    assert line.endswith("| 43.71 | 64.02 | 50.50 | 52.74 |")
    table = pd.read_csv(tmp_path / "results_by_type.csv")
    assert table.role.tolist() == ["reference"] and table.overall.round(2).tolist() == [52.74]


def test_a_grid_reference_that_does_not_add_up_is_refused(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import reproduce_table

    grid = yaml.safe_load(GRID.read_text())
    grid["references"][0]["correct_total"]["EPM"] = [300, 297]
    bad = tmp_path / "ovo.yaml"
    bad.write_text(yaml.safe_dump(grid))
    with pytest.raises(reproduce_table.GridError, match=r"correct_total.EPM"):
        reproduce_table.load_grid(bad)


def test_reproduce_ovo_says_exactly_what_is_missing(tmp_path):
    run_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    run_env.update(HF_HOME=str(tmp_path / "hf"), HYDRA_FULL_ERROR="0")
    proc = subprocess.run([sys.executable, "experiments/reproduce_table.py", "--data", "ovo", "--out",
                           str(tmp_path / "out"), f"dataset.annotation={OVO_FILE}",
                           f"dataset.data_root={tmp_path / 'videos'}"], cwd=ROOT, env=run_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and "cannot reproduce 'OVO-Bench" in err
    videos = len({r["video"] for r in json.loads(OVO_FILE.read_text())})
    assert f"{videos} of {videos} videos of {OVO_FILE} not found under data root {tmp_path / 'videos'}" in err
    assert str(tmp_path / "videos" / "Ego4D" / "clips") in err
    assert "llava-hf/llava-onevision-qwen2-7b-ov-hf is not in the Hugging Face cache" in err
    assert "API key" not in err and "OPENAI" not in err  # judge-free
    assert not (tmp_path / "out" / "runs").exists()  # nothing ran
    # and with nothing given, the annotation file it looks for
    bare = subprocess.run([sys.executable, "experiments/reproduce_table.py", "--data", "ovo", "--check",
                           f"paths.data_dir={tmp_path}"], cwd=ROOT, env=run_env, capture_output=True, text=True,
                          timeout=300)
    assert bare.returncode == 2 and f"annotation file not found: {tmp_path}/ovo/ovo_bench_new.json" in bare.stderr
