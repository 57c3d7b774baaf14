"""Pure math of the learners: losses and advantages. Imports torch and numpy only."""

from armature.losses.advantages import PerPromptStatTracker, normalize_rewards
from armature.losses.ddpo import ddpo_loss, decoupled_ppo_loss
from armature.losses.dpo import (
    denoising_target,
    diffusion_dpo_loss,
    margin_bounded_loss,
    preference_gap,
    resize_mask,
    weighted_denoising_error,
)
from armature.losses.grpo import group_advantages, grpo_loss
from armature.losses.kl import k3_kl, noise_gap
from armature.losses.nft import ema_update, forward_process, nft_loss, optimality_probability

__all__ = [
    "PerPromptStatTracker",
    "ddpo_loss",
    "decoupled_ppo_loss",
    "group_advantages",
    "grpo_loss",
    "k3_kl",
    "noise_gap",
    "ema_update",
    "forward_process",
    "nft_loss",
    "optimality_probability",
    "denoising_target",
    "diffusion_dpo_loss",
    "margin_bounded_loss",
    "normalize_rewards",
    "preference_gap",
    "resize_mask",
    "weighted_denoising_error",
]
