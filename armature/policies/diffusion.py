"""The diffusion policy: a diffusers text-to-image pipeline seen as an RL policy.

A policy rolls out denoising trajectories (recording every latent and the log-probability of
every transition) and scores stored transitions under its current weights. Learners only use
this interface; how a family builds its conditioning (SD 1.5: text embeddings; SDXL: two text
encoders, pooled embeddings and size ids) stays inside the policy.

Conditioning travels as a dict of tensors shaped ``[B, 2, ...]``: index 0 is the unconditional
(negative prompt) branch, index 1 the prompt, so a learner can slice a batch without knowing
which keys a family uses.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from armature.policies.logprob import ddim_step_with_logprob
from armature.policies.tiny import TinySDConfig, build_tiny_sd_pipeline

__all__ = ["SamplingParams", "LoraParams", "Trajectory", "DiffusionPolicy", "build_policy", "load_policy"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_WEIGHTS = "unet.safetensors"  # a fully fine-tuned UNet, in place of an adapter


@dataclass
class SamplingParams:
    num_steps: int = 10
    guidance_scale: float = 5.0
    eta: float = 1.0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    negative_prompt: str = ""


@dataclass
class LoraParams:
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0


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


class DiffusionPolicy:
    """A DDIM-sampled latent diffusion model (SD 1.5 family, SDXL, or the tiny built-in one)."""

    def __init__(self, pipeline, family: str, sampling: SamplingParams | None = None, device="cpu"):
        from diffusers import DDIMScheduler

        if family not in ("sd", "sdxl"):
            raise ValueError(f"model.family={family!r}: expected 'sd' (SD 1.5 and tiny) or 'sdxl'")
        self.pipe = pipeline.to(device)
        self.family = family
        self.device = torch.device(device)
        self.sampling = sampling or SamplingParams()
        # DDPO needs a stochastic DDIM step whose every transition has a density: the last
        # step must not land on t=0 from t=0 (steps_offset >= 1 with "leading" spacing, as
        # SD 1.5 and SDXL ship) and must not jump to alpha=1 (set_alpha_to_one=False).
        config = dict(self.pipe.scheduler.config)
        overrides = {"set_alpha_to_one": False, "clip_sample": False}
        if config.get("timestep_spacing", "leading") == "leading" and config.get("steps_offset", 0) < 1:
            overrides["steps_offset"] = 1
        self.scheduler = DDIMScheduler.from_config(config, **overrides)
        self.pipe.scheduler = self.scheduler
        self.unet = self.pipe.unet
        for module in (self.pipe.vae, self.pipe.text_encoder, self.unet):
            module.requires_grad_(False)
            module.eval()
        if family == "sdxl":
            self.pipe.text_encoder_2.requires_grad_(False)
        # What computes the noise prediction; a learner may swap in its DeepSpeed engine.
        self.denoiser = self.unet
        self.lora: LoraParams | None = None
        self.weights_version = 0

    # ------------------------------------------------------------------ geometry
    @property
    def image_size(self) -> tuple[int, int]:
        native = self.unet.config.sample_size * self.pipe.vae_scale_factor
        return (self.sampling.height or native, self.sampling.width or native)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        h, w = self.image_size
        f = self.pipe.vae_scale_factor
        return (self.unet.config.in_channels, h // f, w // f)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Prompt conditioning, each value ``[B, 2, ...]`` (unconditional, conditional).

        ``negative_prompts`` (one per prompt) replaces ``sampling.negative_prompt``.
        """
        if negative_prompts is None:
            negative_prompts = [self.sampling.negative_prompt] * len(prompts)
        negative = list(negative_prompts)
        if self.family == "sd":
            pos, neg = self.pipe.encode_prompt(
                prompts, self.device, 1, True, negative_prompt=negative
            )
            return {"encoder_hidden_states": torch.stack([neg, pos], dim=1)}
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative,
        )
        h, w = self.image_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pos.dtype, device=self.device)
        time_ids = time_ids.expand(len(prompts), 2, 6)
        return {
            "encoder_hidden_states": torch.stack([neg, pos], dim=1),
            "text_embeds": torch.stack([neg_pooled, pooled], dim=1),
            "time_ids": time_ids,
        }

    def _unet_kwargs(self, cond: dict[str, torch.Tensor], guided: bool) -> dict:
        def branch(v):  # [B, 2, ...] -> [2B, ...] (uncond first) or [B, ...]
            return torch.cat([v[:, 0], v[:, 1]]) if guided else v[:, 1]

        kwargs = {"encoder_hidden_states": branch(cond["encoder_hidden_states"])}
        if "text_embeds" in cond:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": branch(cond["text_embeds"]),
                "time_ids": branch(cond["time_ids"]),
            }
        return kwargs

    def predict(self, cond, latents, timesteps) -> torch.Tensor:
        """Classifier-free-guided model output at ``timesteps`` (scalar or ``[B]``)."""
        guidance = self.sampling.guidance_scale
        guided = guidance > 1.0
        model_in = torch.cat([latents] * 2) if guided else latents
        t = torch.as_tensor(timesteps, device=self.device)
        t_in = torch.cat([t] * 2) if (guided and t.ndim) else t
        model_in = self.scheduler.scale_model_input(model_in, t)
        out = self.denoiser(model_in, t_in, **self._unet_kwargs(cond, guided)).sample
        if not guided:
            return out
        uncond, text = out.chunk(2)
        return uncond + guidance * (text - uncond)

    # ------------------------------------------------------------------ rollout / scoring
    @torch.no_grad()
    def rollout(self, prompts: list[str], generator: torch.Generator | None = None) -> Trajectory:
        """Sample one trajectory per prompt, recording latents and per-step log-probabilities."""
        s = self.sampling
        self.scheduler.set_timesteps(s.num_steps, device=self.device)
        cond = self.encode(prompts)
        latents = torch.randn(
            (len(prompts),) + self.latent_shape, generator=generator, device=self.device,
            dtype=self.unet.dtype,
        ) * self.scheduler.init_noise_sigma
        all_latents, all_log_probs = [latents], []
        for t in self.scheduler.timesteps:
            output = self.predict(cond, latents, t)
            latents, log_prob = ddim_step_with_logprob(
                self.scheduler, output, t, latents, eta=s.eta, generator=generator
            )
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

    def step_log_prob(self, cond, latents, timesteps, next_latents) -> torch.Tensor:
        """log p(next_latents | latents) under the current weights, with gradients. ``[B]``."""
        if self.scheduler.num_inference_steps != self.sampling.num_steps:
            self.scheduler.set_timesteps(self.sampling.num_steps, device=self.device)
        cond = {k: v.to(self.device) for k, v in cond.items()}
        latents, next_latents = latents.to(self.device), next_latents.to(self.device)
        timesteps = timesteps.to(self.device)
        output = self.predict(cond, latents, timesteps)
        _, log_prob = ddim_step_with_logprob(
            self.scheduler, output, timesteps, latents, eta=self.sampling.eta,
            prev_sample=next_latents,
        )
        return log_prob

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1)
        return (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)

    # ------------------------------------------------------------------ trainable weights
    def add_lora(self, lora: LoraParams, seed: int = 0) -> None:
        """Attach a peft LoRA adapter to the UNet; its initialisation is deterministic in seed."""
        from peft import LoraConfig

        if self.lora is not None:
            raise RuntimeError("this policy already has a LoRA adapter")
        config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
            lora_dropout=lora.dropout, init_lora_weights="gaussian",
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
    tiny: TinySDConfig | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> DiffusionPolicy:
    """Build the tiny model, or load an SD 1.5 / SDXL pipeline from a hub id or a local path."""
    torch_dtype = getattr(torch, dtype)
    if family == "tiny":
        if pretrained:
            raise ValueError("model.family=tiny builds from model.tiny; set family=sd to load a path")
        pipe = build_tiny_sd_pipeline(tiny)
        if torch_dtype != torch.float32:
            pipe = pipe.to(dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        return DiffusionPolicy(pipe, "sd", sampling, device)
    if not pretrained:
        raise ValueError(f"model.family={family} needs model.pretrained (a hub id or a local path)")
    if family == "sd":
        from diffusers import StableDiffusionPipeline as Pipeline
    elif family == "sdxl":
        from diffusers import StableDiffusionXLPipeline as Pipeline
    else:
        raise ValueError(f"model.family={family!r}: expected one of tiny, sd, sdxl")
    kwargs = {"torch_dtype": torch_dtype, "revision": revision, "variant": variant}
    if family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = Pipeline.from_pretrained(pretrained, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return DiffusionPolicy(pipe, family, sampling, device)


def _tiny_config(tiny: dict) -> TinySDConfig:
    tiny = dict(tiny)
    if "unet_channels" in tiny:
        tiny["unet_channels"] = tuple(tiny["unet_channels"])
    return TinySDConfig(**tiny)


def build_policy(model: dict, sampling: dict, seed: int = 0) -> DiffusionPolicy:
    """The policy a job's ``model`` and ``sampling`` config sections describe, adapter attached.

    Every process that builds a policy from the same config (learners, sampler actors, the
    serving replicas) gets the same weights, LoRA initialisation included.
    """
    device = model.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sampling = dict(sampling)
    sampling.pop("batch_size", None)
    policy = load_policy(
        family=model.get("family", "tiny"),
        pretrained=model.get("pretrained"),
        sampling=SamplingParams(**sampling),
        device=device,
        dtype=model.get("dtype", "float32"),
        tiny=_tiny_config(model.get("tiny") or {}),
        revision=model.get("revision"),
        variant=model.get("variant"),
    )
    lora = model.get("lora", {})
    if lora.get("enabled", True):
        policy.add_lora(
            LoraParams(
                rank=lora.get("rank", 4), alpha=lora.get("alpha", 4.0),
                target_modules=list(lora.get("target_modules", LoraParams().target_modules)),
                dropout=lora.get("dropout", 0.0),
            ),
            seed=seed,
        )
    else:
        policy.enable_full_finetuning()
    return policy
