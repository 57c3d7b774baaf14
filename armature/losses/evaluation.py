"""Evaluation metrics of ASAP (seed 001, Sec. 5): pure functions of judge outputs.

* Anatomical Error Rate (eq. 7): ``AER = (1/|D|) * sum_x 1[judge(x) = Fail]``, the share of
  samples the judge fails; lower is better.
* Relative Superiority Index (eq. 8): with a pairwise decision ``d in {win, tie, lose}`` of a
  model against a baseline on the same prompt and seed, ``RSI = (N_win + N_tie) /
  (N_lose + N_tie)``; above 1, the model matches or beats the baseline more often than it is
  beaten. With no losses and no ties it is infinite (reported as ``inf``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["anatomical_error_rate", "pairwise_decisions", "relative_superiority_index"]


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
