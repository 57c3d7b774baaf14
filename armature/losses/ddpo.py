"""DDPO's clipped-ratio policy-gradient objective (Black et al., 2023, eq. 4 with PPO clipping)."""

from __future__ import annotations

import torch

__all__ = ["ddpo_loss"]


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
