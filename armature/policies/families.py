"""What differs between model families, behind one interface.

A :class:`~armature.policies.diffusion.DiffusionPolicy` picks its family's :class:`Family` once,
at construction (:func:`family_of`), and asks it whatever depends on the family: which scheduler
steps it, which network denoises, how prompts become conditioning, the latent shape, the
sampling schedule, the network's inputs and the sampler step. The policy and the learners never
branch on the family name.

* :class:`UNetFamily` (SD 1.5) and :class:`SDXL`: DDIM, the stochastic step of DDPO;
* :class:`FlowFamily`, :class:`SD3` and :class:`Flux`: rectified flows, Flow-GRPO's SDE step.

Each method takes the policy, whose ``pipe``, ``unet`` (the denoising network, a transformer for
the flow families), ``denoiser`` (what computes the prediction: the network, or a learner's
engine), ``scheduler``, ``sampling``, ``device`` and ``image_size`` it reads. diffusers is
imported on first use (it is heavy; importing the policies package stays light).
"""

from __future__ import annotations

import numpy as np
import torch

from armature.policies.flow_logprob import flow_sde_step_with_logprob
from armature.policies.logprob import ddim_step_with_logprob

__all__ = [
    "FAMILIES",
    "FLOW_FAMILIES",
    "SD3",
    "SDXL",
    "Family",
    "FlowFamily",
    "Flux",
    "UNetFamily",
    "family_of",
    "guidance_branch",
]


def guidance_branch(v: torch.Tensor, guided: bool) -> torch.Tensor:
    """A recorded conditioning tensor ``[B, 2, ...]`` (unconditional, conditional) as the network's
    input: ``[2B, ...]``, unconditional first, under classifier-free guidance; else ``[B, ...]``."""
    return torch.cat([v[:, 0], v[:, 1]]) if guided else v[:, 1]


class Family:
    """The interface; see :class:`UNetFamily` and :class:`FlowFamily` for the two kinds."""

    name: str
    flow: bool  # rectified flow (sd3, flux) rather than a DDIM-sampled UNet
    pipeline_class: str  # the diffusers pipeline that loads a pretrained model of the family
    load_options: dict = {}  # extra ``from_pretrained`` arguments
    frozen: tuple[str, ...]  # the pipeline's modules frozen and put in eval mode

    def network(self, pipe) -> torch.nn.Module:
        raise NotImplementedError

    def make_scheduler(self, config: dict):
        raise NotImplementedError

    def native_size(self, pipe, network) -> int:
        """The model's native image side, in pixels."""
        raise NotImplementedError

    def max_sequence_length(self, pipe) -> int | None:
        """The tokens the long-prompt (T5) encoder reads; None: every encoder reads its tokenizer's maximum."""
        return None

    def token_limits(self, policy) -> dict[str, int]:
        """``{tokenizer name: tokens its encoder reads}`` for the pipeline's tokenizers."""
        names = [n for n in ("tokenizer", "tokenizer_2", "tokenizer_3") if getattr(policy.pipe, n, None) is not None]
        return {name: getattr(policy.pipe, name).model_max_length for name in names}

    def latent_shape(self, policy, height: int, width: int) -> tuple[int, ...]:
        f = policy.pipe.vae_scale_factor
        return (policy.unet.config.in_channels, height // f, width // f)

    def set_timesteps(self, policy, num_steps: int) -> None:
        raise NotImplementedError

    def encode(self, policy, prompts: list[str], negative: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning, each value ``[B, 2, ...]`` (unconditional, conditional)."""
        raise NotImplementedError

    def distilled(self, policy) -> bool:
        """Guidance-distilled: the scale is a network input, no classifier-free-guidance batch."""
        return False

    def inputs(self, cond: dict[str, torch.Tensor], guided: bool) -> dict:
        """The network's conditioning keyword arguments from recorded conditioning."""
        raise NotImplementedError

    def forward(self, policy, cond, model_in, t, t_in, guided: bool) -> torch.Tensor:
        """The network's output on ``model_in`` (doubled under guidance) at ``t`` (``t_in`` doubled)."""
        raise NotImplementedError

    def step(self, policy, output, timestep, latents, *, stochastic, prev_sample, generator, noise, noise_level):
        """One sampler step -> ``(next_latents, log_prob [B])`` (see ``DiffusionPolicy.step``)."""
        raise NotImplementedError

    def unpack(self, policy, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the VAE decodes them."""
        return latents


class UNetFamily(Family):
    """SD 1.5 and its relatives (the tiny built-in model): a UNet sampled with DDIM."""

    name, flow, pipeline_class = "sd", False, "StableDiffusionPipeline"
    controlnet_pipeline_class = "StableDiffusionControlNetPipeline"  # the same parts with a ControlNet
    load_options = {"safety_checker": None, "requires_safety_checker": False}
    frozen = ("vae", "text_encoder", "unet")

    def network(self, pipe):
        return pipe.unet

    def make_scheduler(self, config: dict):
        from diffusers import DDIMScheduler

        # DDPO needs a stochastic DDIM step whose every transition has a density: the last
        # step must not land on t=0 from t=0 (steps_offset >= 1 with "leading" spacing, as
        # SD 1.5 and SDXL ship) and must not jump to alpha=1 (set_alpha_to_one=False).
        overrides = {"set_alpha_to_one": False, "clip_sample": False}
        if config.get("timestep_spacing", "leading") == "leading" and config.get("steps_offset", 0) < 1:
            overrides["steps_offset"] = 1
        return DDIMScheduler.from_config(config, **overrides)

    def native_size(self, pipe, network) -> int:
        return network.config.sample_size * pipe.vae_scale_factor

    def set_timesteps(self, policy, num_steps: int) -> None:
        policy.scheduler.set_timesteps(num_steps, device=policy.device)

    def encode(self, policy, prompts, negative):
        pos, neg = policy.pipe.encode_prompt(prompts, policy.device, 1, True, negative_prompt=negative)
        return {"encoder_hidden_states": torch.stack([neg, pos], dim=1)}

    def inputs(self, cond, guided):
        return {"encoder_hidden_states": guidance_branch(cond["encoder_hidden_states"], guided)}

    def forward(self, policy, cond, model_in, t, t_in, guided):
        model_in = policy.scheduler.scale_model_input(model_in, t)
        return policy.denoiser(model_in, t_in, **policy.denoiser_inputs(cond, guided)).sample

    def step(self, policy, output, timestep, latents, *, stochastic, prev_sample, generator, noise, noise_level):
        if stochastic:
            eta = policy.sampling.eta if noise_level is None else noise_level
            return ddim_step_with_logprob(
                policy.scheduler,
                output,
                timestep,
                latents,
                eta=eta,
                prev_sample=prev_sample,
                generator=generator,
                noise=noise,
            )
        if prev_sample is not None:
            raise ValueError("a deterministic (ODE) step has no density to score prev_sample")
        nxt = policy.scheduler.step(output, timestep, latents, eta=0.0).prev_sample
        return nxt, torch.zeros(latents.shape[0], device=latents.device)


class SDXL(UNetFamily):
    """Two text encoders, pooled embeddings and size ids."""

    name, pipeline_class, load_options = "sdxl", "StableDiffusionXLPipeline", {}
    controlnet_pipeline_class = "StableDiffusionXLControlNetPipeline"
    frozen = UNetFamily.frozen + ("text_encoder_2",)

    def encode(self, policy, prompts, negative):
        pos, neg, pooled, neg_pooled = policy.pipe.encode_prompt(
            prompts,
            device=policy.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
        h, w = policy.image_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pos.dtype, device=policy.device)
        time_ids = time_ids.expand(len(prompts), 2, 6)
        return {
            "encoder_hidden_states": torch.stack([neg, pos], dim=1),
            "text_embeds": torch.stack([neg_pooled, pooled], dim=1),
            "time_ids": time_ids,
        }

    def inputs(self, cond, guided):
        kwargs = super().inputs(cond, guided)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": guidance_branch(cond["text_embeds"], guided),
            "time_ids": guidance_branch(cond["time_ids"], guided),
        }
        return kwargs


class FlowFamily(Family):
    """Rectified flows (FlowMatchEulerDiscreteScheduler), sampled with Flow-GRPO's SDE."""

    flow = True
    frozen = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
    t5_tokenizer: str  # the pipeline's T5 tokenizer
    longest_prompt: int  # the pipeline's default max_sequence_length

    def network(self, pipe):
        return pipe.transformer

    def make_scheduler(self, config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def native_size(self, pipe, network) -> int:
        sample = getattr(network.config, "sample_size", None) or pipe.default_sample_size
        return sample * pipe.vae_scale_factor

    def max_sequence_length(self, pipe) -> int:
        t5 = getattr(pipe, self.t5_tokenizer, None)
        return min(self.longest_prompt, t5.model_max_length) if t5 is not None else self.longest_prompt

    def token_limits(self, policy) -> dict[str, int]:
        limits = super().token_limits(policy)
        if limits:  # the last tokenizer is T5's, cut at model.max_sequence_length
            limits[list(limits)[-1]] = policy.max_sequence_length
        return limits

    def sigmas(self, num_steps: int):
        """The schedule's sigmas as the family's pipeline passes them (None: the scheduler's own)."""
        return None

    def image_tokens(self, policy, shape: tuple[int, ...]) -> int:
        """Image tokens of one sample, for a resolution-dependent shift."""
        return shape[1] * shape[2] // policy.unet.config.patch_size**2

    def set_timesteps(self, policy, num_steps: int) -> None:
        kwargs = {}
        sigmas = self.sigmas(num_steps)
        if sigmas is not None:
            kwargs["sigmas"] = sigmas
        config = policy.scheduler.config
        if config.use_dynamic_shifting:  # resolution-dependent shift (FLUX.1-dev)
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            tokens = self.image_tokens(policy, policy.latent_shape)
            kwargs["mu"] = calculate_shift(
                tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        policy.scheduler.set_timesteps(num_steps, device=policy.device, **kwargs)

    def inputs(self, cond, guided):
        return {
            "encoder_hidden_states": guidance_branch(cond["encoder_hidden_states"], guided),
            "pooled_projections": guidance_branch(cond["pooled_projections"], guided),
        }

    def forward(self, policy, cond, model_in, t, t_in, guided):
        if t_in.ndim == 0:
            t_in = t_in.expand(model_in.shape[0])
        return self.transformer(policy, policy.denoiser_inputs(cond, guided), model_in, t_in.to(model_in.dtype))

    def transformer(self, policy, kwargs: dict, model_in, t_in) -> torch.Tensor:
        """The transformer's velocity for ``t_in`` (``[N]``, the scheduler's timesteps)."""
        raise NotImplementedError

    def step(self, policy, output, timestep, latents, *, stochastic, prev_sample, generator, noise, noise_level):
        level = policy.sampling.noise_level if noise_level is None else noise_level
        return flow_sde_step_with_logprob(
            policy.scheduler,
            output,
            timestep,
            latents,
            noise_level=level if stochastic else 0.0,
            prev_sample=prev_sample,
            generator=generator,
            noise=noise,
        )


class SD3(FlowFamily):
    """Three text encoders (two CLIPs and a T5) and pooled embeddings."""

    name, pipeline_class = "sd3", "StableDiffusion3Pipeline"
    t5_tokenizer, longest_prompt = "tokenizer_3", 256

    def encode(self, policy, prompts, negative):
        pos, neg, pooled, neg_pooled = policy.pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=policy.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
            negative_prompt_2=negative,
            negative_prompt_3=negative,
            max_sequence_length=policy.max_sequence_length,
        )
        return {
            "encoder_hidden_states": torch.stack([neg, pos], dim=1),
            "pooled_projections": torch.stack([neg_pooled, pooled], dim=1),
        }

    def transformer(self, policy, kwargs, model_in, t_in):
        return policy.denoiser(hidden_states=model_in, timestep=t_in, **kwargs).sample


class Flux(FlowFamily):
    """CLIP + T5, packed 2x2 latent patches with position ids, guidance distillation (FLUX.1-dev)."""

    name, pipeline_class = "flux", "FluxPipeline"
    t5_tokenizer, longest_prompt = "tokenizer_2", 512

    def latent_shape(self, policy, height, width):
        """``[h/2 * w/2, 4C]``: FLUX packs 2x2 patches."""
        f = policy.pipe.vae_scale_factor
        if (height // f) % 2 or (width // f) % 2:
            raise ValueError(f"sampling.height/width {height}x{width}: FLUX needs multiples of {2 * f}")
        return ((height // f // 2) * (width // f // 2), policy.unet.config.in_channels)

    def sigmas(self, num_steps):  # FluxPipeline's sigmas, shifted by the scheduler
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def image_tokens(self, policy, shape):
        return shape[0]

    def encode(self, policy, prompts, negative):
        pos, pooled, _ = policy.pipe.encode_prompt(
            prompts, prompts, device=policy.device, max_sequence_length=policy.max_sequence_length
        )
        neg, neg_pooled, _ = policy.pipe.encode_prompt(
            negative, negative, device=policy.device, max_sequence_length=policy.max_sequence_length
        )
        return {
            "encoder_hidden_states": torch.stack([neg, pos], dim=1),
            "pooled_projections": torch.stack([neg_pooled, pooled], dim=1),
        }

    def distilled(self, policy) -> bool:
        return bool(policy.unet.config.guidance_embeds)

    def transformer(self, policy, kwargs, model_in, t_in):
        h, w = policy.image_size
        f = policy.pipe.vae_scale_factor
        img_ids = policy.pipe._prepare_latent_image_ids(
            model_in.shape[0], h // f // 2, w // f // 2, model_in.device, model_in.dtype
        )
        txt_ids = torch.zeros(kwargs["encoder_hidden_states"].shape[1], 3, device=model_in.device, dtype=model_in.dtype)
        guidance = None
        if policy.unet.config.guidance_embeds:  # guidance-distilled (FLUX.1-dev): the scale is an input
            guidance = torch.full(
                (model_in.shape[0],), policy.sampling.guidance_scale, device=model_in.device, dtype=model_in.dtype
            )
        return policy.denoiser(
            hidden_states=model_in, timestep=t_in / 1000, guidance=guidance, txt_ids=txt_ids, img_ids=img_ids, **kwargs
        ).sample

    def unpack(self, policy, latents):
        h, w = policy.image_size
        return policy.pipe._unpack_latents(latents, h, w, policy.pipe.vae_scale_factor)


FAMILIES: dict[str, type[Family]] = {kind.name: kind for kind in (UNetFamily, SDXL, SD3, Flux)}
FLOW_FAMILIES = tuple(name for name, kind in FAMILIES.items() if kind.flow)


def family_of(name: str) -> Family:
    """The family named ``model.family`` (sd, sdxl, sd3, flux)."""
    if name not in FAMILIES:
        raise ValueError(
            f"model.family={name!r}: expected one of {', '.join(FAMILIES)} (or tiny / tiny_flow through load_policy)"
        )
    return FAMILIES[name]()
