"""Image generation for serving: per-image seeds, fixed-shape passes, Best-of-N selection.

A serving replica batches images of several requests into one pass of the model. Two rules
make an image depend only on its own request, never on what it was batched with:

* every image has its own ``torch.Generator`` (seeded by the image's seed) for its initial
  latents and for the noise of each stochastic DDIM step;
* every pass has the same number of rows (``pass_size``; short passes are padded with copies of
  their first image): matrix and convolution kernels choose their blocking, hence their float
  rounding, by the batch shape, so a fixed shape gives the same bits whatever shares the pass.

``pad=False`` drops the second rule: a pass has as many rows as it has images (up to
``pass_size``), so a part-full pass costs less, and an image is the same whatever shares its
pass only up to float rounding (kernels for 1 row and for 8 round differently).

With ``pass_size=1`` and ``eta > 0`` an image is exactly what ``DiffusionPolicy.rollout`` samples
for that prompt and seed: serving reproduces the training-time sampler.

Nothing here touches Ray or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from armature.policies import DiffusionPolicy, SamplingParams
from armature.rewards.selection import best_of  # shared with armature.actors.best_of_n

__all__ = ["ImageJob", "PassShape", "generate", "best_of"]


@dataclass(frozen=True)
class PassShape:
    """What images must share to go through the same pass (requests with equal shapes batch)."""

    steps: int
    height: int
    width: int
    guidance_scale: float
    eta: float


@dataclass(frozen=True)
class ImageJob:
    """One image to make."""

    prompt: str
    negative_prompt: str
    seed: int


def generate(
    policy: DiffusionPolicy,
    jobs: list[ImageJob],
    shape: PassShape,
    pass_size: int,
    should_stop=None,
    pad: bool = True,
) -> np.ndarray:
    """Images ``[len(jobs), H, W, 3]`` uint8, ``pass_size`` rows per model pass (``pad=False``: at
    most ``pass_size``).

    ``should_stop()`` is polled between denoising steps; when it returns True the work is
    abandoned with ``TimeoutError``.
    """
    images, sampling = [], policy.sampling
    policy.sampling = SamplingParams(
        num_steps=shape.steps,
        guidance_scale=shape.guidance_scale,
        eta=shape.eta,
        height=shape.height,
        width=shape.width,
    )
    try:
        for start in range(0, len(jobs), pass_size):
            chunk = jobs[start : start + pass_size]
            padded = chunk + [chunk[0]] * (pass_size - len(chunk)) if pad else chunk
            images.append(_sample(policy, padded, shape, should_stop)[: len(chunk)])
    finally:
        policy.sampling = sampling
    return np.concatenate(images)


@torch.no_grad()
def _sample(policy: DiffusionPolicy, jobs: list[ImageJob], shape: PassShape, should_stop) -> np.ndarray:
    policy.set_timesteps(shape.steps)  # the family's schedule (DDIM, or flow-matching sigmas)
    scheduler = policy.scheduler
    cond = policy.encode([j.prompt for j in jobs], negative_prompts=[j.negative_prompt for j in jobs])
    generators = [torch.Generator(device=policy.device).manual_seed(j.seed) for j in jobs]
    latents = torch.cat(
        [
            torch.randn((1,) + policy.latent_shape, generator=g, device=policy.device, dtype=policy.unet.dtype)
            for g in generators
        ]
    ) * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        if should_stop is not None and should_stop():
            raise TimeoutError("generation abandoned: the request's deadline passed")
        output = policy.predict(cond, latents, t)
        noise = None
        if shape.eta > 0:  # the training sampler's step (DDIM eta / flow SDE noise level), own noise per image
            noise = torch.cat(
                [
                    torch.randn((1,) + latents.shape[1:], generator=g, device=policy.device, dtype=torch.float32)
                    for g in generators
                ]
            )
        latents, _ = policy.step(output, t, latents, stochastic=shape.eta > 0, noise=noise, noise_level=shape.eta)
    return policy.decode(latents)
