"""The LLM judge's prompt (pinned and versioned) and the parser of its replies.

Contract (Video-ChatGPT style, as used to score RVS): the judge sees the question, the reference answer and
the prediction, and replies with a Python-dict-like string ``{'pred': 'yes' | 'no', 'score': 0..5}``.
Accuracy = yes / (yes + no); score = the mean over valid judgments (see ``mukv.report.metrics``).

The text of each prompt version is pinned by its SHA-256: changing a prompt without adding a new version
raises at first use, so a cached judgment (keyed by prompt version) can never come from another text.
Add a version by adding an entry to ``PROMPTS`` and its hash to ``_PINNED``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class JudgePrompt:
    version: str
    system: str
    user: str  # str.format template with {question}, {reference}, {prediction}

    def messages(self, question: str, reference: str, prediction: str) -> list[dict[str, str]]:
        """Chat messages for one judgment (OpenAI chat format; HF chat templates take the same)."""
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.user.format(question=question.strip(), reference=reference.strip(),
                                                         prediction=prediction.strip())},
        ]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(f"{self.system}\x00{self.user}".encode()).hexdigest()


PROMPTS: dict[str, JudgePrompt] = {
    "v1": JudgePrompt(
        version="v1",
        system=(
            "You grade answers to questions about a video. For each item you are given the question, the "
            "reference answer written by a person who watched the video, and a predicted answer produced by a "
            "model. Decide whether the predicted answer means the same as the reference answer.\n"
            "- Judge meaning, not wording: paraphrases, synonyms and different sentence structure are fine.\n"
            "- Extra detail is fine as long as it does not contradict the reference.\n"
            "- A wrong, missing or contradicting key fact (object, colour, number, action, place, person) "
            "makes the prediction incorrect.\n"
            "- An empty, evasive or off-topic prediction is incorrect."
        ),
        user=(
            "Question: {question}\n"
            "Reference answer: {reference}\n"
            "Predicted answer: {prediction}\n\n"
            "Give your verdict as a Python dictionary string and nothing else. It has exactly two keys: "
            "'pred', whose value is the string 'yes' if the prediction matches the reference and 'no' "
            "otherwise, and 'score', an integer from 0 to 5 for how well the prediction matches the reference "
            "(0: not at all, 5: fully). Do not explain. Example of the format: {{'pred': 'no', 'score': 1}}"
        ),
    ),
}
DEFAULT_PROMPT_VERSION = "v1"
_PINNED = {"v1": "e2150d4cc5c01609383349e44ab682344b6bebcce10be4ccde0e96f337cda21c"}


class PromptChanged(RuntimeError):
    """A prompt's text differs from the text pinned for its version."""


def get_prompt(version: str) -> JudgePrompt:
    """The pinned prompt of ``version``; raises KeyError for an unknown version, PromptChanged if edited."""
    prompt = PROMPTS[version]
    if _PINNED.get(version) != prompt.sha256:
        raise PromptChanged(f"judge prompt '{version}' was edited (sha256 {prompt.sha256}); add a new version "
                            "instead of changing a published one, so that cached judgments stay valid")
    return prompt


# ------------------------------------------------------------------------------------------- parsing
class JudgeReplyError(ValueError):
    """A judge reply that is not a verdict (no dictionary, missing or invalid 'pred' / 'score')."""


_FENCE = re.compile(r"```[a-zA-Z]*")


def _candidates(text: str) -> list[str]:
    """Substrings that may be the verdict dictionary: each '{' with its matching '}'."""
    out = []
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                out.append(text[start:end + 1])
                break
    return out


def _as_dict(snippet: str) -> dict | None:
    for load in (ast.literal_eval, json.loads):
        try:
            value = load(snippet)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _pred(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().strip(".!'\" ").lower()
        if word in ("yes", "no"):
            return word == "yes"
    raise JudgeReplyError(f"'pred' must be 'yes' or 'no', got {value!r}")


def _score(value: object) -> int:
    number: float | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not number.is_integer() or not 0 <= number <= 5:
        raise JudgeReplyError(f"'score' must be an integer from 0 to 5, got {value!r}")
    return int(number)


def parse_reply(text: str | None) -> tuple[bool, int]:
    """(correct, score) from a judge reply; raises ``JudgeReplyError`` saying what is wrong.

    Accepts the dictionary anywhere in the reply (code fences and surrounding prose are ignored), Python or
    JSON quoting, keys in any case, 'Yes'/'no.' and booleans for 'pred', and integral numbers or numeric
    strings for 'score'. Everything else is an invalid judgment, counted as such, never guessed.
    """
    if not text or not text.strip():
        raise JudgeReplyError("empty reply")
    cleaned = _FENCE.sub("", text)
    found = None
    for snippet in _candidates(cleaned):
        d = _as_dict(snippet)
        if d is not None:
            d = {str(k).strip().lower(): v for k, v in d.items()}
            if "pred" in d or "score" in d:
                found = d
                break
    if found is None:
        raise JudgeReplyError("no dictionary with 'pred' and 'score' in the reply")
    for key in ("pred", "score"):
        if key not in found:
            raise JudgeReplyError(f"missing key '{key}'")
    return _pred(found["pred"]), _score(found["score"])
