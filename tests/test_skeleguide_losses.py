"""SkeleGuide's losses (armature.losses.skeleguide) against explicit float64 loops and numpy."""

import numpy as np
import pytest
import torch

from armature.losses.skeleguide import (
    LAMBDA_REASON,
    LAMBDA_RENDER,
    flow_interpolate,
    joint_loss,
    one_step_layout,
    reasoning_loss,
    rendering_loss,
)


def _arrays(seed, *shape, n=3):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for _ in range(n)]


def _loop_fm(u, x0, x1, weight=None):
    """(1/B) sum_b w_b (1/D) sum_k (u - (x1 - x0))^2, element by element in Python floats."""
    b_count = u.shape[0]
    total = 0.0
    for b in range(b_count):
        flat_u, flat_0, flat_1 = u[b].ravel(), x0[b].ravel(), x1[b].ravel()
        s = 0.0
        for k in range(flat_u.size):
            s += (float(flat_u[k]) - (float(flat_1[k]) - float(flat_0[k]))) ** 2
        total += (1.0 if weight is None else float(weight[b])) * s / flat_u.size
    return total / b_count


@pytest.mark.parametrize("fn", [reasoning_loss, rendering_loss])
def test_flow_matching_losses_match_a_loop(fn):
    u, m0, m = _arrays(0, 4, 6, 5)  # [B, tokens, channels], like packed FLUX latents
    got = fn(torch.tensor(u), torch.tensor(m0), torch.tensor(m))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_loop_fm(u, m0, m), rel=1e-12)
    w = np.array([1.0, 0.0, 2.0, 0.5])
    got_w = fn(torch.tensor(u), torch.tensor(m0), torch.tensor(m), weight=torch.tensor(w))
    assert got_w.item() == pytest.approx(_loop_fm(u, m0, m, w), rel=1e-12)


def test_loss_is_zero_at_the_true_velocity_and_float32_inputs_give_float32():
    _, m0, m = _arrays(1, 2, 3, 4)
    m0, m = torch.tensor(m0, dtype=torch.float32), torch.tensor(m, dtype=torch.float32)
    loss = reasoning_loss(m - m0, m0, m)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        reasoning_loss(m[:, :2], m0, m)


def test_interpolation_uses_the_papers_time_convention():
    _, x0, x1 = _arrays(2, 3, 4, 2)
    t = np.array([0.0, 0.3, 1.0])
    got = flow_interpolate(torch.tensor(x0), torch.tensor(x1), torch.tensor(t)).numpy()
    for b in range(3):
        for i in range(4):
            for j in range(2):
                want = (1 - t[b]) * x0[b, i, j] + t[b] * x1[b, i, j]
                assert got[b, i, j] == pytest.approx(want, abs=1e-15)
    assert np.array_equal(flow_interpolate(torch.tensor(x0), torch.tensor(x1), 0.0).numpy(), x0)  # t = 0: noise


def test_one_step_layout_is_eq6_at_t0_and_exact_on_the_straight_path():
    v_hat, m0, m = _arrays(3, 3, 5, 4)
    # eq. 6 literally at t = 0: M_hat = M_0 + v_hat, element by element
    got = one_step_layout(torch.tensor(m0), torch.tensor(v_hat), 0.0).numpy()
    for idx in np.ndindex(m0.shape):
        assert got[idx] == pytest.approx(m0[idx] + v_hat[idx], abs=1e-15)
    # at any t, the true velocity M - M_0 recovers M (the t = 0 formula would not)
    t = np.array([0.1, 0.5, 0.9])
    m_t = np.stack([(1 - t[b]) * m0[b] + t[b] * m[b] for b in range(3)])
    got = one_step_layout(torch.tensor(m_t), torch.tensor(m - m0), torch.tensor(t)).numpy()
    np.testing.assert_allclose(got, m, rtol=0, atol=1e-12)
    naive = m_t + (m - m0)  # M_t + v: overshoots for t > 0
    assert not np.allclose(naive, m)
    # a generic v_hat: M_t + (1 - t) v_hat, numpy
    got = one_step_layout(torch.tensor(m_t), torch.tensor(v_hat), torch.tensor(t)).numpy()
    np.testing.assert_allclose(got, m_t + (1 - t)[:, None, None] * v_hat, rtol=0, atol=1e-12)


def test_one_step_layout_passes_gradients_to_the_velocity():
    v_hat = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    m_t = torch.ones(2, 3, dtype=torch.float64)
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    one_step_layout(m_t, v_hat, t).sum().backward()
    np.testing.assert_allclose(v_hat.grad.numpy(), [[0.75] * 3, [0.25] * 3])


def test_joint_loss_weights_match_the_paper():
    assert (LAMBDA_REASON, LAMBDA_RENDER) == (0.5, 1.0)
    u_r, m0, m = _arrays(4, 2, 4, 3)
    u_i, z0, z = _arrays(5, 2, 4, 3)
    reason = reasoning_loss(torch.tensor(u_r), torch.tensor(m0), torch.tensor(m))
    render = rendering_loss(torch.tensor(u_i), torch.tensor(z0), torch.tensor(z))
    want = 0.5 * _loop_fm(u_r, m0, m) + 1.0 * _loop_fm(u_i, z0, z)
    assert joint_loss(reason, render).item() == pytest.approx(want, rel=1e-12)
    assert joint_loss(reason, render, 2.0, 0.0).item() == pytest.approx(2 * _loop_fm(u_r, m0, m), rel=1e-12)
