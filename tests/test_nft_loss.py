"""DiffusionNFT's loss, optimality probabilities and soft update against explicit loops and
the closed-form minimiser of the loss."""

import math
import random

import numpy as np
import pytest
import torch

from armature.losses import ema_update, forward_process, nft_loss, optimality_probability


def test_optimality_probability_matches_a_loop():
    rng = random.Random(1)
    groups = [rng.choice("abc") for _ in range(30)]
    rewards = [rng.gauss(2, 1.5) for _ in range(30)]
    every = sum(rewards) / 30
    global_std = math.sqrt(sum((x - every) ** 2 for x in rewards) / 30)
    for norm in ("group", "global"):
        ours = optimality_probability(rewards, groups, norm=norm)
        for i, g in enumerate(groups):
            members = [x for x, h in zip(rewards, groups) if h == g]
            mean = sum(members) / len(members)
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / len(members)) if norm == "group" else global_std
            z = (rewards[i] - mean) / (std + 1e-6)
            assert ours[i] == pytest.approx(0.5 + 0.5 * max(-1.0, min(1.0, z)), abs=1e-6)
    assert np.all((ours >= 0) & (ours <= 1))
    assert np.all(optimality_probability([1.0, 1.0], ["a", "a"]) == 0.5)


def test_nft_loss_matches_an_elementwise_loop():
    g = torch.Generator().manual_seed(0)
    v_theta, v_old, target = (torch.randn(3, 2, 4, generator=g).double() for _ in range(3))
    r = torch.tensor([0.9, 0.1, 0.5]).double()
    w = torch.tensor([1.0, 2.0, 0.5]).double()
    beta = 0.7
    loss, info = nft_loss(v_theta, v_old, target, r, beta, weight=w)
    total = 0.0
    for b in range(3):
        pos = neg = 0.0
        flat = [
            (v_theta[b].flatten()[k].item(), v_old[b].flatten()[k].item(), target[b].flatten()[k].item())
            for k in range(8)
        ]
        for vt, vo, tg in flat:
            pos += (vo + beta * (vt - vo) - tg) ** 2 / 8  # (1 - beta) vo + beta vt
            neg += (vo - beta * (vt - vo) - tg) ** 2 / 8  # (1 + beta) vo - beta vt
        total += w[b].item() * (r[b].item() * pos + (1 - r[b].item()) * neg)
    assert loss.item() == pytest.approx(total / 3, rel=1e-12)


@pytest.mark.parametrize("r,beta", [(0.9, 1.0), (0.2, 0.5), (0.5, 2.0)])
def test_minimiser_is_old_plus_scaled_step_towards_or_away_from_the_target(r, beta):
    """Gradient descent on the loss lands on v_old + (2r - 1)(v - v_old) / beta (closed form)."""
    g = torch.Generator().manual_seed(3)
    v_old, target = torch.randn(1, 6, generator=g).double(), torch.randn(1, 6, generator=g).double()
    v = v_old.clone().requires_grad_()
    opt = torch.optim.SGD([v], lr=0.5 / beta**2)
    for _ in range(300):
        opt.zero_grad()
        nft_loss(v, v_old, target, torch.tensor([r]).double(), beta)[0].backward()
        opt.step()
    expected = v_old + (2 * r - 1) * (target - v_old) / beta
    torch.testing.assert_close(v.detach(), expected, rtol=1e-6, atol=1e-8)


def test_forward_process_and_soft_update():
    x0, noise = torch.ones(2, 3), torch.full((2, 3), 3.0)
    xt, v = forward_process(x0, noise, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(xt, torch.tensor([[1.5] * 3, [3.0] * 3]))
    torch.testing.assert_close(v, torch.full((2, 3), 2.0))
    old, new = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    torch.testing.assert_close(
        ema_update(old, new, 0.25)["w"], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6])
    )
    with pytest.raises(ValueError, match="beta"):
        nft_loss(x0, x0, x0, torch.ones(2), 0.0)
