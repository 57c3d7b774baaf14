"""Flow-GRPO's SDE step for flow-matching models, with the log-density of the transition.

A rectified-flow model predicts a velocity v = eps - x0 on the path x_s = (1 - s) x0 + s eps
(s = sigma, from 1 = noise down to 0 = data). Its sampler is the Euler ODE step
    x_{s'} = x_s + (s' - s) v,     s' < s.
Flow-GRPO (Liu et al., 2025, arXiv 2505.05470, eq. 9 and 12) turns this ODE into an SDE with the
same marginals, so each step is a Gaussian policy with a density:

    x_{s'} = x_s + [v + sigma_s^2 / (2 s) * (x_s + (1 - s) v)] dt + sigma_s sqrt(|dt|) eps,
    dt = s' - s < 0,   sigma_s = a * sqrt(s / (1 - s))   (a = ``noise_level``)

so x_{s'} ~ N(mean, (sigma_s sqrt(|dt|))^2 I). At s = 1 the ratio s / (1 - s) is infinite: as
Flow-GRPO's reference code does, the denominator then uses the schedule's second sigma
(``scheduler.sigmas[1]``) instead of 1. With ``noise_level=0`` the step is exactly the
scheduler's Euler step (a deterministic transition: its log-probability is returned as 0, and
scoring a given ``prev_sample`` is refused).

As ``ddim_step_with_logprob``: the log-density is averaged over every non-batch dimension
(shape ``[B]``), and ``prev_sample`` scores a given transition instead of sampling one.
"""

from __future__ import annotations

import torch

from armature.policies.logprob import gaussian_log_prob

__all__ = ["flow_sde_step_with_logprob", "flow_step_sigmas"]


def flow_step_sigmas(scheduler, timestep, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, next sigma), each ``[B]`` float32, for entries of ``scheduler.timesteps``.

    A timestep is matched to its position in ``scheduler.timesteps`` (within 1e-3 of the
    training-time scale, i.e. exactly up to float error); the step goes from
    ``scheduler.sigmas[i]`` to ``scheduler.sigmas[i + 1]``.
    """
    if scheduler.timesteps is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    timestep = torch.as_tensor(timestep, device=device, dtype=torch.float32)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch)
    if timestep.shape != (batch,):
        raise ValueError(f"timestep has shape {tuple(timestep.shape)}: expected a scalar or [{batch}]")
    schedule = scheduler.timesteps.to(device=device, dtype=torch.float32)
    distance = (timestep[:, None] - schedule[None, :]).abs()
    nearest, index = distance.min(dim=1)
    if bool((nearest > 1e-3).any()):
        bad = timestep[nearest > 1e-3].tolist()
        raise ValueError(
            f"timesteps {bad[:3]} are not in scheduler.timesteps (set_timesteps with the "
            "number of steps the trajectory was sampled with)"
        )
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
    return sigmas[index], sigmas[index + 1]


def flow_sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SDE step sigma -> next sigma of a ``FlowMatchEulerDiscreteScheduler``, and its log-prob.

    Args:
        scheduler: a flow-matching scheduler on which ``set_timesteps`` was called.
        model_output: the (guided) velocity prediction at ``timestep``, shape of ``sample``.
        timestep: an entry of ``scheduler.timesteps`` (0-d tensor or number) or a ``[B]`` tensor.
        sample: x_s, shape ``[B, ...]``.
        noise_level: ``a`` in sigma_s = a * sqrt(s / (1 - s)); 0 gives the Euler ODE step.
        prev_sample: if given, this transition is scored instead of a new one sampled.
        generator: torch generator for the step's noise.
        noise: the step's standard normal noise, drawn beforehand (instead of from ``generator``).

    Returns:
        ``(prev_sample, log_prob)``, ``log_prob`` of shape ``[B]`` (zeros for a deterministic step).
    """
    if noise_level < 0:
        raise ValueError(f"noise_level={noise_level} must be >= 0")
    batch, ndim = sample.shape[0], sample.ndim
    sigma, sigma_next = flow_step_sigmas(scheduler, timestep, batch, sample.device)
    shape = (batch,) + (1,) * (ndim - 1)
    dt = (sigma_next - sigma).reshape(shape)
    s = sigma.reshape(shape)
    sample32, v = sample.float(), model_output.float()

    if noise_level == 0:
        if prev_sample is not None:
            raise ValueError("noise_level=0 is a deterministic step: it has no density to score prev_sample")
        euler = sample32 + dt * v
        return euler.to(sample.dtype), torch.zeros(batch, device=sample.device)

    sigma_max = float(scheduler.sigmas[1])  # stands in for s = 1 in s / (1 - s)
    denominator = 1 - torch.where(s >= 1, torch.full_like(s, sigma_max), s)
    sde_sigma = noise_level * torch.sqrt(s / denominator)
    mean = sample32 + (v + sde_sigma**2 / (2 * s) * (sample32 + (1 - s) * v)) * dt
    std = sde_sigma * torch.sqrt(-dt)
    if bool((std <= 0).any()):
        raise ValueError("a step with sigma = 0 or no step size has no density (is the schedule increasing?)")

    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = (mean + std * noise.float()).to(sample.dtype)
    log_prob = gaussian_log_prob(prev_sample.float(), mean, std)
    return prev_sample.to(sample.dtype), log_prob
