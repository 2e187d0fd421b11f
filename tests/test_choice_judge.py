"""judge=choice: option letters, Yes / No and counts read from real-world answer shapes; answers that pick nothing
are wrong and counted, never dropped; the synthetic benchmark's multiple-choice mode end to end on the nano model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import compose_cfg

from mukv.config import register_configs
from mukv.data.choice import LETTERS, choice_prompt, parse_options
from mukv.judge.base import INVALID_ANSWER
from mukv.judge.choice import ChoiceJudge, chosen_option, count_of, yes_no

OPTIONS = ["the plate", "the cup", "a person with blue shirt", "the fridge"]
PROMPT = choice_prompt("What did I pick up?", OPTIONS)
register_configs()


@pytest.mark.parametrize("answer,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B. the cup", "B"), ("B) the cup", "B"), ("(B) the cup", "B"),
    ("The answer is B", "B"), ("The answer is B.", "B"), ("Answer: (B)", "B"), ("I pick option B, the cup.", "B"),
    ("b", "B"), ("b.", "B"), ("**B**", "B"), (" B\n", "B"), ("'B'", "B"), ("B the cup", "B"),
    ("the cup", "B"), ("The cup.", "B"), ("  THE CUP ", "B"),
    ("a person with blue shirt", "C"),  # an option's text that starts with the article "a": not option A
    ("A person with blue shirt.", "C"),
    ("a", "A"), ("(a)", "A"), ("D", "D"),
    ("E", None), ("(F) the sink", None),  # past the last option
    ("the sink", None), ("Because it was on the table.", None), ("I cannot tell from the video.", None),
    ("B or C", None), ("the answer is a cup", None), ("", None), ("12", None),
])
def test_the_option_letter_is_read_from_real_world_answer_shapes(answer, letter):
    assert chosen_option(answer, OPTIONS) == letter


def test_without_options_letters_alone_are_read():
    assert chosen_option("C. something", None) == "C" and chosen_option("the cup", None) is None
    assert chosen_option("H", None) == "H" and chosen_option("the answer is G", None) == "G"


def test_two_identical_options_are_not_guessed_between():
    options = ["A wooden bridge.", "A wooden bridge.", "A stone bridge."]
    assert chosen_option("a wooden bridge", options) is None and chosen_option("a stone bridge", options) == "C"
    assert chosen_option("B", options) == "B"


@pytest.mark.parametrize("answer,said", [
    ("Yes", "Yes"), ("yes.", "Yes"), ("YES", "Yes"), ("Y", "Yes"), ("Yes, the person is cutting.", "Yes"),
    ("No", "No"), ("no", "No"), ("N", "No"), ("No, not yet.", "No"), ("The answer is no.", "No"),
    ("**Yes**", "Yes"), ("Not sure", None), ("Nope", None), ("maybe", None), ("", None), ("I think so", None),
])
def test_yes_and_no_are_read_as_words(answer, said):
    assert yes_no(answer) == said


@pytest.mark.parametrize("answer,count", [
    ("3", 3), ("3.", 3), ("They did it 3 times.", 3), ("three", 3), ("Three times", 3), ("10", 10), ("0", 0),
    ("zero", 0), ("twice", 2), ("3 (three)", 3), ("1, 2, 3", None), ("2 or 3", None), ("many", None), ("", None),
])
def test_a_count_is_the_one_number_the_answer_holds(answer, count):
    assert count_of(answer) == count


def test_verdicts_right_wrong_and_invalid_never_dropped():
    judge = ChoiceJudge()
    assert judge.judge(PROMPT, "B", "B. the cup").correct is True
    assert judge.judge(PROMPT, "B", "the cup").score == 5.0
    wrong = judge.judge(PROMPT, "B", "D")
    assert wrong.correct is False and wrong.score == 0.0 and wrong.error == ""
    invalid = judge.judge(PROMPT, "B", "Because it was on the table.")
    assert invalid.correct is False and invalid.score == 0.0 and invalid.error.startswith(INVALID_ANSWER)
    assert "A-D" in invalid.error  # the options' range, read from the question
    assert judge.judge("Is he cutting?", "Yes", "yes, he is").correct is True
    assert judge.judge("Is he cutting?", "No", "Yes").correct is False
    assert judge.judge("How many?", "3", "three times").correct is True
    assert judge.judge("How many?", "3", "2").correct is False
    assert judge.judge("How many?", "3", "lots").error.startswith(INVALID_ANSWER)
    unscorable = judge.judge("What colour?", "red", "red")  # not a letter, Yes / No or count: an invalid judgment
    assert unscorable.correct is None and "red" in unscorable.error


def test_options_read_back_from_the_prompt_whatever_they_hold():
    tricky = ["one; two", "B. looks like a letter", "line\nbreak", "ends with;", "E"]
    assert parse_options(choice_prompt("Q?", tricky)) == tricky
    assert parse_options(choice_prompt("Q?", ["yes", "no"])) == ["yes", "no"]
    assert parse_options("What colour was the star?") is None
    with pytest.raises(ValueError):
        choice_prompt("Q?", ["only one"])
    assert len(LETTERS) == 8 and parse_options(choice_prompt("Q?", list("abcdefgh"))) == list("abcdefgh")


def test_invalid_answers_count_as_wrong_in_the_metrics():
    from mukv.report.metrics import summarize

    judge, rows = ChoiceJudge(), []
    for i, (ref, pred) in enumerate([("B", "B"), ("B", "C"), ("B", "no idea"), ("A", "the plate")]):
        v = judge.judge(PROMPT, ref, pred)
        rows.append({"qid": f"q{i}", "end_time": 10.0, "start_time": 0.0, "error": "", "qtype": "EPM",
                     "judge_correct": v.correct, "judge_score": v.score, "judge_error": v.error})
    m = summarize(pd.DataFrame(rows), pd.DataFrame(), 0.5)
    assert (m["judged"], m["correct"], m["invalid_judgments"], m["invalid_answers"]) == (4, 2, 0, 1)
    assert m["accuracy"] == 0.5 == m["accuracy_strict"]


def test_judge_choice_composes_and_builds():
    from mukv.judge import build_judge

    cfg = compose_cfg("judge=choice")
    assert cfg.judge.name == "choice" and isinstance(build_judge(cfg.judge), ChoiceJudge)


# ------------------------------------------------------------------------- the synthetic multiple-choice mode
def test_synthetic_choices_ask_the_same_streams_with_lettered_options():
    from mukv.data.synthetic import ANSWER_SETS, SyntheticSpec, make_synthetic_dataset

    spec = dict(num_videos=2, duration_s=60, sample_fps=0.5, questions_per_video=10)
    open_videos = make_synthetic_dataset(SyntheticSpec(**spec))
    choice_videos = make_synthetic_dataset(SyntheticSpec(**spec, choices=4))
    for plain, choice in zip(open_videos, choice_videos, strict=True):
        assert plain.source.scene == choice.source.scene  # the mode leaves the stream alone
        for p, c in zip(plain.questions, choice.questions, strict=True):
            assert (p.qid, p.qtype, p.end_time, p.start_time) == (c.qid, c.qtype, c.end_time, c.start_time)
            options = c.meta["options"]
            assert parse_options(c.question) == options and p.question in c.question
            assert options[LETTERS.index(c.answer)] == p.answer == c.meta["answer_text"]
            assert len(set(options)) == len(options) == (2 if p.qtype == "order" else min(4, len(ANSWER_SETS[p.qtype])))
            assert set(options) <= set(ANSWER_SETS.get(p.qtype, options))
    letters = {q.answer for v in choice_videos for q in v.questions}
    assert len(letters) > 1  # the right option's place is drawn, not always A
    from mukv.errors import ConfigError

    with pytest.raises(ConfigError, match="choices"):
        SyntheticSpec(**spec, choices=1)


def test_synthetic_choice_mode_end_to_end_on_the_nano_model(tmp_path):
    """The real entry point (train_eval) on the nano model: the lettered prompt streams, judge=choice scores
    every answer, and each verdict agrees with the answer read independently here (the nano model answers one
    word: a letter, an option's text, or something else, which picks nothing and is wrong)."""
    from mukv.train_eval import format_summary, train_eval

    cfg = compose_cfg("experiment=smoke", "model=nano", "judge=choice", "dataset.synthetic.choices=4",
                      "dataset.synthetic.num_videos=2", "dataset.synthetic.duration_s=60",
                      "dataset.synthetic.questions_per_video=5", "engine.max_new_tokens=4")
    cfg.paths.output_dir = str(tmp_path)
    result = train_eval(cfg, tmp_path)
    assert result.ok, result.failures
    rows = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert len(rows) == 10 and set(rows.answer) <= set(LETTERS)
    picked_text = invalid = 0
    for row in rows.itertuples():
        meta = json.loads(row.meta)
        options = meta["options"]
        assert parse_options(row.question) == options and options[LETTERS.index(row.answer)] == meta["answer_text"]
        said = row.prediction.strip().strip(".").lower()
        if len(said) == 1 and said.upper() in LETTERS[: len(options)]:
            expected = said.upper() == row.answer
        elif said in options:
            expected, picked_text = said == meta["answer_text"], picked_text + 1
        else:
            expected, invalid = None, invalid + 1
        assert str(row.judge_correct) == str(bool(expected)), row
        assert row.judge_error.startswith(INVALID_ANSWER) == (expected is None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["judged"] == 10 and metrics["invalid_judgments"] == 0 and metrics["invalid_answers"] == invalid
    assert metrics["correct"] == int((rows.judge_correct.astype(str) == "True").sum())
    assert set(metrics["by_category"]) <= {"memory", "recency", "cross_frame"} and metrics["by_type"]
    assert "accuracy" in format_summary(metrics)
