"""Reward-model losses and metrics against independent calculations (loops, closed forms, scipy)."""

import math

import numpy as np
import pytest
import torch

from armature.losses.reward_model import (
    agreement,
    bradley_terry_loss,
    listwise_loss,
    ordinal_loss,
    ordinal_thresholds,
    pairwise_accuracy,
    spearman,
    tie_calibrated_accuracy,
)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_bradley_terry_with_ties_matches_a_loop():
    s_w, s_l = torch.tensor([2.0, -1.0, 0.3, 0.0]), torch.tensor([1.0, 0.5, 0.3, 3.0])
    tie = torch.tensor([False, False, True, True])
    expected = []
    for w, l, t in zip(s_w.tolist(), s_l.tolist(), tie.tolist()):
        p = 1 / (1 + math.exp(-(w - l)))
        expected.append(-(0.5 * math.log(p) + 0.5 * math.log(1 - p)) if t else -_log_sigmoid(w - l))
    assert bradley_terry_loss(s_w, s_l, tie).item() == pytest.approx(np.mean(expected), rel=1e-6)
    # a tie's loss is smallest at d = 0: log 2
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([True])).item() == pytest.approx(
        math.log(2)
    )
    # its gradient pushes d toward 0 from both sides
    d = torch.tensor([0.7, -0.7], requires_grad=True)
    bradley_terry_loss(d, torch.zeros(2), torch.tensor([True, True])).backward()
    assert d.grad[0] > 0 > d.grad[1]


def test_listwise_matches_softmax_by_hand_and_reduces_to_bt():
    scores = torch.tensor([[1.0, 2.0, 0.5, 9.0], [0.1, -0.3, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    chosen = torch.tensor([1, 0])
    expected = []
    for row, ok, c in zip(scores.tolist(), valid.tolist(), chosen.tolist()):
        z = sum(math.exp(v) for v, k in zip(row, ok) if k)
        expected.append(-math.log(math.exp(row[c]) / z))
    assert listwise_loss(scores, chosen, valid).item() == pytest.approx(np.mean(expected), rel=1e-6)
    pair = torch.tensor([[0.8, -0.4]])
    assert listwise_loss(pair, torch.tensor([0])).item() == pytest.approx(
        bradley_terry_loss(pair[:, 0], pair[:, 1]).item(), rel=1e-6
    )


def test_ordinal_loss_matches_cumulative_link_by_hand():
    raw = torch.tensor([-1.0, 0.2, -0.5])
    theta = ordinal_thresholds(raw)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert theta.tolist() == pytest.approx([-1.0, -1.0 + sp(0.2), -1.0 + sp(0.2) + sp(-0.5)], rel=1e-6)
    scores = torch.tensor([0.5, -2.0, 1.0])
    severity = torch.tensor([0, 3, -1])  # the last one unknown
    total, n = 0.0, 0
    for s, y in zip(scores.tolist()[:2], severity.tolist()[:2]):
        for k in (1, 2, 3):
            p = 1 / (1 + math.exp(-(theta[k - 1].item() - s)))
            total += -(math.log(p) if y >= k else math.log(1 - p))
            n += 1
    assert ordinal_loss(scores, severity, theta).item() == pytest.approx(total / n, rel=1e-5)
    assert ordinal_loss(scores, torch.tensor([-1, -1, -1]), theta).item() == 0.0


def test_accuracies():
    s_w, s_l = np.array([1.0, 0.0, 2.0, 0.5, 0.1]), np.array([0.0, 1.0, 1.0, 0.5, 0.0])
    tie = np.array([False, False, False, True, True])
    assert pairwise_accuracy(s_w, s_l, tie) == pytest.approx(2 / 3)
    accuracy, eps = tie_calibrated_accuracy(s_w, s_l, tie)
    # brute force over a fine grid of bands
    best = max(
        np.mean([(abs(w - l) <= e) if t else (abs(w - l) > e and w > l) for w, l, t in zip(s_w, s_l, tie)])
        for e in np.linspace(0, 3, 3001)
    )
    assert accuracy == pytest.approx(best) and accuracy == pytest.approx(4 / 5) and 0.1 <= eps < 1.0


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, 50).astype(float)  # severity levels: many ties
    b = -a + rng.normal(0, 1, 50)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, rel=1e-9)
    assert math.isnan(spearman(np.ones(5), np.arange(5)))


def test_agreement():
    assert agreement([1, -1, 2, 0, 3], [2, 1, 1, 5, -1]) == pytest.approx(2 / 4)
