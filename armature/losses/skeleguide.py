"""SkeleGuide's losses (Wu et al., "SkeleGuide: Explicit Skeleton Reasoning for Context-Aware
Human-in-Place Image Synthesis"): reason (a scene-aware layout) then render (the person).

Time convention: the paper's (sec. 3.1), **not** diffusers'. ``t`` runs from 0 (noise) to 1
(data) and

    x_t = (1 - t) x_0 + t x_1,       x_0 ~ N(0, I) noise, x_1 data,       v = x_1 - x_0.

(diffusers' FLUX uses sigma = 1 - t and predicts noise - data = -v; the policy converts, see
``armature.policies.skeleguide.SkeleGuidePipeline.flow``.)

* ``reasoning_loss`` (eq. 4): flow matching of the Skeletal branch's velocity u_theta1(M_t, t,
  c_src, c_T) toward M - M_0, M = E(I_M) the encoded ground-truth scene-aware layout.
* ``one_step_layout`` (eq. 6): the layout M_hat the reasoner implies in one step. The paper
  writes M_hat = M_0 + v_hat, the velocity taken at the noise M_0 (t = 0). At any t the straight
  path gives M = M_t + (1 - t) v, so we implement

      M_hat = M_t + (1 - t) v_hat,

  which is eq. 6 at t = 0 (M_t = M_0) and, for every t, returns M exactly when v_hat is the true
  velocity M - M_0 (the t = 0 form returns M_0 + v_hat, wrong for t > 0). It is differentiable
  in v_hat, so the rendering loss reaches the reasoner through it (phase 2).
* ``rendering_loss`` (eq. 5): flow matching of the Appearance branch's velocity
  u_theta2(z_{h,t}, t, c_T, c_M) toward z_h - z_{h,0}, conditioned on a layout latent c_M.
* ``joint_loss`` (phase 2): lambda_reason * L_reason + lambda_render * L_render (0.5 and 1).

The squared norm of eqs. 4-5 is taken as the mean over a sample's elements (the usual scale of
a flow-matching loss, independent of the latent size), then averaged over the batch; ``weight``
(optional, ``[B]``) weights the samples. Pure torch.
"""

from __future__ import annotations

import torch

__all__ = [
    "LAMBDA_REASON",
    "LAMBDA_RENDER",
    "flow_interpolate",
    "flow_target",
    "flow_matching_error",
    "reasoning_loss",
    "rendering_loss",
    "one_step_layout",
    "joint_loss",
]

LAMBDA_REASON = 0.5  # the paper's phase-2 weights (sec. 4.1)
LAMBDA_RENDER = 1.0


def _per_sample(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``t`` (a number or ``[B]``) shaped to broadcast over ``like`` (``[B, ...]``)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.shape != like.shape[:1]:
        raise ValueError(f"t has shape {tuple(t.shape)}; expected a number or [{like.shape[0]}] (one per sample)")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def flow_interpolate(noise: torch.Tensor, data: torch.Tensor, t) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t x_1 (t = 0: noise, t = 1: data)."""
    t = _per_sample(t, data)
    return (1 - t) * noise + t * data


def flow_target(noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The straight path's velocity x_1 - x_0."""
    return data - noise


def flow_matching_error(velocity: torch.Tensor, noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``[B]``: mean over each sample's elements of (u - (x_1 - x_0))^2, in float32 or wider."""
    if velocity.shape != data.shape or noise.shape != data.shape:
        raise ValueError(
            f"shapes differ: velocity {tuple(velocity.shape)}, noise {tuple(noise.shape)}, data {tuple(data.shape)}"
        )
    dtype = torch.promote_types(velocity.dtype, torch.float32)
    diff = velocity.to(dtype) - flow_target(noise, data).to(dtype)
    return diff.pow(2).flatten(1).mean(1)


def _mean(errors: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return errors.mean()
    weight = torch.as_tensor(weight, dtype=errors.dtype, device=errors.device)
    if weight.shape != errors.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected {tuple(errors.shape)}")
    return (weight * errors).mean()


def reasoning_loss(
    velocity: torch.Tensor, layout_noise: torch.Tensor, layout: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 4: E ||u_theta1(M_t, t, c_src, c_T) - (M - M_0)||^2; ``layout`` is M, ``layout_noise`` M_0."""
    return _mean(flow_matching_error(velocity, layout_noise, layout), weight)


def rendering_loss(
    velocity: torch.Tensor, image_noise: torch.Tensor, image: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 5: E ||u_theta2(z_{h,t}, t, c_T, c_M) - (z_h - z_{h,0})||^2; ``image`` is z_h."""
    return _mean(flow_matching_error(velocity, image_noise, image), weight)


def one_step_layout(layout_t: torch.Tensor, velocity: torch.Tensor, t=0.0) -> torch.Tensor:
    """M_hat = M_t + (1 - t) v_hat: eq. 6 (M_0 + v_hat) at t = 0, the straight path's endpoint at any t."""
    if velocity.shape != layout_t.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and M_t {tuple(layout_t.shape)} differ in shape")
    t = _per_sample(t, layout_t)
    return layout_t + (1 - t) * velocity


def joint_loss(
    reason: torch.Tensor,
    render: torch.Tensor,
    lambda_reason: float = LAMBDA_REASON,
    lambda_render: float = LAMBDA_RENDER,
) -> torch.Tensor:
    """Phase 2's total: lambda_reason * L_reason + lambda_render * L_render."""
    return lambda_reason * reason + lambda_render * render
