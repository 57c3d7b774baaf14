"""Reward-model losses and metrics: pure math on score tensors (no Ray, MLflow or Hydra).

Scores ``s`` are the reward model's outputs, higher = better.

* :func:`bradley_terry_loss` -- pairwise Bradley-Terry with ties. With ``d = s_w - s_l`` and
  the target ``y = 1`` (w preferred) or ``y = 0.5`` (a tie),

      L = -[ y log sigma(d) + (1 - y) log sigma(-d) ]

  (a tie pulls ``d`` toward 0; it is the binary cross-entropy of ``sigma(d)`` against y).
* :func:`listwise_loss` -- HPS (Wu et al., 2023, seed 004, eq. 1): one image chosen among
  ``n`` in {2, 3, 4} for a prompt; the cross-entropy of the softmax over the set's scores,

      L = -s_chosen + log sum_j exp(s_j)          (padding entries masked out)

  which is Bradley-Terry without ties for ``n = 2``.
* :func:`ordinal_loss` -- an ordinal severity head on the same scalar (BACON's four levels
  0 none .. 3 severe): a cumulative-link model with learned increasing thresholds
  ``theta_1 < theta_2 < theta_3``: ``P(severity >= k) = sigma(theta_k - s)`` (a lower score
  means a worse error), trained by the binary cross-entropy of each of the K - 1 events;
  unknown severities (``< 0``) are ignored.

Metrics: :func:`pairwise_accuracy` (ties excluded, and ties included with a calibrated tie
band ``|d| <= eps`` predicting "tie"), :func:`spearman` (rank correlation with average ranks
for ties), :func:`agreement` (how often two rewards order a pair the same way).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "bradley_terry_loss",
    "listwise_loss",
    "ordinal_loss",
    "ordinal_thresholds",
    "pairwise_accuracy",
    "tie_calibrated_accuracy",
    "spearman",
    "agreement",
]


def bradley_terry_loss(s_w: torch.Tensor, s_l: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Bradley-Terry loss over pairs; ``tie`` (bool ``[B]``) pairs get target 0.5."""
    d = s_w - s_l
    target = torch.ones_like(d) if tie is None else torch.where(tie.to(d.device), 0.5, 1.0).to(d.dtype)
    return F.binary_cross_entropy_with_logits(d, target)


def listwise_loss(scores: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean HPS cross-entropy: ``scores [B, n]``, ``chosen [B]`` (index), ``valid [B, n]`` (bool)."""
    if valid is not None:
        scores = scores.masked_fill(~valid.to(scores.device), float("-inf"))
    return F.cross_entropy(scores, chosen.to(scores.device).long())


def ordinal_thresholds(raw: torch.Tensor) -> torch.Tensor:
    """Increasing thresholds from free parameters: ``theta_1 = raw_1``, ``theta_k = theta_{k-1} + softplus(raw_k)``."""
    return torch.cat([raw[:1], raw[:1] + torch.cumsum(F.softplus(raw[1:]), 0)])


def ordinal_loss(scores: torch.Tensor, severity: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Cumulative-link loss: mean over known severities and the K - 1 events ``severity >= k``.

    ``thresholds`` (``[K - 1]``, increasing) are the *left* ends of the event logits; the
    logit of ``P(severity >= k)`` is ``thresholds[k - 1] - score``. Returns 0 (with a graph)
    when no severity is known.
    """
    known = severity >= 0
    if not bool(known.any()):
        return scores.sum() * 0.0
    s, y = scores[known], severity[known].to(scores.device)
    levels = torch.arange(1, len(thresholds) + 1, device=scores.device)
    logits = thresholds[None, :] - s[:, None]  # [N, K-1]
    targets = (y[:, None] >= levels[None, :]).to(scores.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets)


# --------------------------------------------------------------------------- metrics (numpy)
def pairwise_accuracy(s_w, s_l, tie=None) -> float:
    """Share of non-tie pairs with ``s_w > s_l`` (ties excluded); NaN without any."""
    d = np.asarray(s_w, np.float64) - np.asarray(s_l, np.float64)
    tie = np.zeros(len(d), bool) if tie is None else np.asarray(tie, bool)
    strict = ~tie
    return float(np.mean(d[strict] > 0)) if strict.any() else float("nan")


def tie_calibrated_accuracy(s_w, s_l, tie) -> tuple[float, float]:
    """Accuracy with ties included: a pair is predicted "tie" when ``|d| <= eps``, else by the
    sign of ``d``; ``eps`` is chosen among 0 and the observed ``|d|`` to maximise the accuracy
    (tie calibration). Returns ``(accuracy, eps)``."""
    d = np.asarray(s_w, np.float64) - np.asarray(s_l, np.float64)
    tie = np.asarray(tie, bool)
    best = (-1.0, 0.0)
    for eps in np.concatenate([[0.0], np.sort(np.abs(d))]):
        predicted_tie = np.abs(d) <= eps
        correct = np.where(tie, predicted_tie, (~predicted_tie) & (d > 0))
        accuracy = float(correct.mean()) if len(d) else float("nan")
        if accuracy > best[0]:
            best = (accuracy, float(eps))
    return best


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson's r of the average ranks); NaN if either is constant."""
    ra, rb = _average_ranks(np.asarray(a, np.float64)), _average_ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def agreement(d_a, d_b) -> float:
    """Share of pairs two rewards order the same way (``sign(d_a) == sign(d_b)``, both nonzero)."""
    d_a, d_b = np.asarray(d_a, np.float64), np.asarray(d_b, np.float64)
    both = (d_a != 0) & (d_b != 0)
    return float(np.mean(np.sign(d_a[both]) == np.sign(d_b[both]))) if both.any() else float("nan")
