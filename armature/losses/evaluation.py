"""Evaluation metrics of ASAP (seed 001, Sec. 5): pure functions of judge outputs.

* Anatomical Error Rate (eq. 7): ``AER = (1/|D|) * sum_x 1[judge(x) = Fail]``, the share of
  samples the judge fails; lower is better.
* Relative Superiority Index (eq. 8): with a pairwise decision ``d in {win, tie, lose}`` of a
  model against a baseline on the same prompt and seed, ``RSI = (N_win + N_tie) /
  (N_lose + N_tie)``; above 1, the model matches or beats the baseline more often than it is
  beaten. With no losses and no ties it is infinite (reported as ``inf``).

And two measures of how well a reward ranks a policy's samples for a judge:

* ``ranking_auc``: ``P[score(bad) < score(good)]`` over every (bad, good) pair, ties counting half;
* ``best_of_n_expectation``: the mean judged value of the Best-of-N pick over every N-subset of
  a pool: ranked by score, the i-th lowest of m candidates is the pick of ``C(i-1, N-1)`` of the
  ``C(m, N)`` subsets (with values = scores, the expected maximum).
"""

from __future__ import annotations

import math
from math import comb

import numpy as np

__all__ = [
    "anatomical_error_rate",
    "best_of_n_expectation",
    "pairwise_decisions",
    "ranking_auc",
    "relative_superiority_index",
]


def anatomical_error_rate(passed) -> float:
    """Share of samples that failed (``passed`` is a boolean array-like); nan for none."""
    passed = np.asarray(passed, dtype=bool)
    return float("nan") if passed.size == 0 else float(1.0 - passed.mean())


def pairwise_decisions(scores, baseline_scores, tie_tolerance: float = 0.0) -> np.ndarray:
    """``+1`` win, ``0`` tie, ``-1`` lose for each paired sample: higher score wins; a difference
    of at most ``tie_tolerance`` is a tie."""
    a = np.asarray(scores, dtype=np.float64)
    b = np.asarray(baseline_scores, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"scores {a.shape} and baseline_scores {b.shape} must pair up one to one")
    diff = a - b
    return np.where(np.abs(diff) <= tie_tolerance, 0, np.sign(diff)).astype(np.int64)


def relative_superiority_index(decisions) -> dict[str, float]:
    """``{"wins", "ties", "losses", "rsi"}`` from decisions in {+1, 0, -1}."""
    d = np.asarray(decisions)
    wins, ties, losses = int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum())
    denominator = losses + ties
    if denominator == 0:
        rsi = math.inf if wins else float("nan")
    else:
        rsi = (wins + ties) / denominator
    return {"wins": wins, "ties": ties, "losses": losses, "rsi": rsi}


def ranking_auc(scores, bad) -> float:
    """P[score of a ``bad`` sample < score of a good one], ties counting half; nan without both kinds."""
    scores, bad = np.asarray(scores, dtype=np.float64), np.asarray(bad, dtype=bool)
    s_bad, s_good = scores[bad], scores[~bad]
    if not len(s_bad) or not len(s_good):
        return float("nan")
    below = (s_bad[:, None] < s_good[None, :]).mean()
    return float(below + 0.5 * (s_bad[:, None] == s_good[None, :]).mean())


def best_of_n_expectation(scores, values, n: int) -> float:
    """E[value of the highest-scoring candidate] over the uniformly random ``n``-subsets of a
    pool (scores assumed distinct; ties are broken by position)."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    ranked = np.asarray(values, dtype=np.float64)[order]
    m = len(ranked)
    if not 1 <= n <= m:
        raise ValueError(f"n={n}: Best-of-N needs 1 <= N <= the pool's {m} candidates")
    return float(sum(ranked[i - 1] * comb(i - 1, n - 1) for i in range(n, m + 1)) / comb(m, n))
