"""Judges turn (question, reference, prediction) into a verdict; see ``build_judge``."""

from __future__ import annotations

from mukv.errors import ConfigError
from mukv.judge.base import Judge, Verdict
from mukv.judge.exact import ExactMatchJudge

JUDGES: dict[str, type[Judge]] = {"exact": ExactMatchJudge}


def build_judge(cfg) -> Judge | None:
    """The configured judge, or None for ``judge=none``."""
    if cfg.name == "none":
        return None
    if cfg.name not in JUDGES:
        raise ConfigError("judge.name", f"unknown judge '{cfg.name}'; choose one of none, {', '.join(JUDGES)}")
    return JUDGES[cfg.name]()


__all__ = ["Judge", "Verdict", "build_judge"]
