"""Pose-conditioned rendering for the UNet policies (SD 1.5 / SDXL): a ControlNet beside the UNet.

A ``ControlNetPolicy`` is a ``DiffusionPolicy`` whose denoiser is a ``ControlledUNet``: the
diffusers ``ControlNetModel`` reads a condition image (a layout: the pose drawn by
``armature.skeleton.render_layout``) with the noisy latents and the prompt, and its residuals are
added to the UNet's skip connections (Zhang et al., 2023). The condition image travels in the
conditioning dict as ``cond["controlnet_cond"]`` (``[B, 2, 3, H, W]``, the same image on both
classifier-free-guidance branches, in [0, 1]) so that rollouts, re-scoring, the reference model
and the learners treat it like the prompt embeddings.

* ``build_controlnet`` makes a tiny ControlNet from the policy's UNet (``ControlNetModel.from_unet``:
  the encoder copies the UNet's, every output convolution starts at zero, so at initialisation
  the policy renders exactly what the plain UNet renders); ``ControlNetParams.pretrained`` loads a
  real one instead (a hub id such as ``lllyasviel/sd-controlnet-openpose`` or a local folder).
* ``ControlNetPolicy.add_lora`` puts a peft LoRA adapter on the ControlNet's attention Q/K/V
  (``targets="qkv"``, SkeleGuide eq. 3) or on all its projections (``targets="all"``); the UNet
  stays frozen. A ControlNet built from scratch has zero output convolutions, through which no
  gradient reaches the LoRA factors: train them too (``train_zero_convs=True``).
* ``rollout(prompts, layouts=...)`` samples with the policy's own step loop (DDIM with
  log-probabilities), ``render`` returns the images, and ``diffusers_pipeline`` gives the same
  components as diffusers' ``StableDiffusion(XL)ControlNetPipeline``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from armature.policies.config import LoraParams, SamplingParams
from armature.policies.diffusion import DiffusionPolicy, load_policy
from armature.policies.families import guidance_branch
from armature.policies.tiny import tiny_config

__all__ = [
    "CONTROLNET_TARGETS",
    "ControlNetParams",
    "ControlNetPolicy",
    "ControlledUNet",
    "build_controlnet",
    "build_controlnet_policy",
]

# LoRA target modules of the ControlNet by ``targets``: SkeleGuide's eq. 3 adapts only the
# condition branch's query, key and value projections; "all" adds every other projection.
CONTROLNET_TARGETS = {
    "qkv": ["to_q", "to_k", "to_v"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
}
# What ControlNetModel zero-initialises: the convolutions that emit the residuals, and the last
# layer of the condition-image encoder.
ZERO_CONVS = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")


@dataclass
class ControlNetParams:
    pretrained: str | None = None  # a hub id or folder; None: built from the policy's UNet
    conditioning_scale: float = 1.0  # multiplies every residual
    revision: str | None = None
    variant: str | None = None
    seed: int = 0  # initialisation of a built ControlNet's condition encoder


def build_controlnet(unet, vae_scale_factor: int, seed: int = 0):
    """A ControlNet for ``unet`` (diffusers ``ControlNetModel.from_unet``): the encoder copies the
    UNet's weights, the condition-image encoder downsamples by the VAE's factor, and every output
    convolution is zero, so the residuals are exactly zero until it is trained."""
    from diffusers import ControlNetModel

    levels = int(math.log2(vae_scale_factor)) + 1  # stride-2 convolutions between the levels
    if 2 ** (levels - 1) != vae_scale_factor:
        raise ValueError(f"VAE scale factor {vae_scale_factor} is not a power of two")
    channels = (16, 32, 96, 256)[:levels] if levels <= 4 else (16,) * (levels - 4) + (16, 32, 96, 256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)


class ControlledUNet(torch.nn.Module):
    """The UNet with a ControlNet beside it; called like the UNet plus ``controlnet_cond``.

    It is what ``DiffusionPolicy.unet`` holds, so a learner wraps it (and trains whatever of the
    ControlNet requires gradients) without knowing a ControlNet is there.
    """

    def __init__(self, unet, controlnet, conditioning_scale: float = 1.0):
        super().__init__()
        self.base = unet
        self.controlnet = controlnet
        self.conditioning_scale = conditioning_scale

    @property
    def config(self):
        return self.base.config

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def residuals(self, sample, timestep, encoder_hidden_states, controlnet_cond, added_cond_kwargs=None):
        """``(down_block_residuals, mid_block_residual)`` the ControlNet adds to the UNet."""
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond.to(sample.dtype),
            conditioning_scale=self.conditioning_scale,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        return down, mid

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond=None,
        added_cond_kwargs=None,
        return_dict: bool = True,
    ):
        if controlnet_cond is None:
            raise ValueError("a ControlNet policy needs a condition image: pass layouts")
        down, mid = self.residuals(sample, timestep, encoder_hidden_states, controlnet_cond, added_cond_kwargs)
        return self.base(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=return_dict,
        )

    # peft adapters live on the ControlNet (the policy's save/load and reference model use these)
    @property
    def peft_config(self):
        return self.controlnet.peft_config

    def add_adapter(self, config):
        self.controlnet.add_adapter(config)

    def disable_adapters(self):
        self.controlnet.disable_adapters()

    def enable_adapters(self):
        self.controlnet.enable_adapters()


class ControlNetPolicy(DiffusionPolicy):
    """A UNet policy (SD 1.5 family or SDXL) rendering from a condition image."""

    def __init__(
        self,
        pipeline,
        family: str,
        controlnet,
        sampling: SamplingParams | None = None,
        device="cpu",
        conditioning_scale: float = 1.0,
        native_size: int | None = None,
    ):
        super().__init__(pipeline, family, sampling, device, native_size=native_size)
        if self.is_flow:
            raise ValueError(
                f"model.family={family}: ControlNet conditioning is for the UNet families (sd, sdxl); "
                "flow DiTs take the layout as condition tokens (armature.policies.skeleguide)"
            )
        controlnet = controlnet.to(self.device)
        if controlnet.dtype != self.pipe.unet.dtype:
            controlnet = controlnet.to(dtype=self.pipe.unet.dtype)
        controlnet.requires_grad_(False)
        controlnet.eval()
        self.controlnet = controlnet
        self.unet = self.denoiser = ControlledUNet(self.pipe.unet, controlnet, conditioning_scale)
        self._layouts: torch.Tensor | None = None  # the condition images of the rollout in progress

    # ------------------------------------------------------------------ condition image
    def condition_image(self, layouts) -> torch.Tensor:
        """Layouts (uint8 ``[B, H, W, 3]``, or a list of PIL images / arrays) as the ControlNet's
        input: ``[B, 3, H, W]`` floats in [0, 1] at the policy's image size (as diffusers'
        ControlNet pipelines prepare it)."""
        from PIL import Image

        h, w = self.image_size
        out = []
        for layout in layouts:
            image = layout if isinstance(layout, Image.Image) else Image.fromarray(np.asarray(layout, dtype=np.uint8))
            image = image.convert("RGB")
            if image.size != (w, h):
                image = image.resize((w, h), Image.BILINEAR)
            out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return torch.stack(out).to(self.device)

    def encode(self, prompts, negative_prompts=None, layouts=None) -> dict[str, torch.Tensor]:
        """The prompt conditioning plus ``controlnet_cond`` ``[B, 2, 3, H, W]`` (``layouts``, or
        those of the rollout in progress)."""
        cond = super().encode(prompts, negative_prompts)
        control = self.condition_image(layouts) if layouts is not None else self._layouts
        if control is None:
            raise ValueError("a ControlNet policy needs a condition image per prompt: pass layouts")
        if control.shape[0] != len(prompts):
            raise ValueError(f"{control.shape[0]} layouts for {len(prompts)} prompts")
        cond["controlnet_cond"] = control.unsqueeze(1).expand(-1, 2, -1, -1, -1).to(cond["encoder_hidden_states"].dtype)
        return cond

    def denoiser_inputs(self, cond, guided: bool) -> dict:
        kwargs = super().denoiser_inputs(cond, guided)
        kwargs["controlnet_cond"] = guidance_branch(cond["controlnet_cond"], guided)
        return kwargs

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def rollout(self, prompts, generator=None, *, layouts=None, num_steps=None, sde_window=None):
        """``DiffusionPolicy.rollout`` conditioned on one layout image per prompt; the trajectory's
        ``cond`` carries the condition images, so ``step_log_prob`` re-scores it as sampled."""
        if layouts is None:
            raise ValueError("a ControlNet policy needs a condition image per prompt: pass layouts")
        self._layouts = self.condition_image(layouts)
        try:
            return super().rollout(prompts, generator, num_steps=num_steps, sde_window=sde_window)
        finally:
            self._layouts = None

    @torch.no_grad()
    def render(
        self, prompts: Sequence[str], layouts, seed: int = 0, num_steps: int | None = None, deterministic: bool = False
    ) -> np.ndarray:
        """Images ``[B, H, W, 3]`` uint8; image i draws its noise from ``seed + i``.
        ``deterministic``: DDIM with eta 0 (no noise after the initial latents)."""
        generators = [torch.Generator(device=self.device).manual_seed(seed + i) for i in range(len(prompts))]
        steps = num_steps or self.sampling.num_steps
        window = (0, 0) if deterministic else None
        return self.rollout(list(prompts), generators, layouts=layouts, num_steps=steps, sde_window=window).images

    def diffusers_pipeline(self):
        """The same components as a diffusers ControlNet pipeline (SD or SDXL)."""
        import diffusers

        components = {k: v for k, v in self.pipe.components.items() if k not in ("unet", "scheduler")}
        pipe = getattr(diffusers, self.spec.controlnet_pipeline_class)(
            **components, unet=self.pipe.unet, controlnet=self.controlnet, scheduler=self.scheduler
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ trainable weights
    def add_lora(
        self, lora: LoraParams, seed: int = 0, targets: str | None = "qkv", train_zero_convs: bool = False
    ) -> None:
        """A peft LoRA adapter on the ControlNet: its attention Q/K/V (``targets="qkv"``), all its
        projections (``"all"``), or ``lora.target_modules`` (``targets=None``). The UNet stays
        frozen. ``train_zero_convs`` also trains the zero-initialised output convolutions (needed
        when the ControlNet is new: no gradient passes a zero convolution to the layers before)."""
        if targets is not None:
            if targets not in CONTROLNET_TARGETS:
                raise ValueError(f"controlnet lora targets={targets!r}: use one of {', '.join(CONTROLNET_TARGETS)}")
            lora = LoraParams(
                rank=lora.rank, alpha=lora.alpha, target_modules=list(CONTROLNET_TARGETS[targets]), dropout=lora.dropout
            )
        super().add_lora(lora, seed=seed)
        if train_zero_convs:
            for name, p in self.controlnet.named_parameters():
                if name.startswith(ZERO_CONVS):
                    p.requires_grad_(True)

    def enable_full_finetuning(self) -> None:
        """Train the whole ControlNet (the UNet stays frozen), as ControlNet is trained from scratch."""
        self.controlnet.requires_grad_(True)

    def save_controlnet(self, directory, merge_lora: bool = False) -> None:
        """The ControlNet as a diffusers folder (``ControlNetParams.pretrained`` loads it): its
        base weights (the LoRA adapter is saved by ``save_adapter``), or with ``merge_lora`` the
        adapter folded into them."""
        from diffusers import ControlNetModel
        from peft.tuners.lora import LoraLayer

        state = {}
        for name, module in self.controlnet.named_modules():
            if isinstance(module, LoraLayer) and merge_lora:
                weight = module.get_base_layer().weight + module.get_delta_weight("default")
                state[f"{name}.base_layer.weight"] = weight.detach()
        for key, value in self.controlnet.state_dict().items():
            if "lora_" not in key:
                state[key.replace(".base_layer.", ".")] = state.pop(key, value)
        plain = ControlNetModel.from_config(self.controlnet.config)
        plain.load_state_dict(state)
        plain.save_pretrained(str(directory), safe_serialization=True)


def load_controlnet(params: ControlNetParams, dtype: torch.dtype = torch.float32):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(
        params.pretrained, torch_dtype=dtype, revision=params.revision, variant=params.variant
    )


def build_controlnet_policy(
    model: dict, sampling: dict, controlnet: dict | ControlNetParams | None = None, seed: int = 0
) -> ControlNetPolicy:
    """A ControlNet policy from a job's ``model`` / ``sampling`` sections and a ``controlnet``
    section (``ControlNetParams`` fields). ``model.family`` tiny, sd or sdxl. A LoRA adapter is
    attached when ``model.lora.enabled`` (on the ControlNet's Q/K/V, or all projections with
    ``model.lora.controlnet_targets: all``; ``model.lora.train_zero_convs``)."""
    params = controlnet if isinstance(controlnet, ControlNetParams) else ControlNetParams(**(controlnet or {}))
    family = model.get("family", "tiny")
    if family not in ("tiny", "sd", "sdxl"):
        raise ValueError(f"model.family={family}: ControlNet policies are tiny, sd or sdxl")
    device = model.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sampling = {k: v for k, v in dict(sampling).items() if k != "batch_size"}
    base = load_policy(
        family=family,
        pretrained=model.get("pretrained"),
        sampling=SamplingParams(**sampling),
        device=device,
        dtype=model.get("dtype", "float32"),
        tiny=tiny_config(model.get("tiny") or {}, family),
        revision=model.get("revision"),
        variant=model.get("variant"),
    )
    if params.pretrained:
        net = load_controlnet(params, base.pipe.unet.dtype)
    else:
        net = build_controlnet(base.pipe.unet, base.pipe.vae_scale_factor, seed=params.seed)
    policy = ControlNetPolicy(
        base.pipe,
        base.family,
        net,
        base.sampling,
        device,
        conditioning_scale=params.conditioning_scale,
        native_size=base._native_size,
    )
    lora = dict(model.get("lora") or {})
    if lora.get("enabled", False):
        policy.add_lora(
            LoraParams(**{k: lora[k] for k in ("rank", "alpha", "dropout") if k in lora}),
            seed=seed,
            targets=lora.get("controlnet_targets", "qkv"),
            train_zero_convs=lora.get("train_zero_convs", not params.pretrained),
        )
    return policy
