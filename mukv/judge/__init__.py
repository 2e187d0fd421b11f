"""Judges turn (question, reference, prediction) into a verdict; see ``build_judge``.

- ``exact``: normalised exact match / leading match, multiple-choice letters (no model, no cache);
- ``choice``: option letters, Yes / No and counts read from the answer, unparsable answers wrong
  (``mukv.judge.choice``; OVO-Bench, the synthetic multiple-choice mode);
- ``openai``: any OpenAI-compatible chat endpoint (``mukv.judge.openai``);
- ``hf``: a local transformers causal LM (``mukv.judge.hf``);
- ``none``: no judging.

LLM judges share the pinned, versioned prompt and parser (``mukv.judge.prompt``) and the on-disk judgment
cache (``mukv.judge.cache``).
"""

from __future__ import annotations

from mukv.judge.base import Judge, Verdict
from mukv.judge.choice import ChoiceJudge
from mukv.judge.exact import ExactMatchJudge


def judge_class(cfg) -> type[Judge] | None:
    """The judge class ``judge._target_`` names (conf/judge/*.yaml), or None for ``judge=none``."""
    from mukv.components import component_class

    return component_class(cfg, "judge")


def validate_judge_config(cfg) -> None:
    """Checks that need no network and no model; raises ``ConfigError`` naming the field."""
    cls = judge_class(cfg)
    if cls is not None:
        cls.check_config(cfg)


def build_judge(cfg) -> Judge | None:
    """The configured judge (checked; LLM judges load their model in ``prepare()``), or None."""
    cls = judge_class(cfg)
    if cls is None:
        return None
    cls.check_config(cfg)
    return cls.from_config(cfg)


__all__ = ["Judge", "Verdict", "ChoiceJudge", "ExactMatchJudge", "build_judge", "judge_class", "validate_judge_config"]
