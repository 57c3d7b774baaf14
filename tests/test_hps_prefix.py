"""HPS-style preference-prefix tuning: the selectivity rule against an explicit loop, the config
checks, and (slow) a run whose adapter scores better with the identifier as negative prompt."""

import math

import numpy as np
import pytest

from armature.platform.config import ConfigError, compose
from armature.rewards.selection import hps_select


def _loop_select(scores, alpha, scale):
    preferred, rejected = [], []
    for row in scores:
        n = len(row)
        for sign, out in ((1, preferred), (-1, rejected)):
            z = [sign * scale * s for s in row]
            total = sum(math.exp(v) for v in z)
            j = max(range(n), key=lambda i: z[i])
            out.append(j if math.exp(z[j]) / total > alpha / n else -1)
    return preferred, rejected


def test_hps_selectivity_matches_an_explicit_loop():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 4)) * rng.uniform(0.01, 1, size=(50, 1))
    for alpha, scale in ((2.0, 1.0), (2.0, 5.0), (1.5, 2.0)):
        preferred, rejected = hps_select(scores, alpha, scale)
        expected = _loop_select(scores, alpha, scale)
        np.testing.assert_array_equal(preferred, expected[0])
        np.testing.assert_array_equal(rejected, expected[1])
        assert 0 < (preferred >= 0).sum() < 50  # the mix exercises both outcomes
    # equal scores: p = 1/n, never above alpha/n for alpha >= 1
    assert hps_select(np.zeros((1, 3)), 1.0)[0][0] == -1
    with pytest.raises(ValueError, match="n >= 2"):
        hps_select(np.zeros((2, 1)), 2.0)


def test_hps_prefix_config_checks():
    cfg = compose("train", ["algo=hps_prefix", "reward=brightness"])
    assert cfg.algo.identifier == "Weird image." and cfg.algo.alpha == 2.0
    with pytest.raises(ConfigError, match=r"algo.eval_guidance_scale=1.0"):
        compose("train", ["algo=hps_prefix", "algo.eval_guidance_scale=1.0"])
    with pytest.raises(ConfigError, match=r"algo.candidates=1"):
        compose("train", ["algo=hps_prefix", "algo.candidates=1"])
