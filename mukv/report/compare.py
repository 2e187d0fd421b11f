"""Is one method better than another on the same questions? Paired tests, not two overlapping intervals.

Two methods run on the same held-out questions give paired outcomes (right / wrong for each question), so
what a reader asks, "is the difference real", is answered on the questions where they disagree: McNemar's
exact test (a two-sided binomial test on the discordant pairs) and a paired bootstrap interval of the
accuracy difference. Both need the questions matched by id (``qid``), never by position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mukv.report.metrics import truth


@dataclass(frozen=True)
class PairedComparison:
    """Method ``a`` against method ``b`` on ``n`` questions both answered (judged)."""

    n: int
    a_only: int  # questions a got right and b wrong
    b_only: int  # ... and the other way round
    diff: float  # accuracy(a) - accuracy(b)
    diff_lo: float  # 95% paired bootstrap interval of diff
    diff_hi: float
    p_value: float  # McNemar's exact test (two-sided)

    @property
    def significant(self) -> bool:
        """At the 5% level (a single comparison: correct for multiple comparisons yourself)."""
        return self.p_value < 0.05


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided p-value of McNemar's exact test: under no difference each discordant question is a fair coin."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], reps: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(accuracy(a) - accuracy(b), low, high): percentile interval over questions resampled with replacement,
    each resample keeping a question's two outcomes together."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(reps, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def compare(a: pd.DataFrame, b: pd.DataFrame, reps: int = 2000, seed: int = 0) -> PairedComparison:
    """Paired comparison of two predictions tables (``qid``, ``judge_correct``) on the questions both judged."""
    for name, df in (("a", a), ("b", b)):
        missing = {"qid", "judge_correct"} - set(df.columns)
        if missing:
            raise ValueError(f"predictions {name} lack the column(s) {', '.join(sorted(missing))}")
        if df["qid"].duplicated().any():
            raise ValueError(f"predictions {name} hold a qid twice: pair by question, one row each")
    left = pd.DataFrame({"qid": a["qid"].astype(str), "a": truth(a["judge_correct"])})
    right = pd.DataFrame({"qid": b["qid"].astype(str), "b": truth(b["judge_correct"])})
    both = left.merge(right, on="qid").dropna()
    ya, yb = both["a"].astype(bool).to_numpy(), both["b"].astype(bool).to_numpy()
    a_only, b_only = int((ya & ~yb).sum()), int((~ya & yb).sum())
    diff, lo, hi = paired_bootstrap(ya, yb, reps=reps, seed=seed)
    return PairedComparison(int(len(both)), a_only, b_only, diff, lo, hi, mcnemar_exact(a_only, b_only))
