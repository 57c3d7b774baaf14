"""GRPO for diffusion and flow policies (Flow-GRPO, Liu et al., 2025, arXiv 2505.05470).

G images are sampled per prompt; their rewards are normalised within the prompt's group
(Flow-GRPO eq. 4, after DeepSeekMath's GRPO):

    A_i = (R_i - mean_{j in group} R_j) / (std_{j in group} R_j + eps)

and every stochastic denoising step t of image i contributes a PPO-clipped term with an optional
KL penalty to the frozen reference policy (Flow-GRPO eq. 6):

    J = mean_{i, t} [ min(r_t^i A_i, clip(r_t^i, 1 - eps_c, 1 + eps_c) A_i) - beta * KL_t^i ]
    r_t^i = p_theta(x_{t-1}^i | x_t^i) / p_old(x_{t-1}^i | x_t^i)

The KL is estimated on the sampled transition with Schulman's unbiased, always non-negative
"k3" estimator (DeepSeekMath eq. 4): KL ~ exp(d) - d - 1 with d = log p_ref - log p_theta.
Log-probabilities are those of the policies' step functions (averaged over latent dimensions).
"""

from __future__ import annotations

import numpy as np
import torch

from armature.losses.kl import k3_kl

__all__ = ["group_advantages", "grpo_loss"]


def group_advantages(rewards, groups, eps: float = 1e-4, scale_by_std: bool = True) -> np.ndarray:
    """(R_i - mean of i's group) / (std of i's group + eps); ``groups`` labels each reward.

    ``scale_by_std=False`` only centres within the group (Dr. GRPO's variant). A group of one
    sample gets advantage 0.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    labels = np.asarray(groups, dtype=object)
    if rewards.ndim != 1 or len(labels) != len(rewards):
        raise ValueError(f"{len(labels)} group labels for rewards of shape {rewards.shape}")
    advantages = np.empty_like(rewards)
    for label in dict.fromkeys(labels.tolist()):
        mask = labels == label
        centred = rewards[mask] - rewards[mask].mean()
        advantages[mask] = centred / (rewards[mask].std() + eps) if scale_by_std else centred
    return advantages.astype(np.float32)


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
    ref_log_prob: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The negated GRPO objective for one denoising step of a batch of samples (all ``[B]``).

    loss = mean(max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range))) + beta * mean(KL),
    with A clipped to +-adv_clip_max. Returns the loss and detached diagnostics:
    ``policy_loss``, ``kl`` (the k3 estimate; 0 without a reference), ``approx_kl``
    (0.5 mean (log r)^2, to the sampling policy) and ``clipfrac``.
    """
    if clip_range < 0 or adv_clip_max <= 0 or beta < 0:
        raise ValueError(f"clip_range={clip_range} and beta={beta} must be >= 0, adv_clip_max={adv_clip_max} > 0")
    if beta > 0 and ref_log_prob is None:
        raise ValueError("beta > 0 needs ref_log_prob, the reference policy's log-probabilities")
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    policy_loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    if ref_log_prob is not None:
        kl = k3_kl(log_prob, ref_log_prob)
    else:
        kl = torch.zeros((), device=log_prob.device)
    loss = policy_loss + beta * kl if beta > 0 else policy_loss
    info = {
        "policy_loss": policy_loss.detach(),
        "kl": kl.detach(),
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
    }
    return loss, info
