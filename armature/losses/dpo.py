"""Preference losses for diffusion models: Diffusion-DPO and ASAP's localized, margin-bounded DPO.

Notation (Wallace et al., 2023; ASAP, Sec. 4.2): for a pair (x_w preferred, x_l rejected), one
timestep t and one noise draw shared by both images, ``err`` is the per-sample denoising error
of a model (the policy, or the frozen reference). The implicit preference gap is

    delta = -((pol_err_w - pol_err_l) - (ref_err_w - ref_err_l))

positive when the policy denoises the preferred image better, relative to the reference, than
the rejected one. Diffusion-DPO minimises ``-log sigmoid(beta / 2 * delta)``; ASAP's bounded
variant (eq. 6) regresses delta onto a finite margin: ``(delta - tau)^2``. ASAP's localized
errors (eq. 4) weight the residual by ``1 + alpha * M`` inside the square, M a region mask.

Pure math: imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "PREDICTION_TYPES",
    "denoising_target",
    "resize_mask",
    "weighted_denoising_error",
    "preference_gap",
    "diffusion_dpo_loss",
    "margin_bounded_loss",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or ``[B]`` tensor shaped to broadcast against ``like`` ``[B, ...]``."""
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return x.reshape(-1, *([1] * (like.ndim - 1))) if x.ndim else x


def denoising_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """What the network regresses onto, for clean latents ``x0`` noised with ``noise``.

    * ``epsilon``: the noise.
    * ``v_prediction``: v = sqrt(a) * noise - sqrt(1 - a) * x0, with a = alpha_bar_t (the
      cumulative signal level of the timestep; scalar or ``[B]``).
    * ``flow`` (rectified flow / flow matching, x_t = (1 - t) x0 + t noise): the velocity
      noise - x0; ``alpha_bar`` is unused.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "v_prediction":
        a = _per_sample(alpha_bar, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A region mask ``[B, H, W]`` or ``[B, 1, H, W]`` resized to ``size`` (e.g. the latent grid).

    A cell of the output is the largest mask value of the pixels it covers (adaptive max
    pooling when shrinking), so a region never vanishes; enlarging repeats values (nearest).
    Returns ``[B, 1, h, w]`` floats.
    """
    m = mask.float()
    if m.ndim == 3:
        m = m.unsqueeze(1)
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    if m.shape[-2] >= size[0] and m.shape[-1] >= size[1]:
        return F.adaptive_max_pool2d(m, size)
    return F.interpolate(m, size=size, mode="nearest")


def weighted_denoising_error(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, alpha: float = 0.0
) -> torch.Tensor:
    """Per-sample ``mean(((1 + alpha * M) * (pred - target))^2)`` over all but the batch dim. ``[B]``.

    ``pred`` and ``target`` are ``[B, C, h, w]``; ``mask`` M is ``[B, 1, h, w]`` or ``[B, h, w]``
    (values in [0, 1], the same h, w; see :func:`resize_mask`), broadcast over channels. The
    weight sits inside the square as in ASAP eq. 4, so a masked residual counts (1 + alpha)^2
    times. No mask, or alpha = 0, gives the plain denoising MSE.
    """
    residual = pred - target
    if mask is not None and alpha != 0.0:
        m = mask.to(residual.dtype)
        if m.ndim == residual.ndim - 1:
            m = m.unsqueeze(1)
        residual = (1.0 + alpha * m) * residual
    return residual.pow(2).mean(dim=tuple(range(1, residual.ndim)))


def preference_gap(pol_err_w, pol_err_l, ref_err_w, ref_err_l) -> torch.Tensor:
    """delta = -((pol_err_w - pol_err_l) - (ref_err_w - ref_err_l)), per pair. ``[B]``."""
    return -((pol_err_w - pol_err_l) - (ref_err_w - ref_err_l))


def _info(delta, pol_err_w, pol_err_l, ref_err_w, ref_err_l, tie) -> dict[str, torch.Tensor]:
    """Detached diagnostics. Accuracy and margin are over the strict pairs (ties excluded)."""
    d = delta.detach()
    strict = torch.ones_like(d, dtype=torch.bool) if tie is None else ~tie.to(torch.bool)
    n = strict.sum().clamp(min=1)
    return {
        "implicit_acc": ((d > 0) & strict).sum() / n,  # share of pairs the policy ranks right
        "margin": torch.where(strict, d, torch.zeros_like(d)).sum() / n,  # mean delta
        "pol_err_w": pol_err_w.detach().mean(),
        "pol_err_l": pol_err_l.detach().mean(),
        "ref_err_w": ref_err_w.detach().mean(),
        "ref_err_l": ref_err_l.detach().mean(),
        "num_pairs": strict.sum().to(d.dtype),
    }


def diffusion_dpo_loss(
    pol_err_w: torch.Tensor,
    pol_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    tie: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO: batch mean of ``-log sigmoid(beta / 2 * delta)``.

    ``tie`` (optional ``[B]`` bools) marks pairs rated equal: their term is the loss of a
    50/50 preference, ``-(log sigmoid(z) + log sigmoid(-z)) / 2`` with z = beta / 2 * delta,
    which is smallest at delta = 0. Returns the loss and detached diagnostics (``implicit_acc``
    = mean(delta > 0), ``margin`` = mean(delta), both over the non-tie pairs; mean errors).
    """
    delta = preference_gap(pol_err_w, pol_err_l, ref_err_w, ref_err_l)
    z = 0.5 * beta * delta
    terms = -F.logsigmoid(z)
    if tie is not None:
        tie = tie.to(device=z.device, dtype=torch.bool)
        terms = torch.where(tie, -0.5 * (F.logsigmoid(z) + F.logsigmoid(-z)), terms)
    info = _info(delta, pol_err_w, pol_err_l, ref_err_w, ref_err_l, tie)
    return terms.mean(), info


def margin_bounded_loss(
    pol_err_w: torch.Tensor,
    pol_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    tau: float,
    tie: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ASAP eq. 6: batch mean of ``(delta - tau)^2``; a tie's target margin is 0.

    Unlike DPO's loss, which keeps pushing delta up, this one is smallest at delta = tau.
    Returns the loss and the same diagnostics as :func:`diffusion_dpo_loss`.
    """
    delta = preference_gap(pol_err_w, pol_err_l, ref_err_w, ref_err_l)
    target = torch.full_like(delta, float(tau))
    if tie is not None:
        target = torch.where(tie.to(device=delta.device, dtype=torch.bool), torch.zeros_like(delta), target)
    info = _info(delta, pol_err_w, pol_err_l, ref_err_w, ref_err_l, tie)
    return (delta - target).pow(2).mean(), info
