"""Metrics: accuracy = yes / (yes + no) with invalid judgments counted, breakdowns by type and question age,
efficiency figures, and the same numbers whether rows come from memory or back from the CSV files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mukv.report.evidence import evidence_recalled
from mukv.report.metrics import question_age_s, summarize, truth, wilson_interval, window_age_breakdown
from mukv.report.outputs import CsvAppender


def row(i: int, correct, score, qtype="detail", end=100.0, start=40.0, meta=None, error="", judge_error=""):
    return {"video_id": f"v{i % 2}", "qid": f"q{i}", "question": "?", "answer": "a", "prediction": "p",
            "start_time": start, "end_time": end, "qtype": qtype, "method": "full", "online_tokens": 100 + i,
            "kv_tokens": 10, "kv_bytes": 1000, "encode_s": 0.5, "recall_s": 0.01, "ttft_s": 0.1 * (i + 1),
            "latency_s": 0.2 * (i + 1), "new_tokens": 4, "error": error,
            "meta": json.dumps(meta or {}), "judge_correct": correct, "judge_score": score, "judge_error": judge_error}


def memory_rows():
    return [
        {"video_id": "v0", "method": "full", "frames_encoded": 1800, "questions": 3, "kv_tokens": 10,
         "kv_bytes": 2_000_000_000, "peak_kv_bytes": 2_100_000_000, "aux_bytes": 5, "encode_s": 100.0,
         "encode_fps": 18.0, "peak_rss_bytes": 7, "peak_cuda_bytes": 11, "error": ""},
        {"video_id": "v1", "method": "full", "frames_encoded": 900, "questions": 3, "kv_tokens": 10,
         "kv_bytes": 1_000_000_000, "peak_kv_bytes": 1_000_000_000, "aux_bytes": 0, "encode_s": 50.0,
         "encode_fps": 18.0, "peak_rss_bytes": 9, "peak_cuda_bytes": 3, "error": ""},
    ]


def judged_rows():
    # 6 questions: 3 yes, 1 no, 2 invalid (a failed request and an unparsable reply).
    return [
        row(0, True, 5.0, "detail", meta={"evidence_time": 95.0}),  # age 5
        row(1, True, 4.0, "detail", meta={"evidence_time": 70.0}),  # age 30 (an edge: upper bucket)
        row(2, False, 1.0, "count", meta={"age_s": 45.0}),  # no evidence_time: age_s
        row(3, True, 3.0, "count"),  # no meta: end - start = 60
        row(4, None, None, "count", judge_error="judge request failed: HTTP 500"),
        row(5, None, None, "detail", end=4000.0, start=0.0, judge_error="unparsable judge reply"),
    ]


def test_accuracy_is_yes_over_judged_and_invalid_judgments_are_counted():
    m = summarize(pd.DataFrame(judged_rows()), pd.DataFrame(memory_rows()), sample_fps=0.5)
    assert m["questions"] == 6 and m["judged"] == 4 and m["invalid_judgments"] == 2 and m["correct"] == 3
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["accuracy_strict"] == pytest.approx(3 / 6)
    assert m["mean_score"] == pytest.approx((5 + 4 + 1 + 3) / 4)  # over valid judgments only


def test_by_type_and_by_question_age():
    m = summarize(pd.DataFrame(judged_rows()), pd.DataFrame(memory_rows()), 0.5, age_buckets_s=[0, 30, 60, 600])
    assert m["accuracy_by_type"] == {"count": pytest.approx(1 / 2), "detail": 1.0}
    lo, hi = wilson_interval(1, 2)  # every breakdown carries its 95% interval
    assert m["by_type"]["count"] == {"questions": 3, "judged": 2, "invalid": 1, "correct": 1, "accuracy": 0.5,
                                     "accuracy_lo": pytest.approx(lo), "accuracy_hi": pytest.approx(hi),
                                     "mean_score": 2.0}
    by_age = m["by_age"]
    assert list(by_age) == ["0-30s", "30-60s", "60-600s", ">=600s"]
    assert by_age["0-30s"]["questions"] == 1 and by_age["0-30s"]["mean_age_s"] == 5.0
    assert by_age["30-60s"]["questions"] == 2 and by_age["30-60s"]["accuracy"] == 0.5  # ages 30 and 45
    # Question 3 (age 60) and question 4 (no meta, 100 - 40 = 60, invalid) land in 60-600s.
    assert by_age["60-600s"]["questions"] == 2 and by_age["60-600s"]["judged"] == 1
    assert by_age[">=600s"] == {**by_age[">=600s"], "questions": 1, "judged": 0, "invalid": 1, "accuracy": None,
                                "lo_s": 600.0, "hi_s": None}


def test_question_age_prefers_evidence_time_then_age_then_start():
    df = pd.DataFrame([row(0, True, 5, meta={"evidence_time": 10.0, "age_s": 1.0}, end=50.0, start=0.0),
                       row(1, True, 5, meta={"age_s": 7.0}, end=50.0, start=0.0),
                       row(2, True, 5, meta={}, end=50.0, start=20.0)])
    assert list(question_age_s(df)) == [40.0, 7.0, 30.0]


def test_efficiency_metrics():
    m = summarize(pd.DataFrame(judged_rows()), pd.DataFrame(memory_rows()), sample_fps=0.5)
    hours = 2700 / 0.5 / 3600  # 1.5 hours of video
    assert m["video_hours"] == pytest.approx(hours)
    assert m["kv_bytes_total"] == 3_000_000_000 and m["kv_gb_per_hour"] == pytest.approx(3.0 / hours)
    assert m["encode_fps"] == pytest.approx(2700 / 150)
    assert m["peak_kv_bytes"] == 2_100_000_000 and m["peak_rss_bytes"] == 9 and m["peak_cuda_bytes"] == 11
    assert m["mean_online_tokens"] == pytest.approx(102.5)
    assert m["mean_ttft_s"] == pytest.approx(0.35) and m["mean_latency_s"] == pytest.approx(0.7)
    assert m["p50_latency_s"] == pytest.approx(0.7) and m["failed_videos"] == 0


def test_metrics_from_csv_equal_metrics_from_memory(tmp_path: Path):
    preds, mem = judged_rows(), memory_rows()
    pa, ma = CsvAppender(tmp_path / "predictions.csv"), CsvAppender(tmp_path / "memory_stats.csv")
    for r in preds:
        pa.append(r)
    for r in mem:
        ma.append(r)
    read = lambda p: pd.read_csv(p, keep_default_na=False)  # noqa: E731  (as train_eval reads them)
    from_csv = summarize(read(tmp_path / "predictions.csv"), read(tmp_path / "memory_stats.csv"), 0.5)
    assert from_csv == summarize(pd.DataFrame(preds), pd.DataFrame(mem), 0.5)
    json.dumps(from_csv, allow_nan=False)  # plain JSON, no NaN


def test_all_valid_csv_column_and_no_judge():
    preds = [row(i, i % 2 == 0, 5.0 if i % 2 == 0 else 0.0) for i in range(4)]
    m = summarize(pd.DataFrame(preds), pd.DataFrame(), 0.5)
    assert m["accuracy"] == 0.5 and m["invalid_judgments"] == 0 and "kv_gb_per_hour" not in m
    no_judge = [{k: v for k, v in r.items() if not k.startswith("judge_")} for r in preds]
    m = summarize(pd.DataFrame(no_judge), pd.DataFrame(memory_rows()), 0.5)
    assert "accuracy" not in m and "judged" not in m and m["questions"] == 4


def test_nothing_judged_gives_none_not_nan():
    m = summarize(pd.DataFrame([row(0, "", "", judge_error="x"), row(1, "", "", judge_error="y")]),
                  pd.DataFrame(memory_rows()), 0.5)
    assert m["accuracy"] is None and m["mean_score"] is None and m["invalid_judgments"] == 2
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in m.values())


def test_truth_reads_every_spelling():
    s = pd.Series([True, False, "True", "false", "", None, float("nan"), "1.0", "garbage"])
    assert list(truth(s)) == [True, False, True, False, None, None, None, True, None]


def test_wilson_interval_matches_the_closed_form_and_stays_in_range():
    from mukv.report.metrics import wilson_interval

    lo, hi = wilson_interval(8, 10)  # the textbook example: 0.8 of 10 -> [0.490, 0.943]
    assert round(lo, 3) == 0.490 and round(hi, 3) == 0.943
    assert wilson_interval(0, 10)[0] == 0.0 and round(wilson_interval(0, 10)[1], 3) == 0.278
    assert round(wilson_interval(10, 10)[0], 3) == 0.722 and wilson_interval(10, 10)[1] == 1.0
    narrow, wide = wilson_interval(80, 160), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # more questions, a narrower interval
    assert all(x != x for x in wilson_interval(0, 0))  # no questions: nan


def test_evidence_recalled_counts_cells_tokens_or_frames():
    """Evidence cells ([frame, cell] on a grid x grid raster) against what a context holds: token by token when
    the model has one token per cell, frame by frame otherwise, or whole recalled frames; None without
    evidence or without a report."""
    meta = {"evidence_cells": [[2, 5], [3, 6]], "grid": 4}
    assert evidence_recalled(meta, [2 * 16 + 5], 16) == 0.5
    assert evidence_recalled(meta, [2 * 16 + 4, 3 * 16 + 6], 16) == 0.5  # the other cell of frame 2 is not it
    assert evidence_recalled(meta, range(2 * 16 + 5, 3 * 16 + 7), 16) == 1.0  # a window
    assert evidence_recalled(meta, [2 * 196 + 100], 196) == 0.5  # 196 tokens per frame: counted by frame
    assert evidence_recalled(meta, None, 16, frames=[3, 9]) == 0.5  # methods that recall whole frames
    assert evidence_recalled(meta, None, 16) is None and evidence_recalled({}, [1], 16) is None


def test_by_window_age_splits_questions_by_evidence_age_in_windows_with_their_recall():
    """Evidence age / window in (0, 1], (1, 4], beyond: a 10 s window puts ages 5 and 10 inside it, 25 and 40
    one to four windows back, 41 and 300 older; each bucket with its types and its mean evidence recall."""
    ages = [5, 10, 25, 40, 41, 300]
    rows = [row(i, i % 2 == 0, 5, "detail" if i < 5 else "count", end=400.0, meta={"evidence_time": 400.0 - a})
            for i, a in enumerate(ages)]
    df = pd.DataFrame(rows).assign(evidence_recalled=[1.0, 1.0, 0.0, 0.5, None, None])
    b = window_age_breakdown(df, 10.0)
    assert list(b) == ["in_window", "1-4_windows", "older"]
    assert [b[k]["questions"] for k in b] == [2, 2, 2] and [b[k]["correct"] for k in b] == [1, 1, 1]
    assert [b[k]["recall"] for k in b] == [1.0, 0.25, None]  # the older two report no recall
    assert b["older"]["by_type"] == {"count": 0.0, "detail": 1.0}
    m = summarize(df, pd.DataFrame(memory_rows()), 0.5, window_s=10.0)
    assert m["window_s"] == 10.0 and m["by_window_age"]["in_window"]["accuracy"] == 0.5
    assert "by_window_age" not in summarize(df, pd.DataFrame(memory_rows()), 0.5)  # no budget: no window
    with pytest.raises(ValueError, match="window_s"):
        window_age_breakdown(df, 0)


# ------------------------------------------------------------------------------ categories, paired tests
def test_categories_group_the_types_and_count_each_question_once():
    from mukv.data.synthetic import QUESTION_CATEGORIES, QUESTION_TYPES

    assert sorted(t for types in QUESTION_CATEGORIES.values() for t in types) == sorted(QUESTION_TYPES)
    rows = [row(0, True, 5, "detail"), row(1, False, 0, "count"), row(2, True, 5, "current"),
            row(3, True, 5, "order"), row(4, False, 0, "motion"), row(5, True, 5, "motion")]
    m = summarize(pd.DataFrame(rows), pd.DataFrame(memory_rows()), 0.5, categories=QUESTION_CATEGORIES)
    cats = m["by_category"]
    assert {c: (v["correct"], v["judged"]) for c, v in cats.items()} == {
        "memory": (1, 2), "recency": (1, 1), "cross_frame": (2, 3)}
    assert cats["cross_frame"]["accuracy_lo"] < 2 / 3 < cats["cross_frame"]["accuracy_hi"]
    assert "by_category" not in summarize(pd.DataFrame(rows), pd.DataFrame(memory_rows()), 0.5)


def test_mcnemar_exact_matches_the_binomial_tail():
    from mukv.report.compare import mcnemar_exact

    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12)  # 0.0386
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64) and mcnemar_exact(0, 6) == mcnemar_exact(6, 0)


def test_paired_comparison_pairs_by_question_id_not_by_row():
    from mukv.report.compare import compare

    a = pd.DataFrame({"qid": [f"q{i}" for i in range(40)], "judge_correct": ["True"] * 30 + ["False"] * 10})
    # b: the same questions in reverse order, right on the first 20 only
    b = pd.DataFrame({"qid": [f"q{i}" for i in reversed(range(40))],
                      "judge_correct": [str(i < 20) for i in reversed(range(40))]})
    c = compare(a, b)
    assert (c.n, c.a_only, c.b_only) == (40, 10, 0) and c.diff == pytest.approx(0.25)
    assert c.diff_lo > 0 and c.diff_lo < 0.25 < c.diff_hi and c.significant  # p = 2 / 1024
    same = compare(a, a)
    assert same.diff == 0 and same.p_value == 1.0 and not same.significant
    with pytest.raises(ValueError, match="qid twice"):
        compare(pd.concat([a, a]), b)


def test_the_terminal_summary_shows_each_category_with_its_interval():
    from mukv.train_eval import format_summary

    text = format_summary({"method": "full", "accuracy": 0.5, "judged": 4, "correct": 2, "by_category": {
        "memory": {"accuracy": 1.0, "accuracy_lo": 0.34, "accuracy_hi": 1.0, "judged": 2},
        "recency": {"accuracy": None, "judged": 0}}})
    assert "    memory       100.0% (95% CI 34.0-100.0%, n=2)" in text and "recency" not in text
    text = format_summary({"accuracy": 0.5, "judged": 4, "correct": 2, "window_s": 32.0, "by_window_age": {
        "in_window": {"accuracy": 1.0, "judged": 1}, "1-4_windows": {"accuracy": 1 / 3, "judged": 3},
        "older": {"accuracy": None, "judged": 0}}})
    assert "by evidence age in windows of 32 s: in window 100% (n=1), 1-4 windows 33% (n=3)" in text
