"""GRPO's group advantages and clipped, KL-penalised loss against explicit per-element loops."""

import math
import random

import numpy as np
import pytest
import torch

from armature.losses import group_advantages, grpo_loss


def test_group_advantages_match_a_loop_over_groups():
    rng = random.Random(0)
    groups = [rng.choice(["cat", "dog", "owl"]) for _ in range(24)]
    rewards = [rng.gauss(0, 3) for _ in range(24)]
    ours = group_advantages(rewards, groups, eps=1e-4)
    for i, g in enumerate(groups):
        members = [r for r, h in zip(rewards, groups) if h == g]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((r - mean) ** 2 for r in members) / len(members))
        assert ours[i] == pytest.approx((rewards[i] - mean) / (std + 1e-4), rel=1e-5)
        assert group_advantages(rewards, groups, scale_by_std=False)[i] == pytest.approx(rewards[i] - mean, rel=1e-5)
    # each group sums to zero; a singleton group gets 0
    assert group_advantages([3.0, 1.0, 2.0], ["a", "b", "b"])[0] == 0.0
    with pytest.raises(ValueError, match="group labels"):
        group_advantages([1.0, 2.0], ["a"])


def _reference_loss(lp, old, adv, ref, clip, adv_max, beta):
    terms, kls = [], []
    for i in range(len(lp)):
        a = max(-adv_max, min(adv_max, adv[i]))
        r = math.exp(lp[i] - old[i])
        clipped = max(1 - clip, min(1 + clip, r))
        terms.append(-min(r * a, clipped * a))  # PPO: the pessimistic (smaller) objective
        p_ratio = math.exp(ref[i] - lp[i])  # p_ref / p_theta
        kls.append(p_ratio - math.log(p_ratio) - 1)
    return sum(terms) / len(terms) + beta * sum(kls) / len(kls), sum(kls) / len(kls)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_an_explicit_loop_and_its_gradient(beta):
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(16, generator=g) * 0.2).double().requires_grad_()
    old = lp.detach() + torch.randn(16, generator=g).double() * 0.1
    ref = lp.detach() + torch.randn(16, generator=g).double() * 0.3
    adv = torch.randn(16, generator=g).double() * 3
    loss, info = grpo_loss(lp, old, adv, clip_range=0.05, adv_clip_max=4.0, ref_log_prob=ref, beta=beta)
    expected, kl = _reference_loss(lp.tolist(), old.tolist(), adv.tolist(), ref.tolist(), 0.05, 4.0, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert info["kl"].item() == pytest.approx(kl, rel=1e-10)
    # gradient by central finite differences of the loop
    loss.backward()
    h = 1e-6
    for i in (0, 5, 11):
        up, down = lp.detach().clone(), lp.detach().clone()
        up[i] += h
        down[i] -= h
        fd = (
            _reference_loss(up.tolist(), old.tolist(), adv.tolist(), ref.tolist(), 0.05, 4.0, beta)[0]
            - _reference_loss(down.tolist(), old.tolist(), adv.tolist(), ref.tolist(), 0.05, 4.0, beta)[0]
        ) / (2 * h)
        assert lp.grad[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_on_policy_ratio_one_gives_minus_mean_advantage_and_zero_kl():
    adv = torch.tensor([1.0, -2.0, 0.5])
    lp = torch.tensor([-1.0, -2.0, -3.0])
    loss, info = grpo_loss(lp, lp.clone(), adv, 0.1, 5.0, ref_log_prob=lp.clone(), beta=1.0)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert info["kl"].item() == 0.0 and info["clipfrac"].item() == 0.0
    with pytest.raises(ValueError, match="ref_log_prob"):
        grpo_loss(lp, lp, adv, 0.1, 5.0, beta=0.1)
    assert np.isfinite(loss.item())
