"""Stochastic sampler steps that also return the log-density of the transition.

DDPO (Black et al., 2023) treats each denoising step as a Gaussian policy
    p(x_{t-1} | x_t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I)
and needs log p for the sampled x_{t-1}. For DDIM with noise level ``eta`` the mean and
standard deviation are those of Song et al. (2021), eq. 12:

    x0_hat   = prediction of the clean sample from the model output
    sigma_t  = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mu       = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps_hat

with ``a`` the cumulative alpha products. The log-density is averaged (not summed) over every
non-batch dimension, as in DDPO's reference implementation, so its scale does not depend on
the latent resolution.

Nothing here touches Ray, MLflow or Hydra: it is pure tensor math on a diffusers scheduler's
noise schedule.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ddim_step_with_logprob", "gaussian_log_prob"]


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2), elementwise, then averaged over all non-batch dimensions -> [B]."""
    log_prob = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a [B] (or scalar) tensor so it broadcasts over a [B, ...] sample of rank ndim."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} with noise level ``eta``, and log p(x_{t-1} | x_t).

    Args:
        scheduler: a ``diffusers.DDIMScheduler`` on which ``set_timesteps`` was called.
        model_output: the (guided) model output at ``timestep``; epsilon, v or sample
            prediction according to ``scheduler.config.prediction_type``.
        timestep: an int, a 0-d tensor, or a ``[B]`` tensor of training timesteps.
        sample: x_t, shape ``[B, ...]``.
        eta: DDIM noise level, > 0 (eta = 1 is DDPM's posterior variance).
        prev_sample: if given, this transition is scored instead of a new one sampled.
        generator: torch generator for the step's noise.
        noise: the step's standard normal noise, drawn beforehand (instead of from ``generator``).

    Returns:
        ``(prev_sample, log_prob)`` with ``log_prob`` of shape ``[B]``.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    if eta <= 0:
        raise ValueError(f"eta={eta}: the log-probability needs a stochastic step, set eta > 0")
    if getattr(scheduler.config, "thresholding", False):
        raise NotImplementedError("dynamic thresholding is not supported; set thresholding=False")

    batch = sample.shape[0]
    timestep = torch.as_tensor(timestep, device=sample.device).long()
    if timestep.ndim == 0:
        timestep = timestep.expand(batch)
    step_size = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = timestep - step_size

    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    final_alpha = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=sample.device)
    alpha_t = alphas_cumprod[timestep]
    alpha_prev = torch.where(prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final_alpha)
    beta_t = 1 - alpha_t
    beta_prev = 1 - alpha_prev
    variance = (beta_prev / beta_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    if bool((std <= 0).any()):
        raise ValueError(
            "the DDIM step has zero variance, so it has no log-density: the last timestep is 0 "
            "(use steps_offset=1) or jumps to alpha=1 (use set_alpha_to_one=False)"
        )

    ndim = sample.ndim
    alpha_t, alpha_prev, beta_t, std = (_per_sample(v, ndim) for v in (alpha_t, alpha_prev, beta_t, std))
    dtype = sample.dtype
    sample32, output32 = sample.float(), model_output.float()

    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        x0 = (sample32 - beta_t.sqrt() * output32) / alpha_t.sqrt()
        eps = output32
    elif prediction == "v_prediction":
        x0 = alpha_t.sqrt() * sample32 - beta_t.sqrt() * output32
        eps = alpha_t.sqrt() * output32 + beta_t.sqrt() * sample32
    elif prediction == "sample":
        x0 = output32
        eps = (sample32 - alpha_t.sqrt() * x0) / beta_t.sqrt()
    else:
        raise ValueError(f"unknown prediction_type {prediction!r}")

    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)  # as diffusers' DDIM step (use_clipped_model_output=False)

    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps

    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = (mean + std * noise.float()).to(dtype)

    log_prob = gaussian_log_prob(prev_sample.float(), mean, std)
    return prev_sample.to(dtype), log_prob
