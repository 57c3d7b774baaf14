"""The diffusion policy: a diffusers text-to-image pipeline seen as an RL policy.

A policy rolls out denoising trajectories (recording every latent and the log-probability of
every transition) and scores stored transitions under its current weights. Learners only use
this interface; how a family builds its conditioning (SD 1.5: text embeddings; SDXL: two text
encoders, pooled embeddings and size ids; SD3: three text encoders and pooled embeddings; FLUX:
CLIP + T5, packed latents and position ids) and how it steps (DDIM for the UNet families,
Flow-GRPO's SDE for the rectified-flow families) stays inside the policy: in its
:class:`~armature.policies.families.Family` (``policy.spec``), chosen once at construction.

Conditioning travels as a dict of tensors shaped ``[B, 2, ...]``: index 0 is the unconditional
(negative prompt) branch, index 1 the prompt, so a learner can slice a batch without knowing
which keys a family uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from armature.policies.config import LoraParams, ModelConfig, SamplingParams
from armature.policies.families import FAMILIES, Family, family_of
from armature.policies.tiny import (
    TinyFlowConfig,
    TinySDConfig,
    build_tiny_flow_pipeline,
    build_tiny_sd_pipeline,
    tiny_config,
)

__all__ = ["Trajectory", "DiffusionPolicy", "build_diffusion_policy", "load_policy"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = "unet.safetensors"  # a fully fine-tuned UNet (or transformer), in place of an adapter


@dataclass
class Trajectory:
    """What a rollout records. Tensors are on the CPU, batch first."""

    prompts: list[str]
    latents: torch.Tensor  # [B, T+1, C, h, w]: x_T ... x_0
    timesteps: torch.Tensor  # [B, T]
    log_probs: torch.Tensor  # [B, T]: log p(x_{t-1} | x_t) at sampling time
    cond: dict[str, torch.Tensor]  # each [B, 2, ...]
    images: np.ndarray | None  # [B, H, W, 3] uint8 (None once handed to a reward actor)
    weights_version: int = 0  # version of the weights that sampled it
    elapsed_s: float = 0.0  # wall time of the rollout

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index) -> "Trajectory":
        """A sub-batch, by a slice, a list of indices or a tensor of indices."""
        idx = torch.as_tensor(np.arange(len(self))[index])
        return Trajectory(
            prompts=[self.prompts[i] for i in idx.tolist()],
            latents=self.latents[idx],
            timesteps=self.timesteps[idx],
            log_probs=self.log_probs[idx],
            cond={k: v[idx] for k, v in self.cond.items()},
            images=None if self.images is None else self.images[idx.numpy()],
            weights_version=self.weights_version,
            elapsed_s=self.elapsed_s,
        )

    @staticmethod
    def concat(parts: list["Trajectory"]) -> "Trajectory":
        return Trajectory(
            prompts=[p for t in parts for p in t.prompts],
            latents=torch.cat([t.latents for t in parts]),
            timesteps=torch.cat([t.timesteps for t in parts]),
            log_probs=torch.cat([t.log_probs for t in parts]),
            cond={k: torch.cat([t.cond[k] for t in parts]) for k in parts[0].cond},
            images=None if parts[0].images is None else np.concatenate([t.images for t in parts]),
            weights_version=min(t.weights_version for t in parts),
            elapsed_s=sum(t.elapsed_s for t in parts),
        )


log = logging.getLogger(__name__)

# diffusers logs this at every encode of an over-long prompt (every sampling batch); the policy
# drops it and warns once per prompt instead (``DiffusionPolicy._warn_long_prompts``)
_TRUNCATION_NOTICE = "The following part of your input was truncated"


class _DropTruncationNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TRUNCATION_NOTICE)


@contextlib.contextmanager
def _without_truncation_notice(pipe):
    """Drop the notice of ``pipe.encode_prompt``'s module for the duration (only)."""
    logger, notice = logging.getLogger(type(pipe).encode_prompt.__module__), _DropTruncationNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class DiffusionPolicy:
    """A latent diffusion model as a stochastic policy: DDIM-sampled UNets (SD 1.5 family, SDXL,
    the tiny built-in one) or SDE-sampled rectified flows (SD 3.x, FLUX, the tiny flow model).

    ``self.unet`` is the denoising network whatever the family (a transformer for the flow
    families), so learners wrap and train it without asking which kind it is. ``family``: a
    family name (``sd``, ``sdxl``, ``sd3``, ``flux``) or a :class:`Family` of one's own
    (the SkeleGuide stage's); ``self.spec`` answers whatever depends on it.
    """

    def __init__(
        self,
        pipeline,
        family: str | Family,
        sampling: SamplingParams | None = None,
        device="cpu",
        native_size: int | None = None,
    ):
        self.spec = family if isinstance(family, Family) else family_of(family)
        self.family = self.spec.name
        self.pipe = pipeline.to(device)
        self.device = torch.device(device)
        self.sampling = sampling or SamplingParams()
        self.lora: LoraParams | None = None
        self.weights_version = 0
        self._init_prompt_checks()
        self.scheduler = self.spec.make_scheduler(dict(self.pipe.scheduler.config))
        self.pipe.scheduler = self.scheduler
        self.unet = self.spec.network(self.pipe)
        for name in self.spec.frozen:
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self._native_size = native_size or self.spec.native_size(self.pipe, self.unet)
        self.max_sequence_length = self.spec.max_sequence_length(self.pipe)
        # What computes the noise prediction; a learner may swap in its DeepSpeed engine.
        self.denoiser = self.unet

    @property
    def is_flow(self) -> bool:
        """A rectified-flow model (sd3, flux), sampled with Flow-GRPO's SDE."""
        return self.spec.flow

    # ------------------------------------------------------------------ geometry
    @property
    def image_size(self) -> tuple[int, int]:
        return (self.sampling.height or self._native_size, self.sampling.width or self._native_size)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent shape: ``[C, h, w]``; FLUX packs 2x2 patches: ``[h/2 * w/2, 4C]``."""
        return self.spec.latent_shape(self, *self.image_size)

    def set_timesteps(self, num_steps: int) -> None:
        """The sampling schedule of ``num_steps`` steps, as the family's pipeline sets it."""
        self.spec.set_timesteps(self, num_steps)

    # ------------------------------------------------------------------ conditioning
    def _init_prompt_checks(self) -> None:
        """The prompts already checked by ``_warn_long_prompts``; a subclass with its own
        ``__init__`` calls this too."""
        self._checked_prompts: set[str] = set()

    def _warn_long_prompts(self, prompts: list[str]) -> None:
        """Warn once per prompt that a text encoder cannot read it to its end, naming each such encoder."""
        limits = self.spec.token_limits(self)
        for prompt in dict.fromkeys(p for p in prompts if p not in self._checked_prompts):
            self._checked_prompts.add(prompt)
            cut = []
            for name, limit in limits.items():
                n = len(getattr(self.pipe, name)(prompt, verbose=False).input_ids)
                if n > limit:
                    cut.append(f"pipe.{name}: {n} tokens with its special ones, reads {limit}")
            if cut:
                log.warning(
                    "prompt %r is longer than its text encoders read (%s); the end is ignored: shorten the "
                    "prompt to keep all of it",
                    prompt,
                    "; ".join(cut),
                )

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Prompt conditioning, each value ``[B, 2, ...]`` (unconditional, conditional).

        ``negative_prompts`` (one per prompt) replaces ``sampling.negative_prompt``.
        """
        if negative_prompts is None:
            negative_prompts = [self.sampling.negative_prompt] * len(prompts)
        negative = list(negative_prompts)
        prompts = list(prompts)
        self._warn_long_prompts(prompts + negative)
        with _without_truncation_notice(self.pipe):
            return self.spec.encode(self, prompts, negative)

    def conditioning(self, prompts: list[str], generator=None) -> dict[str, torch.Tensor]:
        """What a rollout conditions on (recorded in the trajectory): the prompts' encodings here;
        a conditioned policy adds its condition tokens, drawn from each sample's generator."""
        return self.encode(prompts)

    def denoiser_inputs(self, cond: dict[str, torch.Tensor], guided: bool) -> dict:
        """The network's conditioning keyword arguments from recorded conditioning ``cond``
        (``[B, 2, ...]`` values): both guidance branches if ``guided``, else the conditional one."""
        return self.spec.inputs(cond, guided)

    def predict(self, cond, latents, timesteps) -> torch.Tensor:
        """Classifier-free-guided model output at ``timesteps`` (scalar or ``[B]``): the noise
        (or v) prediction of a UNet, the velocity of a flow model."""
        guidance = self.sampling.guidance_scale
        guided = guidance > 1.0 and not self.spec.distilled(self)
        model_in = torch.cat([latents] * 2) if guided else latents
        t = torch.as_tensor(timesteps, device=self.device)
        t_in = torch.cat([t] * 2) if (guided and t.ndim) else t
        out = self.spec.forward(self, cond, model_in, t, t_in, guided)
        if not guided:
            return out
        uncond, text = out.chunk(2)
        return uncond + guidance * (text - uncond)

    # ------------------------------------------------------------------ rollout / scoring
    def step(
        self,
        output,
        timestep,
        latents,
        *,
        stochastic: bool = True,
        prev_sample=None,
        generator=None,
        noise=None,
        noise_level: float | None = None,
    ):
        """One sampler step of this family -> ``(next_latents, log_prob [B])``.

        DDIM with ``sampling.eta`` for the UNet families, Flow-GRPO's SDE with
        ``sampling.noise_level`` for the flow families; ``stochastic=False`` takes the
        deterministic (ODE) step instead, whose log-probability is returned as zeros.
        """
        return self.spec.step(
            self,
            output,
            timestep,
            latents,
            stochastic=stochastic,
            prev_sample=prev_sample,
            generator=generator,
            noise=noise,
            noise_level=noise_level,
        )

    def _noise(self, batch: int, shape, generator) -> torch.Tensor:
        """Standard normal noise of ``[batch, *shape]``: one generator for the batch, or one per
        sample (a list), so that a sample does not depend on what it was batched with."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for {batch} prompts")
            return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in generator])
        return torch.randn((batch,) + tuple(shape), generator=generator, device=self.device)

    @torch.no_grad()
    def rollout(
        self,
        prompts: list[str],
        generator: torch.Generator | list | None = None,
        *,
        num_steps: int | None = None,
        sde_window: tuple[int, int] | None = None,
    ) -> Trajectory:
        """Sample one trajectory per prompt, recording latents and per-step log-probabilities.

        ``num_steps`` overrides ``sampling.num_steps`` (Flow-GRPO's denoising reduction: train on
        fewer steps than evaluation uses). ``sde_window=(start, stop)`` makes only the steps
        ``start <= i < stop`` stochastic, the others deterministic ODE steps with log-prob 0
        (MixGRPO's sliding window). ``generator`` may be a list, one per prompt.
        """
        s = self.sampling
        num_steps = num_steps or s.num_steps
        self.set_timesteps(num_steps)
        cond = self.conditioning(prompts, generator)
        shape = self.latent_shape
        batch = len(prompts)
        latents = self._noise(batch, shape, generator) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        latents = latents.to(self.unet.dtype)
        start, stop = sde_window if sde_window is not None else (0, num_steps)
        all_latents, all_log_probs = [latents], []
        for i, t in enumerate(self.scheduler.timesteps):
            output = self.predict(cond, latents, t)
            stochastic = start <= i < stop
            noise = self._noise(batch, shape, generator) if stochastic else None
            latents, log_prob = self.step(output, t, latents, stochastic=stochastic, noise=noise)
            all_latents.append(latents)
            all_log_probs.append(log_prob)
        images = self.decode(latents)
        steps = self.scheduler.timesteps.to("cpu")
        return Trajectory(
            prompts=list(prompts),
            latents=torch.stack(all_latents, dim=1).cpu(),
            timesteps=steps.unsqueeze(0).expand(len(prompts), -1).clone(),
            log_probs=torch.stack(all_log_probs, dim=1).cpu(),
            cond={k: v.cpu() for k, v in cond.items()},
            images=images,
            weights_version=self.weights_version,
        )

    def step_log_prob(self, cond, latents, timesteps, next_latents, *, num_steps: int | None = None) -> torch.Tensor:
        """log p(next_latents | latents) under the current weights, with gradients. ``[B]``.

        ``num_steps``: the number of steps the trajectory was sampled with (default
        ``sampling.num_steps``).
        """
        num_steps = num_steps or self.sampling.num_steps
        if getattr(self.scheduler, "num_inference_steps", None) != num_steps:
            self.set_timesteps(num_steps)
        cond = {k: v.to(self.device) for k, v in cond.items()}
        latents, next_latents = latents.to(self.device), next_latents.to(self.device)
        timesteps = timesteps.to(self.device)
        output = self.predict(cond, latents, timesteps)
        _, log_prob = self.step(output, timesteps, latents, prev_sample=next_latents)
        return log_prob

    @contextlib.contextmanager
    def reference(self, frozen: torch.nn.Module | None = None):
        """Within the block, ``predict`` and ``step_log_prob`` use the reference model: ``frozen``
        (a frozen copy of the base network) if given, else the network with its LoRA adapter
        switched off."""
        previous = self.denoiser
        if frozen is None and self.lora is None:
            raise ValueError("full fine-tuning has no adapter to switch off: pass a frozen copy")
        if frozen is not None:
            self.denoiser = frozen
        else:
            self.denoiser = self.unet
            self.unet.disable_adapters()
        try:
            yield self
        finally:
            if frozen is None:
                self.unet.enable_adapters()
            self.denoiser = previous

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        latents = self.spec.unpack(self, latents)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
        images = (images / 2 + 0.5).clamp(0, 1)
        return (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)

    # ------------------------------------------------------------------ trainable weights
    def add_lora(self, lora: LoraParams, seed: int = 0) -> None:
        """Attach a peft LoRA adapter to the UNet; its initialisation is deterministic in seed."""
        from peft import LoraConfig

        if self.lora is not None:
            raise RuntimeError("this policy already has a LoRA adapter")
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            target_modules=list(lora.target_modules),
            lora_dropout=lora.dropout,
            init_lora_weights="gaussian",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                self.unet.add_adapter(config)
            except ValueError as err:
                raise ValueError(f"lora.target_modules={list(lora.target_modules)}: {err}") from err
        self.lora = lora

    def enable_full_finetuning(self) -> None:
        self.unet.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights (LoRA factors, or the whole UNet), detached CPU copies."""
        return {n: p.detach().cpu().clone() for n, p in self.unet.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], version: int | None = None):
        params = dict(self.unet.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unknown = [n for n in state if n not in params]
        if missing or unknown:
            raise KeyError(f"weights do not fit this policy: missing {missing[:3]}, unknown {unknown[:3]}")
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
        if version is not None:
            self.weights_version = version

    def save_trainable(self, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Save what training changed: the LoRA adapter, or the fine-tuned UNet weights."""
        if self.lora is not None:
            return self.save_adapter(directory, metadata)
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.trainable_state_dict().items()}
        save_file(state, directory / FULL_WEIGHTS, metadata={"format": "pt"})
        config = {"full_finetune": True, "family": self.family, **(metadata or {})}
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        return directory

    def save_adapter(self, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Write the LoRA adapter as ``adapter_model.safetensors`` + ``adapter_config.json``."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self.lora is None:
            raise RuntimeError("no LoRA adapter to save (full fine-tuning saves the UNet instead)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
        save_file(state, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = {"lora": asdict(self.lora), "family": self.family, **(metadata or {})}
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        return directory

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load an adapter written by ``save_adapter``, or fine-tuned UNet weights written by
        ``save_trainable`` (safetensors only)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        if (directory / FULL_WEIGHTS).is_file() and not (directory / ADAPTER_WEIGHTS).is_file():
            state = load_file(directory / FULL_WEIGHTS)
            params = dict(self.unet.named_parameters())
            unknown = [k for k in state if k not in params]
            if unknown:
                raise KeyError(f"{directory / FULL_WEIGHTS} has weights this UNet lacks: {unknown[:3]}")
            with torch.no_grad():
                for name, value in state.items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))
            return
        weights, config_file = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
        for f in (weights, config_file):
            if not f.is_file():
                raise FileNotFoundError(f"adapter folder {directory} lacks {f.name}")
        lora = LoraParams(**json.loads(config_file.read_text())["lora"])
        if self.lora is None:
            self.add_lora(lora)
        elif asdict(lora) != asdict(self.lora):
            raise ValueError(f"adapter {directory} has {lora}, this policy has {self.lora}")
        result = set_peft_model_state_dict(self.unet, load_file(weights))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise KeyError(f"adapter {directory} has weights this UNet lacks: {unexpected[:3]}")


def load_policy(
    family: str = "tiny",
    pretrained: str | None = None,
    sampling: SamplingParams | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    tiny: TinySDConfig | TinyFlowConfig | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> DiffusionPolicy:
    """Build a tiny model (``tiny``: DDIM UNet; ``tiny_flow``: rectified-flow SD3 or FLUX
    transformer, ``tiny.arch``), or load an SD 1.5 / SDXL / SD 3.x / FLUX pipeline from a hub id
    or a local path."""
    torch_dtype = getattr(torch, dtype)
    if family == "tiny_flow":
        if pretrained:
            raise ValueError("model.family=tiny_flow builds from model.tiny; set family=sd3 or flux to load a path")
        tiny = tiny if isinstance(tiny, TinyFlowConfig) else TinyFlowConfig()
        pipe = build_tiny_flow_pipeline(tiny)
        if torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        return DiffusionPolicy(pipe, tiny.arch, sampling, device, native_size=tiny.image_size)
    if family == "tiny":
        if pretrained:
            raise ValueError("model.family=tiny builds from model.tiny; set family=sd to load a path")
        pipe = build_tiny_sd_pipeline(tiny if isinstance(tiny, TinySDConfig) else None)
        if torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        return DiffusionPolicy(pipe, "sd", sampling, device)
    if family == "gym":  # the anatomy gym's pretrained tiny SD (armature gym pretrain)
        from armature.gym.base_policy import policy_path

        family, pretrained = "sd", pretrained or str(policy_path())
    if not pretrained:
        raise ValueError(f"model.family={family} needs model.pretrained (a hub id or a local path)")
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r}: expected one of tiny, tiny_flow, gym, {', '.join(FAMILIES)}")
    import diffusers

    spec = family_of(family)
    pipe = getattr(diffusers, spec.pipeline_class).from_pretrained(
        pretrained, torch_dtype=torch_dtype, revision=revision, variant=variant, **spec.load_options
    )
    pipe.set_progress_bar_config(disable=True)
    return DiffusionPolicy(pipe, spec, sampling, device)


def build_diffusion_policy(model: ModelConfig, sampling: SamplingParams, seed: int = 0) -> DiffusionPolicy:
    """The policy a job's ``model`` and ``sampling`` config sections describe, adapter attached
    (every family but ``skeleguide_stage``: :func:`armature.policies.build.build_policy` takes all).

    Every process that builds a policy from the same config (learners, sampler actors, the
    serving replicas) gets the same weights, LoRA initialisation included.
    """
    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = load_policy(
        family=model.family,
        pretrained=model.pretrained,
        sampling=sampling,
        device=device,
        dtype=model.dtype,
        tiny=tiny_config({**asdict(model.tiny), **asdict(model.tiny_flow)}, model.family),
        revision=model.revision,
        variant=model.variant,
    )
    if model.lora.enabled:
        policy.add_lora(model.lora.params(), seed=seed)
    else:
        policy.enable_full_finetuning()
    return policy
