"""Normalised exact match, for datasets whose answers are a word, a number or a multiple-choice letter."""

from __future__ import annotations

import re
import string

from mukv.judge.base import Judge, Verdict

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
# A reference that is only an option letter: "B", "(B)", "B.", "B)".
_LETTER_REF = re.compile(r"^\s*\(?([A-Ha-h])\)?[.:)]?\s*$")
# The option a prediction picks: a leading letter ("B", "(B)", "B. red", "B) red") or "answer is (B)".
_LETTER_LEAD = re.compile(r"^\s*\(?([A-Ha-h])\)?(?:[.:)]|\s|$)")
_LETTER_SAID = re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Ha-h])\)?(?:[.:)]|\s|$)", re.I)


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def chosen_letter(prediction: str) -> str | None:
    """The option letter a multiple-choice prediction picks, or None."""
    m = _LETTER_LEAD.match(prediction) or _LETTER_SAID.search(prediction)
    if m is None:
        return None
    letter = m.group(1)
    # A leading lower-case "a" is the article ("a red circle"), not option A.
    if letter == "a" and m.re is _LETTER_LEAD and not prediction.lstrip().startswith(("a.", "a)", "(a")):
        return None
    return letter.upper()


class ExactMatchJudge(Judge):
    """Correct when the normalised prediction equals the reference or starts with it as a whole word
    ("red" matches "red." and "red, it was"; "reddish" and "not red" do not). A reference that is a single
    option letter ("B", "(B)") is multiple choice: correct when the prediction picks that letter
    ("B", "(B) red", "B. red", "The answer is B")."""

    name = "exact"

    def judge(self, question: str, reference: str, prediction: str) -> Verdict:
        letter = _LETTER_REF.match(reference)
        if letter is not None:
            ok = chosen_letter(prediction) == letter.group(1).upper()
            return Verdict(correct=ok, score=5.0 if ok else 0.0)
        ref, pred = normalise(reference), normalise(prediction)
        ok = bool(ref) and (pred == ref or pred.startswith(ref + " "))
        return Verdict(correct=ok, score=5.0 if ok else 0.0)
