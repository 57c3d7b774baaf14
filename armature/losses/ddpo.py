"""DDPO's clipped-ratio policy-gradient objective (Black et al., 2023, eq. 4 with PPO clipping), and
its decoupled form for samples drawn by an older policy (rollouts one epoch ahead of the learner)."""

from __future__ import annotations

import torch

__all__ = ["ddpo_loss", "decoupled_ppo_loss"]


def ddpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped loss for one denoising step of a batch of trajectories.

    ratio = exp(log_prob - old_log_prob); with A the advantages clipped to +-adv_clip_max,
    loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range))).

    Returns the scalar loss and detached diagnostics: ``approx_kl`` = 0.5 * mean(delta^2) with
    delta = log_prob - old_log_prob, and ``clipfrac`` = mean(|ratio - 1| > clip_range).
    """
    if clip_range < 0 or adv_clip_max <= 0:
        raise ValueError(f"clip_range={clip_range} must be >= 0 and adv_clip_max={adv_clip_max} > 0")
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    delta = log_prob - old_log_prob
    ratio = torch.exp(delta)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    info = {
        "approx_kl": 0.5 * (delta.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
    }
    return loss, info


def decoupled_ppo_loss(
    log_prob: torch.Tensor,
    prox_log_prob: torch.Tensor,
    behav_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
    weight_cap: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The decoupled PPO objective (AReaL, Fu et al., 2025) for samples from a stale policy.

    The ratio is clipped against a proximal policy (the learner's weights before this update)
    instead of the behaviour policy that sampled, and the clipped objective is weighted by the
    behaviour correction w = min(exp(prox_log_prob - behav_log_prob), weight_cap), held constant:
    with A the advantages clipped to +-adv_clip_max and r = exp(log_prob - prox_log_prob),
    loss = mean(w * max(-A * r, -A * clamp(r, 1 - clip_range, 1 + clip_range))).
    With prox_log_prob == behav_log_prob it is ``ddpo_loss``.

    Returns the scalar loss and detached diagnostics: ``approx_kl`` and ``clipfrac`` against the
    proximal policy (as ``ddpo_loss``'s), ``behaviour_weight`` = mean(w) and ``behaviour_capped``
    = the share of w at the cap.
    """
    if clip_range < 0 or adv_clip_max <= 0 or weight_cap <= 0:
        raise ValueError(
            f"clip_range={clip_range} must be >= 0, adv_clip_max={adv_clip_max} > 0, weight_cap={weight_cap} > 0"
        )
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    delta = log_prob - prox_log_prob.detach()
    ratio = torch.exp(delta)
    per_sample = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    raw = torch.exp((prox_log_prob - behav_log_prob).detach())
    weight = raw.clamp(max=weight_cap)
    loss = (weight * per_sample).mean()
    info = {
        "approx_kl": 0.5 * (delta.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "behaviour_weight": weight.mean(),
        "behaviour_capped": (raw > weight_cap).float().mean(),
    }
    return loss, info
