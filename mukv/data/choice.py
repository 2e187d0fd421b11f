"""Prompts of multiple-choice and probe questions, and the options read back from a prompt.

The layout follows OVO-Bench's official evaluation (``JoeLeelyf/OVO-Bench``: ``constant.py``, the prompt
builder of ``utils/OVOBench.py``), in this project's own words with the same meaning:

- multiple choice (OVO-Bench's backward-tracing and real-time tasks, ``dataset.synthetic.choices``): the
  question, then the options lettered A, B, C, ... on one line as ``A. <option>; B. <option>;`` (the official
  layout), then the instruction to reply with the letter alone;
- REC (forward, repetition counting): the people doing one repeated action are "they"; how many times did
  they <activity>, in total, one complete motion counting once; reply with one number alone;
- SSR (forward, sequential steps): a tutorial video of steps in sequence; is the person doing <step> right
  now; reply Yes or No alone;
- CRR (forward, clue-revealing): the question concerns the latest frames (the end of the video); do the frames
  so far, the latest above all, hold enough to answer it; reply Yes or No alone.

A judge sees only the question text, the reference and the prediction (``mukv.judge.base.Judge``), so the
multiple-choice options travel in the question: :func:`parse_options` reads them back from a prompt made by
:func:`choice_prompt` (the inverse on every record of the real OVO-Bench file, tested).
"""

from __future__ import annotations

from collections.abc import Sequence

LETTERS = "ABCDEFGH"  # at most 8 options (OVO-Bench's items have 2 to 5)

_QUESTION = "Question: "
_OPTIONS = "\nOptions:\n"
_CHOICE_INSTRUCTION = ("Reply with the letter of the option you choose (such as A, B or C) and nothing else: "
                       "no other words, no explanation.")
_YES_NO_INSTRUCTION = "Reply with Yes or No and nothing else: no other words, no explanation."


def option_letter(index: int) -> str:
    """``0 -> 'A'``; a ``ValueError`` past the last letter."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index} outside 0..{len(LETTERS) - 1}")
    return LETTERS[index]


def format_options(options: Sequence[str]) -> str:
    """``A. red; B. blue;``: the options lettered in order on one line, each closed by a semicolon."""
    return " ".join(f"{option_letter(i)}. {text};" for i, text in enumerate(options))


def choice_prompt(question: str, options: Sequence[str]) -> str:
    """The multiple-choice prompt: question, lettered options, the reply-with-the-letter instruction."""
    if len(options) < 2:
        raise ValueError(f"a multiple-choice question needs at least 2 options, got {len(options)}")
    return f"{_QUESTION}{question}{_OPTIONS}{format_options(options)}\n\n{_CHOICE_INSTRUCTION}"


def parse_options(prompt: str) -> list[str] | None:
    """The options of a prompt made by :func:`choice_prompt`, in order; None for any other text.

    The option block lies between the ``Options:`` line and the instruction; option ``k`` starts after
    ``<letter k>. `` and ends at the first ``; <letter k+1>. `` after it (the last one at the block's final
    ``;``), so an option that holds a semicolon, a newline or a letter of its own is read back whole."""
    start = prompt.rfind(_OPTIONS)
    end = prompt.rfind(f"\n\n{_CHOICE_INSTRUCTION}")
    if start < 0 or end < start:
        return None
    block = prompt[start + len(_OPTIONS):end]
    if not block.startswith("A. ") or not block.endswith(";"):
        return None
    options: list[str] = []
    pos = len("A. ")
    for k in range(1, len(LETTERS) + 1):
        cut = block.find(f"; {LETTERS[k]}. ", pos) if k < len(LETTERS) else -1
        if cut < 0:
            options.append(block[pos:-1])
            return options
        options.append(block[pos:cut])
        pos = cut + len(f"; {LETTERS[k]}. ")
    return None  # pragma: no cover - the loop returns at the last letter


def rec_prompt(activity: str) -> str:
    """REC (repetition counting): one number, the times the action was done in total."""
    return (
        "In this video, people may do one kind of action again and again; \"they\" below means the people doing it.\n"
        "Count how many times this action has been done in total, by all of them together; one complete motion "
        "counts as one.\n"
        f"Question: How many times did they {activity}?\n"
        "Reply with a single number (0, 1, 2, 3, ...) for the total and nothing else: no other words, no "
        "explanation."
    )


def ssr_prompt(step: str) -> str:
    """SSR (sequential steps): is the person doing this step now."""
    return (
        "This is a tutorial video: its procedure is a sequence of steps. One of the steps is:\n"
        f"{step}\n"
        "Is the man or woman in the video doing this step right now?\n"
        f"{_YES_NO_INSTRUCTION}"
    )


def crr_prompt(question: str) -> str:
    """CRR (clue-revealing responding): do the frames so far answer a question about the latest frames."""
    return (
        "Answer from what the video shows. The question below is about its latest frames, that is, the end of "
        "the video.\n"
        f"{question}\n"
        "Does what the video has shown so far, above all its latest frames (those near its end), give enough "
        "information to answer this question?\n"
        f"{_YES_NO_INSTRUCTION}"
    )
