"""Diffusion-DPO and ASAP's localized, margin-bounded loss (armature.losses.dpo) against
independent calculations: Python loops over float64 numpy arrays, and diffusers' own v-target."""

import math

import numpy as np
import pytest
import torch

from armature.losses import (
    denoising_target,
    diffusion_dpo_loss,
    margin_bounded_loss,
    resize_mask,
    weighted_denoising_error,
)


def hand_weighted_error(pred, target, mask, alpha):
    """mean over (c, y, x) of ((1 + alpha * M[y, x]) * (pred - target))^2, one sample at a time."""
    b, c, h, w = pred.shape
    out = []
    for i in range(b):
        total = 0.0
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    m = 0.0 if mask is None else float(mask[i, y, x])
                    total += ((1.0 + alpha * m) * (float(pred[i, ch, y, x]) - float(target[i, ch, y, x]))) ** 2
        out.append(total / (c * h * w))
    return out


def hand_log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def errors(seed=0, b=6):
    g = np.random.default_rng(seed)
    return [torch.tensor(g.uniform(0.2, 1.5, b), dtype=torch.float64) for _ in range(4)]


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("alpha", [0.0, 1.0, 10.0])
def test_weighted_error_matches_loops(alpha):
    g = np.random.default_rng(1)
    pred, target = g.normal(size=(3, 4, 5, 6)), g.normal(size=(3, 4, 5, 6))
    mask = (g.uniform(size=(3, 5, 6)) > 0.6).astype(np.float64)
    mask[2] = g.uniform(size=(5, 6))  # a soft mask too
    expected = hand_weighted_error(pred, target, mask, alpha)
    for m in (torch.tensor(mask), torch.tensor(mask)[:, None]):  # [B, h, w] and [B, 1, h, w]
        got = weighted_denoising_error(torch.tensor(pred), torch.tensor(target), m, alpha)
        assert got.shape == (3,)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_weighted_error_known_value_and_no_mask():
    pred, target = torch.ones(1, 2, 4, 4, dtype=torch.float64), torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    mask = torch.zeros(1, 4, 4, dtype=torch.float64)
    mask[0, :2, :2] = 1  # a quarter of the pixels, weight (1 + 1)^2 = 4 there
    assert weighted_denoising_error(pred, target, mask, alpha=1.0).item() == pytest.approx(0.75 + 0.25 * 4)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.equal(weighted_denoising_error(pred, target), mse)
    assert torch.equal(weighted_denoising_error(pred, target, mask, alpha=0.0), mse)


def test_weighted_error_has_gradients():
    pred = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    mask[:, :, 1, 1] = 1
    weighted_denoising_error(pred, target, mask, alpha=2.0).sum().backward()
    expected = 2 * (pred.detach() - target) * (1 + 2.0 * mask) ** 2 / (4 * 9)
    torch.testing.assert_close(pred.grad, expected)


# ---------------------------------------------------------------------------- Diffusion-DPO


def test_dpo_loss_info_and_gradient_match_hand():
    pw, pl, rw, rl = [e.clone().requires_grad_(i == 0) for i, e in enumerate(errors())]
    beta = 3.0
    loss, info = diffusion_dpo_loss(pw, pl, rw, rl, beta)
    deltas = [-((a - b) - (c - d)) for a, b, c, d in zip(*(t.tolist() for t in (pw, pl, rw, rl)))]
    terms = [-hand_log_sigmoid(beta / 2 * d) for d in deltas]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert info["implicit_acc"].item() == pytest.approx(sum(d > 0 for d in deltas) / len(deltas))
    assert info["margin"].item() == pytest.approx(sum(deltas) / len(deltas), rel=1e-12)
    assert info["pol_err_w"].item() == pytest.approx(float(np.mean(pw.tolist())))
    assert info["ref_err_l"].item() == pytest.approx(float(np.mean(rl.tolist())))
    # d loss / d pol_err_w = sigmoid(-z) * beta / 2 / B, with z = beta / 2 * delta
    loss.backward()
    n = len(deltas)
    hand = [1 / (1 + math.exp(beta / 2 * d)) * beta / 2 / n for d in deltas]
    np.testing.assert_allclose(pw.grad.numpy(), hand, rtol=1e-10)


def test_dpo_loss_is_stable_for_large_gaps():
    pw = torch.tensor([0.0, 1e4], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    loss, _ = diffusion_dpo_loss(pw, zero, zero, zero, beta=2000.0)  # z = 0 and z = -1e7
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((math.log(2) + 1e7) / 2, rel=1e-9)
    loss, _ = diffusion_dpo_loss(-pw, zero, zero, zero, beta=2000.0)  # z = +1e7: term ~ 0
    assert loss.item() == pytest.approx(math.log(2) / 2, rel=1e-9)


def test_ties_are_a_50_50_preference_and_left_out_of_accuracy():
    pw, pl, rw, rl = errors(2, b=4)
    tie = torch.tensor([False, True, False, True])
    beta = 5.0
    loss, info = diffusion_dpo_loss(pw, pl, rw, rl, beta, tie=tie)
    deltas = [-((a - b) - (c - d)) for a, b, c, d in zip(*(t.tolist() for t in (pw, pl, rw, rl)))]
    terms = []
    for d, t in zip(deltas, tie.tolist()):
        z = beta / 2 * d
        terms.append(-0.5 * (hand_log_sigmoid(z) + hand_log_sigmoid(-z)) if t else -hand_log_sigmoid(z))
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-12)
    strict = [d for d, t in zip(deltas, tie.tolist()) if not t]
    assert info["implicit_acc"].item() == pytest.approx(sum(d > 0 for d in strict) / 2)
    assert info["margin"].item() == pytest.approx(sum(strict) / 2, rel=1e-12)
    # the tie term is smallest at delta = 0
    z = torch.zeros(1, dtype=torch.float64)
    at_zero, _ = diffusion_dpo_loss(z, z, z, z, beta, tie=torch.tensor([True]))
    off_zero, _ = diffusion_dpo_loss(z + 0.1, z, z, z, beta, tie=torch.tensor([True]))
    assert at_zero < off_zero


# ---------------------------------------------------------------------------- ASAP


def test_margin_bounded_loss_matches_hand():
    pw, pl, rw, rl = [e.clone().requires_grad_(i == 1) for i, e in enumerate(errors(3))]
    tau = 0.01
    loss, info = margin_bounded_loss(pw, pl, rw, rl, tau)
    deltas = [-((a - b) - (c - d)) for a, b, c, d in zip(*(t.tolist() for t in (pw, pl, rw, rl)))]
    assert loss.item() == pytest.approx(sum((d - tau) ** 2 for d in deltas) / len(deltas), rel=1e-12)
    assert info["margin"].item() == pytest.approx(sum(deltas) / len(deltas), rel=1e-12)
    loss.backward()  # d/d pol_err_l of (delta - tau)^2 / B, where d delta / d pol_err_l = +1
    np.testing.assert_allclose(pl.grad.numpy(), [2 * (d - tau) / len(deltas) for d in deltas], rtol=1e-10)
    # minimal exactly at delta = tau; a tie's target is 0
    z = torch.zeros(1, dtype=torch.float64)
    assert margin_bounded_loss(z - tau, z, z, z, tau)[0].item() == 0.0
    assert margin_bounded_loss(z, z, z, z, tau, tie=torch.tensor([True]))[0].item() == 0.0


def test_localized_gap_with_mask_weights_only_the_region():
    """A pair that differs only inside the mask: alpha scales the gap by (1 + alpha)^2 there."""
    g = np.random.default_rng(4)
    target = torch.tensor(g.normal(size=(1, 4, 6, 6)))
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    mask[..., 2:4, 2:4] = 1
    ref = target + 0.3
    pol_w = ref.clone()
    pol_l = ref + 0.5 * mask  # the policy got worse on x_l, inside the region only
    errs = lambda a: [weighted_denoising_error(p, target, mask, a) for p in (pol_w, pol_l, ref, ref)]
    gap0 = diffusion_dpo_loss(*errs(0.0), beta=1.0)[1]["margin"].item()
    gap10 = diffusion_dpo_loss(*errs(10.0), beta=1.0)[1]["margin"].item()
    # by hand: inside the 4 masked cells of 4 channels the residual goes 0.3 -> 0.8
    hand0 = ((0.8**2 - 0.3**2) * 16) / (4 * 36)
    assert gap0 == pytest.approx(hand0, rel=1e-12)
    assert gap10 == pytest.approx(hand0 * 11**2, rel=1e-12)


def test_alpha_zero_without_margin_is_exactly_diffusion_dpo():
    """ASAP's errors with alpha = 0 are the plain MSEs, so its DPO loss is Diffusion-DPO's."""
    g = np.random.default_rng(5)
    target = torch.tensor(g.normal(size=(4, 4, 5, 5)))
    preds = [torch.tensor(g.normal(size=(4, 4, 5, 5))) for _ in range(4)]
    mask = torch.tensor((g.uniform(size=(4, 1, 5, 5)) > 0.5).astype(np.float64))
    asap = [weighted_denoising_error(p, target, mask, alpha=0.0) for p in preds]
    plain = [((p - target) ** 2).mean(dim=(1, 2, 3)) for p in preds]  # Diffusion-DPO's errors
    for a, b in zip(asap, plain):
        assert torch.equal(a, b)
    assert torch.equal(diffusion_dpo_loss(*asap, beta=5000.0)[0], diffusion_dpo_loss(*plain, beta=5000.0)[0])
    hand = [hand_weighted_error(p.numpy(), target.numpy(), None, 0.0) for p in preds]
    deltas = [-((a - b) - (c - d)) for a, b, c, d in zip(*hand)]
    expected = sum(-hand_log_sigmoid(2500.0 * d) for d in deltas) / 4
    assert diffusion_dpo_loss(*asap, beta=5000.0)[0].item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------- targets, masks


def test_denoising_targets():
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    assert torch.equal(denoising_target(x0, noise, None, "epsilon"), noise)
    assert torch.equal(denoising_target(x0, noise, None, "flow"), noise - x0)
    # v-prediction against diffusers' own implementation
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod.to(torch.float64)[t]
    v = denoising_target(x0, noise, a, "v_prediction")
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t).to(torch.float64), rtol=1e-6, atol=1e-6)
    # and by hand, element by element: v = sqrt(a) eps - sqrt(1 - a) x0
    for i in range(3):
        ai = float(a[i])
        hand = math.sqrt(ai) * noise[i, 1, 0, 1].item() - math.sqrt(1 - ai) * x0[i, 1, 0, 1].item()
        assert v[i, 1, 0, 1].item() == pytest.approx(hand, rel=1e-12)
    with pytest.raises(ValueError, match="prediction_type"):
        denoising_target(x0, noise, a, "sample")


def test_resize_mask_keeps_small_regions():
    mask = torch.zeros(2, 8, 8)
    mask[0, 5, 6] = 1  # one pixel
    small = resize_mask(mask, (4, 4))
    assert small.shape == (2, 1, 4, 4)
    assert small[0, 0, 2, 3] == 1 and small.sum() == 1
    assert resize_mask(mask[:, None], (8, 8)).shape == (2, 1, 8, 8)
    assert resize_mask(torch.ones(1, 2, 2), (4, 4)).sum() == 16
