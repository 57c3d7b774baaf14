"""Sampling with gradients through the denoising chain: the core of reward-gradient learners.

AlignProp (Prabhudesai et al., 2023), DRaFT-K (Clark et al., 2023) and ReFL (Xu et al., 2023,
ImageReward) all maximise a differentiable reward ``r`` of a generated image directly:

    J(theta) = E_{c, x_T ~ N(0, I)} [ r( D( x_0(theta; x_T, c) ), c ) ]

where ``x_0`` is the end of the (DDIM) denoising chain ``x_{t-1} = step(x_t, eps_theta(x_t, t, c))``
and ``D`` the VAE decoder. Backpropagating through all T steps costs T UNet activations, so:

* **truncation** (AlignProp's randomized truncated backpropagation, DRaFT-K's fixed K): the first
  T - K steps run without a graph; only the last K steps, the decoder and the reward carry
  gradients. AlignProp draws K per batch, DRaFT-K keeps it fixed.
* **gradient checkpointing**: each UNet call in the backpropagated steps is wrapped in
  ``torch.utils.checkpoint``: its activations are dropped after the forward pass and recomputed
  during the backward pass, so a step keeps only its input latents alive. Memory then grows with
  K by one latent per step instead of one UNet's activations per step.
* **ReFL** stops the chain at a late step t (the K-th from the end), and scores the one-step
  prediction of the clean latent instead of ``x_0`` (DDIM, Song et al. 2021, eq. 9)::

      x0_hat = (x_t - sqrt(1 - a_t) * eps_theta(x_t, t, c)) / sqrt(a_t)

  so the gradient passes through one UNet call.
* **KL to the base policy** (``reference``): at each backpropagated step the reference network
  (the adapter switched off, or a frozen copy) predicts from the same ``x_t`` without a graph, and
  :func:`armature.losses.noise_gap` of the two outputs, averaged over those steps, is returned as
  ``kl`` for the learner to add to its loss.

The step itself is DDIM (Song et al. 2021, eq. 12) with noise level ``eta``::

    x_{t-1} = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps + sigma_t * z,
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)

with ``z`` drawn outside the graph (the reparameterisation: the gradient flows through the
mean). Everything goes through the public interface of :class:`~armature.policies.DiffusionPolicy`
(``predict``, ``scheduler``, ``pipe.vae``); nothing here knows of Ray or of the learner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from armature.losses.kl import noise_gap

__all__ = ["GradSample", "predicted_x0", "ddim_step", "decode_with_grad", "sample_with_grad"]


@dataclass
class GradSample:
    """What :func:`sample_with_grad` returns."""

    latents: torch.Tensor  # the latents the reward scores: x_0, or ReFL's x0_hat (with a graph)
    images: torch.Tensor  # their decoded images [B, 3, H, W] in [0, 1] (with a graph)
    backprop_steps: int  # K: UNet calls the gradient passes through
    final_latents: torch.Tensor | None = None  # ReFL with complete=True: the chain's true x_0 (no graph)
    kl: torch.Tensor | None = None  # with a reference: the mean noise_gap over the backpropagated steps (a graph)


def _alphas(scheduler, timestep: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, a_prev): cumulative alpha products at t and at the next (lower) sampled timestep."""
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    t = int(timestep)
    prev = t - step
    a_prev = alphas[prev] if prev >= 0 else torch.as_tensor(float(scheduler.final_alpha_cumprod), device=device)
    return alphas[t], a_prev


def predicted_x0(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """The clean latent predicted from ``x_t`` in one step (DDIM eq. 9; epsilon or v prediction)."""
    a_t, _ = _alphas(scheduler, timestep, sample.device)
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
    if prediction == "v_prediction":
        return a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
    if prediction == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction!r}")


def ddim_step(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One differentiable DDIM step ``x_t -> x_{t-1}`` (eq. 12); ``noise`` is needed when eta > 0."""
    a_t, a_prev = _alphas(scheduler, timestep, sample.device)
    x0 = predicted_x0(scheduler, model_output, timestep, sample)
    eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("a stochastic DDIM step (eta > 0) needs its noise")
        prev = prev + sigma * noise
    return prev


def decode_with_grad(policy, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to float images ``[B, 3, H, W]`` in ``[0, 1]``, keeping the graph."""
    vae = policy.pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def sample_with_grad(
    policy,
    cond: dict[str, torch.Tensor],
    latents: torch.Tensor,
    backprop_steps: int,
    *,
    checkpoint: bool = True,
    predict_x0: bool = False,
    complete: bool = False,
    generator: torch.Generator | None = None,
    reference: Callable | None = None,
) -> GradSample:
    """Denoise ``latents`` (x_T) with ``policy``, gradients through the last ``backprop_steps`` steps.

    Args:
        policy: a :class:`DiffusionPolicy` (its ``sampling.num_steps``, ``guidance_scale`` and
            ``eta`` are used; ``policy.denoiser`` may be a DeepSpeed engine).
        cond: conditioning from ``policy.encode``.
        latents: the initial noise, already scaled by the scheduler's ``init_noise_sigma``.
        backprop_steps: K in ``[1, T]``. Without ``predict_x0``, the last K steps carry gradients
            (AlignProp / DRaFT-K). With ``predict_x0`` (ReFL), the chain stops at the K-th step
            from the end and the reward scores that step's x0_hat (one UNet call with gradients).
        checkpoint: recompute each backpropagated UNet call in the backward pass.
        complete: ReFL only: also finish the chain without gradients (``final_latents``), to
            report the reward of the images the policy actually samples.
        generator: for the stochastic steps' noise (eta > 0).
        reference: ``(cond, x_t, t) -> output`` of the reference network; given, ``kl`` holds the
            mean :func:`noise_gap` to it over the backpropagated steps.
    """
    scheduler, eta = policy.scheduler, float(policy.sampling.eta)
    num_steps = policy.sampling.num_steps
    scheduler.set_timesteps(num_steps, device=policy.device)
    timesteps = scheduler.timesteps
    if not 1 <= backprop_steps <= len(timesteps):
        raise ValueError(f"backprop_steps={backprop_steps}: must be in [1, {len(timesteps)}] (the sampling steps)")
    first_grad = len(timesteps) - backprop_steps

    def model(x, t):
        if checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(policy.predict, cond, x, t, use_reentrant=False)
        return policy.predict(cond, x, t)

    def noise_like(x):
        if eta <= 0:
            return None
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)

    gaps = []  # with a reference: noise_gap at each backpropagated step (with a graph)
    x = latents
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= first_grad):
            out = model(x, t)
            if reference is not None and i >= first_grad:
                with torch.no_grad():
                    ref = reference(cond, x, t)
                gaps.append(noise_gap(out, ref))
            if predict_x0 and i == first_grad:
                x0_hat = predicted_x0(scheduler, out.float(), t, x.float())
                final = None
                if complete:
                    with torch.no_grad():
                        y = ddim_step(scheduler, out.float(), t, x.float(), eta, noise_like(x)).to(x.dtype)
                        for t_rest in timesteps[i + 1 :]:
                            y = ddim_step(
                                scheduler,
                                policy.predict(cond, y, t_rest).float(),
                                t_rest,
                                y.float(),
                                eta,
                                noise_like(y),
                            ).to(x.dtype)
                    final = y
                return GradSample(x0_hat, decode_with_grad(policy, x0_hat), 1, final, gaps[0] if gaps else None)
            x = ddim_step(scheduler, out.float(), t, x.float(), eta, noise_like(x)).to(latents.dtype)
    kl = torch.stack(gaps).mean() if gaps else None
    return GradSample(x, decode_with_grad(policy, x), backprop_steps, kl=kl)
