"""Judge-free scoring of multiple-choice, yes/no and count answers (``judge=choice``): OVO-Bench's tasks and the
synthetic benchmark's multiple-choice mode (``dataset.synthetic.choices``).

The reference says what kind of answer is expected:

- an option letter (``B``, ``(B)``): multiple choice. The options are read back from the question
  (:func:`mukv.data.choice.parse_options`; a question without them is scored from letters alone). The answer
  picks an option when it is, in this order: a letter alone (``B``, ``(B)``, ``b``, ``**B**``); the whole text
  of exactly one option (``the cup`` for ``B. the cup``); a letter leading the answer with its punctuation
  (``B. the cup``, ``B) ...``, ``(B) ...``); a letter the answer names (``The answer is B``, ``Answer: (C)``,
  ``option D``); a capital B-H leading the answer (``B the cup``; a leading ``A`` is read as the article; not
  with another capital letter after it, as in ``B or C``).
  A letter past the last option picks nothing;
- ``Yes`` / ``No``: a probe. The answer's leading word (``Yes``, ``yes.``, ``Y``, ``No, ...``, ``N``) or the
  one it names (``The answer is no``);
- a whole number: a count (OVO-Bench's REC). The one number the answer holds, in digits or as a word
  (``3``, ``three``, ``3 times``); several different numbers are no answer.

An answer that picks nothing is wrong, never dropped: ``Verdict(correct=False, score=0, error='invalid
answer: ...')``, counted in ``metrics.json`` as ``invalid_answers`` (OVO-Bench's official scoring gives such an
answer 0 too). A reference of none of these kinds cannot be scored here: ``correct=None`` (an invalid
judgment, counted apart, never dropped), the error naming the reference.

Compared with the official scoring (``utils/OVOBenchScore.py``: the letter, ``Yes`` or ``No`` anywhere in the
answer as a substring, case-sensitive; REC: every digit of the answer concatenated), letters and words are
read as words here ("Because" does not pick B, "Not" is not "No"), case-insensitively, and a count may be a
word. On the official LLaVA-OneVision result files (bare letters, ``Yes`` / ``No``, digits) both give the same
scores (``mukv.data.ovo_bench.score_result_files``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mukv.data.choice import LETTERS, parse_options
from mukv.judge.base import INVALID_ANSWER, Judge, Verdict
from mukv.judge.exact import normalise

_WRAP = " \t\r\n*_`\"'"  # markdown emphasis, code marks and quotes around an answer
_LETTER_REF = re.compile(r"^\(?([A-Ha-h])\)?$")
_WHOLE_LETTER = re.compile(r"^[(\[]?([A-Ha-h])[)\]]?[.:;,!]?$")
_LEAD_LETTER = re.compile(r"^(?:\(([A-Ha-h])\)|\[([A-Ha-h])\]|([A-Ha-h])[.:)\]])(?=\s|$)")
_NAMED_LETTER = re.compile(
    r"\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be))?\s*:?\s*[(\[]?([A-Ha-h])[)\]]?(?=[\s.,;:!)]|$)",
    re.IGNORECASE)
_CAPITAL_LEAD = re.compile(r"^([B-H])(?=\s)")
_OTHER_LETTER = re.compile(r"\b[A-H]\b")
_YES_NO_LEAD = re.compile(r"^(yes|no|y|n)\b", re.IGNORECASE)
_YES_NO_NAMED = re.compile(r"\banswer\b(?:\s+is)?\s*:?\s*(yes|no)\b", re.IGNORECASE)
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {"once": 1, "twice": 2}
_NUMBER = re.compile(r"\d+|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)


def _clean(prediction: str) -> str:
    return str(prediction).strip().strip(_WRAP).strip()


def _in_range(letter: str, count: int) -> str | None:
    letter = letter.upper()
    return letter if LETTERS.index(letter) < count else None


def chosen_option(prediction: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter an answer picks (see the module docstring), or None. ``options``: the question's
    options (their number bounds the letters; their texts are matched); None: letters alone, A-H."""
    text = _clean(prediction)
    count = len(options) if options else len(LETTERS)
    m = _WHOLE_LETTER.match(text)
    if m:
        return _in_range(m.group(1), count)
    if options:
        said = normalise(text)
        same = [i for i, option in enumerate(options) if said and normalise(option) == said]
        if len(same) == 1:
            return LETTERS[same[0]]
        if len(same) > 1:  # the answer is the text of two identical options: it picks neither letter
            return None
    m = _LEAD_LETTER.match(text)
    if m:
        return _in_range(next(g for g in m.groups() if g), count)
    for m in _NAMED_LETTER.finditer(text):
        letter, after = m.group(1), text[m.end():]
        if letter == "a" and re.match(r"\s+\w", after):  # "the answer is a red cup": the article
            continue
        return _in_range(letter, count)
    m = _CAPITAL_LEAD.match(text)
    if m is None or _OTHER_LETTER.search(text, m.end()):  # "B or C" picks neither
        return None
    return _in_range(m.group(1), count)


def yes_no(prediction: str) -> str | None:
    """``'Yes'`` / ``'No'`` as the answer's leading word or the one it names, else None."""
    text = _clean(prediction)
    m = _YES_NO_LEAD.match(text) or _YES_NO_NAMED.search(text)
    if m is None:
        return None
    return "Yes" if m.group(1).lower().startswith("y") else "No"


def count_of(prediction: str) -> int | None:
    """The one number an answer holds (digits or a word), else None (no number, or several different ones)."""
    values = {int(w) if w.isdigit() else _NUMBER_WORDS[w.lower()] for w in _NUMBER.findall(_clean(prediction))}
    return values.pop() if len(values) == 1 else None


def reference_kind(reference: str) -> str | None:
    """``'choice'``, ``'yes_no'``, ``'count'`` or None for a reference this judge cannot score."""
    ref = str(reference).strip()
    if _LETTER_REF.match(ref):
        return "choice"
    if ref.lower() in ("yes", "no"):
        return "yes_no"
    if ref.isdigit():
        return "count"
    return None


class ChoiceJudge(Judge):
    """Option letters, Yes / No and counts read from the answer and compared with the reference; no model."""

    name = "choice"

    def judge(self, question: str, reference: str, prediction: str) -> Verdict:
        kind = reference_kind(reference)
        ref = str(reference).strip()
        if kind is None:
            return Verdict(correct=None, score=None,
                           error=f"judge=choice scores option letters, Yes / No and counts; the reference {ref!r} "
                                 "is none of them")
        if kind == "choice":
            options = parse_options(str(question))
            got = chosen_option(prediction, options)
            expected = _LETTER_REF.match(ref).group(1).upper()
            last = LETTERS[(len(options) if options else len(LETTERS)) - 1]
            missing = f"no option (a letter A-{last} or an option's text)"
        elif kind == "yes_no":
            got, expected, missing = yes_no(prediction), ref.capitalize(), "no Yes or No"
        else:
            got, expected, missing = count_of(prediction), int(ref), "not one number"
        if got is None:
            return Verdict(correct=False, score=0.0, error=f"{INVALID_ANSWER}: {missing} in {_clean(prediction)[:80]!r}")
        ok = got == expected
        return Verdict(correct=ok, score=5.0 if ok else 0.0)
