"""Normalised exact match, for datasets whose answers are a word or a number."""

from __future__ import annotations

import re
import string

from mukv.judge.base import Judge, Verdict

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


class ExactMatchJudge(Judge):
    """Correct when the normalised prediction equals the reference or starts with it as a whole word
    ("red" matches "red." and "red, it was"; "reddish" and "not red" do not)."""

    name = "exact"

    def judge(self, question: str, reference: str, prediction: str) -> Verdict:
        ref, pred = normalise(reference), normalise(prediction)
        ok = bool(ref) and (pred == ref or pred.startswith(ref + " "))
        return Verdict(correct=ok, score=5.0 if ok else 0.0)
