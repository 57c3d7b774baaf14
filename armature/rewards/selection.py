"""Choosing among scored candidates (Best-of-N): shared by the Best-of-N library call and job
(``armature/actors/best_of_n.py``) and the serving generator (``armature/serve``). No Ray here."""

from __future__ import annotations

import numpy as np

__all__ = ["best_of", "rank_candidates"]


def best_of(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` best scores, best first (ties: the earlier candidate; NaN ranks last)."""
    scores = np.where(np.isnan(scores), -np.inf, np.asarray(scores, dtype=np.float64))
    return np.argsort(-scores, kind="stable")[:n]


def rank_candidates(scores: np.ndarray) -> np.ndarray:
    """For scores ``[P, N]`` (N candidates of each of P prompts), each row's candidate indices
    ordered best first, by :func:`best_of`'s rule. ``[P, N]``."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [prompts, candidates], got shape {scores.shape}")
    return np.stack([best_of(row, row.shape[0]) for row in scores]) if len(scores) else scores.astype(int)
