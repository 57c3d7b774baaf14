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


def hps_select(scores: np.ndarray, alpha: float, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """HPS's training-set rule ("Adapting Stable Diffusion", Wu et al. 2023, sec. 6): per prompt
    with ``n`` scored images, the best image ``I*`` is kept as *preferred* if

        p = exp(s(I*)) / sum_{I in B} exp(s(I)) > alpha / n,        s = scale * score,

    and the worst as *non-preferred* by the same test on the negated scores. ``scale`` plays the
    part of CLIP's logit scale for rewards on other ranges (HPS's own alpha is 2.0).

    Args:
        scores: ``[P, n]`` rewards of each prompt's images.
    Returns:
        ``(preferred, non_preferred)``: ``[P]`` image indices each, ``-1`` where the test fails.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [prompts, n >= 2], got shape {scores.shape}")
    n = scores.shape[1]

    def pick(s: np.ndarray) -> np.ndarray:
        z = scale * s
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        best = p.argmax(axis=1)
        return np.where(p[np.arange(len(s)), best] > alpha / n, best, -1)

    return pick(scores), pick(-scores)
