"""The judge interface: a verdict per answer; failures are verdicts too (never silently dropped)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

# The start of a verdict's ``error`` when the judge read the answer and found no choice in it (no option letter,
# no Yes / No, no number): the answer is judged wrong (``correct=False``), not left unjudged, and
# ``metrics.json`` counts such answers apart (``invalid_answers``).
INVALID_ANSWER = "invalid answer"


@dataclass(frozen=True)
class Verdict:
    correct: bool | None  # None when the judge failed or its reply could not be parsed
    score: float | None  # 0-5 (Video-ChatGPT style); exact match gives 5 or 0
    error: str = ""


class Judge(abc.ABC):
    """A judge is named by ``judge._target_`` (conf/judge/*.yaml): ``check_config`` checks its options before
    anything loads (no network, no weights), ``from_config`` builds it."""

    name: str = "judge"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Raise ``ConfigError`` naming ``judge.<field>`` for a bad option. Default: nothing to check."""
        return None

    @classmethod
    def from_config(cls, cfg: Any) -> Judge:
        """The judge of a composed ``judge`` config (checked). Default: no options."""
        return cls()

    @abc.abstractmethod
    def judge(self, question: str, reference: str, prediction: str) -> Verdict: ...

    def prepare(self) -> None:
        """Load what the judge needs (weights, connections) before the run streams; errors here are
        configuration errors. Default: nothing to load."""
        return None

    def describe(self) -> dict[str, Any]:
        """What identifies the judge and what it did (name, model, prompt version, call counts)."""
        return {"name": self.name}

    def close(self) -> None:
        """Release files and models."""
        return None
