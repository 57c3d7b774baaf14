"""DiffusionNFT: negative-aware fine-tuning on the forward process (Zheng et al., 2025,
arXiv 2509.16117), for rectified-flow models x_t = (1 - t) x0 + t eps, velocity v = eps - x0.

1. Rewards become an optimality probability in [0, 1] (sec. 3.2, eq. 5):
       r = 1/2 + 1/2 * clip((R - mean_c R) / Z_c, -1, 1)
   with mean_c over the images of prompt c and Z_c a standard deviation (the group's or the
   whole batch's).
2. The trained velocity v_theta and the frozen sampling ("old") policy's v_old define the
   implicit positive and negative policies (eq. 7):
       v+ = (1 - beta) v_old + beta v_theta,      v- = (1 + beta) v_old - beta v_theta
3. The loss regresses the positive branch onto the flow-matching target on well-rewarded
   samples and the negative branch on poorly rewarded ones (eq. 6):
       L = E[ r ||v+ - v||^2 + (1 - r) ||v- - v||^2 ]
   whose per-sample minimiser is v_theta = v_old + (2r - 1)(v - v_old) / beta: towards the
   target when r > 1/2, away from it when r < 1/2, unchanged at r = 1/2.
4. After each update the sampling policy follows the trained one softly,
   theta_old <- eta theta_old + (1 - eta) theta (sec. 4, "soft update"); see ``ema_update``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["optimality_probability", "forward_process", "nft_loss", "ema_update"]


def optimality_probability(rewards, groups, norm: str = "group", eps: float = 1e-6) -> np.ndarray:
    """r = 1/2 + 1/2 clip((R - group mean) / Z, -1, 1); Z the group's std (``norm="group"``) or the
    batch's (``"global"``). A group whose rewards are all equal gets r = 1/2."""
    rewards = np.asarray(rewards, dtype=np.float64)
    labels = np.asarray(groups, dtype=object)
    if rewards.ndim != 1 or len(labels) != len(rewards):
        raise ValueError(f"{len(labels)} group labels for rewards of shape {rewards.shape}")
    if norm not in ("group", "global"):
        raise ValueError(f"norm={norm!r}: use group or global")
    out = np.empty_like(rewards)
    for label in dict.fromkeys(labels.tolist()):
        mask = labels == label
        z = rewards[mask].std() if norm == "group" else rewards.std()
        out[mask] = 0.5 + 0.5 * np.clip((rewards[mask] - rewards[mask].mean()) / (z + eps), -1, 1)
    return out.astype(np.float32)


def forward_process(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow: ``(x_t, v)`` with x_t = (1 - t) x0 + t noise and v = noise - x0; t is ``[B]``."""
    t = t.reshape(t.shape + (1,) * (x0.ndim - 1)).to(x0.dtype)
    return (1 - t) * x0 + t * noise, noise - x0


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss (eq. 6-7) for a batch ``[B, ...]``; ``r``, ``weight`` are ``[B]``.

    Squared errors are averaged over each sample's dimensions, weighted by ``weight`` (default
    1), then averaged over the batch. Returns the loss and detached diagnostics: the positive
    and negative branches' errors and the trained policy's distance to the sampling policy.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    v_old = v_old.detach()
    dims = tuple(range(1, v_theta.ndim))
    positive = (1 - beta) * v_old + beta * v_theta
    negative = (1 + beta) * v_old - beta * v_theta
    err_pos = ((positive - target) ** 2).mean(dim=dims)
    err_neg = ((negative - target) ** 2).mean(dim=dims)
    per_sample = r * err_pos + (1 - r) * err_neg
    if weight is not None:
        per_sample = per_sample * weight
    info = {
        "positive_error": err_pos.detach().mean(),
        "negative_error": err_neg.detach().mean(),
        "policy_shift": ((v_theta.detach() - v_old) ** 2).mean(),
    }
    return per_sample.mean(), info


@torch.no_grad()
def ema_update(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], eta: float) -> dict[str, torch.Tensor]:
    """theta_old <- eta * theta_old + (1 - eta) * theta, name by name (new tensors returned)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta={eta} must be in [0, 1]")
    if old.keys() != new.keys():
        raise KeyError("the sampling and trained weights have different names")
    return {k: eta * old[k].float() + (1 - eta) * new[k].float() for k in old}
