"""The Best-of-N expectation of benchmarks/gym_reward_ranking.py against brute force."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from gym_reward_ranking import auc, best_of_n_expectation  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_best_of_n_expectation_matches_every_subset(n):
    rng = np.random.default_rng(n)
    scores, values = rng.normal(size=7), rng.integers(0, 4, size=7).astype(float)
    picks = [values[list(subset)][np.argmax(scores[list(subset)])] for subset in itertools.combinations(range(7), n)]
    assert best_of_n_expectation(scores, values, n) == pytest.approx(np.mean(picks))


def test_best_of_n_needs_a_big_enough_pool():
    with pytest.raises(ValueError, match="per-prompt"):
        best_of_n_expectation(np.zeros(4), np.zeros(4), 8)


def test_auc_counts_pairs():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    bad = np.array([True, False, True, False])
    # bad 0.1 is below both good ones; bad 0.35 is below 0.4 and 0.8: 4 of 4
    assert auc(scores, bad) == 1.0
    assert auc(-scores, bad) == 0.0
    assert auc(np.zeros(4), bad) == 0.5
