"""SkeleGuide's reason-then-render pipeline on a FLUX-Kontext-style flow DiT.

One shared ``FluxTransformer2DModel`` and two peft LoRA adapters on it:

* **skeletal** (stage 1, reasoning): scene latent tokens + prompt -> a scene-aware layout (the
  skeleton drawn over the scene, ``armature.skeleton.render_layout(pose, scene)``);
* **appearance** (stage 2, rendering): layout latent tokens + prompt -> the person in the scene.
  As in the paper, the renderer sees the layout M only: M is scene-aware, it already carries the
  background, so the scene is not a second condition.

Condition images enter FLUX Kontext's way (diffusers' ``FluxKontextPipeline``): VAE-encoded,
packed into 2x2 patches and appended after the noisy tokens, their position ids with first
coordinate 1 (the noisy tokens' is 0); the output on the condition tokens is dropped.

**LoRA as in eq. 3** (``lora.targets="qkv"``, the default): adapters on ``to_q``, ``to_k``,
``to_v`` of every block, and their update ``B A z`` *masked to the condition tokens*. peft applies
a LoRA Linear to every token of its input; in FLUX that input is [noisy, condition] tokens (dual
blocks) or [text, noisy, condition] (single blocks), condition last. A forward hook on each
adapter's ``lora_A`` multiplies its output by a 0/1 mask over the sequence, so
``Q'_c = W_Q z_c + B_Q A_Q z_c`` on condition tokens and ``Q = W_Q z`` exactly on the text and
noise tokens (and no gradient reaches the adapter through them). ``lora.targets="all"`` puts
plain, unmasked LoRA on every attention projection of every branch instead.

Time is the paper's convention throughout (t = 0 noise, t = 1 data, velocity data - noise:
``armature.losses.skeleguide``); ``flow`` converts to and from diffusers' sigma = 1 - t.

The background outside a person region is kept: while sampling, the latent outside the region is
replaced at every step by the scene's latent noised to the same level (blended latent diffusion,
Avrahami et al.), and at the end the scene's pixels are pasted back outside the region.

``SkeleGuidePipeline.build(params)`` makes the tiny random model (CPU, nothing downloaded) or loads
real weights (``params.pretrained``: a hub id such as ``black-forest-labs/FLUX.1-Kontext-dev`` or a
folder in diffusers format) through the same code; ``save_pretrained`` / ``from_pretrained`` keep
the config and both adapters (the base is rebuilt from the tiny config or reloaded from
``pretrained``).

The tiny model's VAE is random unless ``params.vae`` names a trained one: it then encodes and
decodes without meaning (the losses still fall, the pictures are noise).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from armature.losses.skeleguide import flow_interpolate
from armature.policies.tiny import build_char_tokenizer, tiny_clip, tiny_t5
from armature.skeleton import Skeleton, parse_layout, render_layout

__all__ = [
    "ADAPTERS",
    "LORA_TARGETS",
    "SkeleGuideParams",
    "SkeleGuideOutput",
    "SkeleGuidePipeline",
    "TinyKontextConfig",
    "build_tiny_kontext",
]

ADAPTERS = ("skeletal", "appearance")
LORA_TARGETS = {
    "qkv": ["to_q", "to_k", "to_v"],  # eq. 3, masked to the condition tokens
    "all": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}
CONFIG_FILE = "skeleguide.json"
ADAPTER_FILE = "adapter_model.safetensors"
BASE_FILE = "transformer_base.safetensors"  # a fine-tuned backbone's own (non-LoRA) weights, when saved


@dataclass
class TinyKontextConfig:
    """The tiny random model: FLUX transformer, CLIP + T5 text encoders, a 3-level VAE (64 px ->
    16 x 16 x 4 latents -> 8 x 8 packed tokens)."""

    seed: int = 0
    image_size: int = 64
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    latent_channels: int = 4
    text_hidden: int = 32
    text_layers: int = 2
    max_prompt_tokens: int = 48
    transformer_layers: int = 2  # half dual-stream, half single-stream blocks
    transformer_heads: int = 4
    head_dim: int = 8
    shift: float = 1.0


@dataclass
class SkeleGuideParams:
    pretrained: str | None = None  # hub id / folder of a FLUX(-Kontext) model; None: the tiny one
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    tiny: TinyKontextConfig = field(default_factory=TinyKontextConfig)
    # tiny model only: a trained AutoencoderKL or AutoencoderTiny (a diffusers pipeline folder with vae/, e.g. the gym
    # base policy's, or a VAE folder) in place of the random one, so images decode to pictures
    vae: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: str = "qkv"  # qkv (eq. 3: condition tokens' Q/K/V) | all (every projection, every token)
    lora_seed: int = 0
    guidance_scale: float = 2.5  # fed to guidance-distilled models (FLUX.1-dev / Kontext-dev) only
    num_steps: int = 8  # default sampling steps per stage

    @classmethod
    def from_dict(cls, d: dict | None) -> SkeleGuideParams:
        d = dict(d or {})
        tiny = TinyKontextConfig(**dict(d.pop("tiny", None) or {}))
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SkeleGuide model keys {unknown}; known: {sorted(known)}")
        params = cls(tiny=tiny, **d)
        if params.lora_targets not in LORA_TARGETS:
            raise ValueError(f"lora_targets={params.lora_targets!r}: use qkv (eq. 3) or all")
        return params


@dataclass
class SkeleGuideOutput:
    images: np.ndarray  # [B, H, W, 3] uint8
    layouts: np.ndarray  # [B, H, W, 3] uint8: the planned (or given) scene-aware layouts
    poses: list[dict]  # keypoint JSON (armature.skeleton) of each layout


def _load_vae(path: str, dtype: torch.dtype):
    """A trained ``AutoencoderKL`` or ``AutoencoderTiny`` (the gym base policy's, which keeps the
    figures' flat colours): a diffusers pipeline folder (its ``vae/``) or the VAE's own folder."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    folder = Path(path)
    folder = folder / "vae" if (folder / "vae" / "config.json").is_file() else folder
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"tiny_vae={path!r}: no readable VAE config.json there ({err})") from None
    kind = config.get("_class_name")
    if kind == "AutoencoderTiny":
        if "block_out_channels" not in config:  # FLUX's vae_scale_factor reads it: one entry a level
            raise ValueError(
                f"tiny_vae={path!r}: the AutoencoderTiny config has no block_out_channels (one entry "
                "per resolution level; `armature gym pretrain` writes it)"
            )
        return AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype)
    if kind != "AutoencoderKL":
        raise ValueError(
            f"tiny_vae={path!r} holds a {kind}; SkeleGuide's tiny model takes an AutoencoderKL or an "
            "AutoencoderTiny (the gym base policy's; benchmarks/skeleguide.py --vae-cache DIR trains a KL)"
        )
    return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)


def build_tiny_kontext(cfg: TinyKontextConfig, vae_path: str | None = None):
    """A random (per ``cfg.seed``) ``FluxKontextPipeline`` of tiny real diffusers / transformers parts."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    if cfg.head_dim % 4:
        raise ValueError(f"tiny.head_dim={cfg.head_dim}: FLUX's rotary axes need a multiple of 4")
    tokenizer = build_char_tokenizer(cfg.max_prompt_tokens)
    t5_tokenizer = build_char_tokenizer(cfg.max_prompt_tokens)
    levels = len(cfg.vae_channels)
    quarter = cfg.head_dim // 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clip = tiny_clip(tokenizer, cfg.text_hidden, cfg.text_layers, cfg.max_prompt_tokens, False)
        t5 = tiny_t5(t5_tokenizer, 2 * cfg.text_hidden, 1)
        if vae_path:
            vae = _load_vae(vae_path, torch.float32)
        else:
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(cfg.vae_channels),
                latent_channels=cfg.latent_channels,
                norm_num_groups=8,
                sample_size=cfg.image_size,
                scaling_factor=1.0,
                shift_factor=0.0,
            )
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * vae.config.latent_channels,
            num_layers=max(1, cfg.transformer_layers // 2),
            num_single_layers=max(1, cfg.transformer_layers - cfg.transformer_layers // 2),
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.transformer_heads,
            joint_attention_dim=2 * cfg.text_hidden,
            pooled_projection_dim=cfg.text_hidden,
            guidance_embeds=False,
            axes_dims_rope=(2 * quarter, quarter, quarter),
        )
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


class _ConditionMask:
    """Forward hooks on every ``lora_A`` that zero the LoRA update outside the last
    ``tokens`` positions of the sequence (the condition tokens): eq. 3."""

    def __init__(self):
        self.tokens = 0  # outside ``active``: no condition tokens, no update

    def __call__(self, module, args, output):
        length = output.shape[-2]
        keep = torch.zeros(length, 1, dtype=output.dtype, device=output.device)
        if self.tokens:
            keep[length - self.tokens :] = 1
        return output * keep

    @contextlib.contextmanager
    def active(self, tokens: int):
        previous, self.tokens = self.tokens, tokens
        try:
            yield
        finally:
            self.tokens = previous


class SkeleGuidePipeline:
    """Reason (plan a scene-aware layout) then render (the person into the scene)."""

    def __init__(self, pipe, params: SkeleGuideParams):
        from peft import LoraConfig

        self.pipe, self.params = pipe, params
        self.device = torch.device(params.device)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
            module.requires_grad_(False).eval()
        self.vae_scale_factor = pipe.vae_scale_factor
        longest = getattr(pipe.tokenizer_2, "model_max_length", 512)
        self.max_sequence_length = min(512, longest)
        self.trainable: tuple[str, ...] = ()  # adapters whose LoRA weights require gradients
        self.denoiser = self.transformer  # what computes the velocity; a learner swaps in its engine
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # the second adapter
            torch.manual_seed(params.lora_seed)
            for name in ADAPTERS:
                config = LoraConfig(
                    r=params.lora_rank,
                    lora_alpha=params.lora_alpha,
                    target_modules=LORA_TARGETS[params.lora_targets],
                    init_lora_weights="gaussian",
                )
                self.transformer.add_adapter(config, adapter_name=name)
        self.mask = _ConditionMask()
        self._hooks = []
        if params.lora_targets == "qkv":
            for module_name, module in self.transformer.named_modules():
                if module_name.endswith(tuple(f"lora_A.{a}" for a in ADAPTERS)):
                    self._hooks.append(module.register_forward_hook(self.mask))
        self.active_adapter = None
        self.use_adapter(ADAPTERS[0])

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, params: SkeleGuideParams | dict | None = None) -> SkeleGuidePipeline:
        """The tiny random model (``params.pretrained`` unset) or real weights from a hub id / folder."""
        params = params if isinstance(params, SkeleGuideParams) else SkeleGuideParams.from_dict(params)
        dtype = getattr(torch, params.dtype)
        if params.pretrained:
            from diffusers import FluxKontextPipeline

            pipe = FluxKontextPipeline.from_pretrained(
                params.pretrained, torch_dtype=dtype, revision=params.revision, variant=params.variant
            )
        else:
            pipe = build_tiny_kontext(params.tiny, params.vae)
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(params.device)
        return cls(pipe, params)

    def save_pretrained(self, directory, base: bool = False) -> Path:
        """``skeleguide.json`` (the params) and ``<adapter>/adapter_model.safetensors`` for both adapters.
        The backbone itself is rebuilt from the params (the tiny seed, or the hub id); ``base=True``
        also writes its weights (``transformer_base.safetensors``), for a backbone trained after it
        was built, e.g. by ``benchmarks/skeleguide.py --backbone-steps``."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in ADAPTERS:
            state = get_peft_model_state_dict(self.transformer, adapter_name=name)
            (directory / name).mkdir(exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in state.items()},
                directory / name / ADAPTER_FILE,
                metadata={"format": "pt"},
            )
        if base:
            save_file(
                {
                    k: v.detach().cpu().contiguous()
                    for k, v in self.transformer.state_dict().items()
                    if ".lora_" not in k
                },
                directory / BASE_FILE,
                metadata={"format": "pt"},
            )
        (directory / CONFIG_FILE).write_text(
            json.dumps({"params": asdict(self.params), "adapters": list(ADAPTERS)}, indent=2)
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory, device: str | None = None) -> SkeleGuidePipeline:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{directory} has no {CONFIG_FILE}: not a SkeleGuidePipeline folder "
                "(SkeleGuidePipeline.save_pretrained writes one)"
            )
        params = dict(json.loads((directory / CONFIG_FILE).read_text())["params"])
        if device is not None:
            params["device"] = device
        pipeline = cls.build(params)
        if (directory / BASE_FILE).is_file():
            from safetensors.torch import load_file

            missing, unexpected = pipeline.transformer.load_state_dict(load_file(directory / BASE_FILE), strict=False)
            if unexpected or any(".lora_" not in k for k in missing):
                raise KeyError(
                    f"{directory / BASE_FILE} does not fit the transformer these params build: "
                    f"unexpected {unexpected[:3]}, missing {[k for k in missing if '.lora_' not in k][:3]}"
                )
        pipeline.load_adapters(directory)
        return pipeline

    def load_adapters(self, directory) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        for name in ADAPTERS:
            path = Path(directory) / name / ADAPTER_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (a SkeleGuidePipeline folder holds both adapters)")
            result = set_peft_model_state_dict(self.transformer, load_file(path), adapter_name=name)
            if getattr(result, "unexpected_keys", None):
                raise KeyError(f"{path} has weights this model lacks: {result.unexpected_keys[:3]}")
        self.use_adapter(self.active_adapter)

    # ------------------------------------------------------------------ adapters
    def use_adapter(self, name: str) -> None:
        """Activate one adapter (peft's ``set_adapter``); the LoRA weights of ``self.trainable``
        keep requiring gradients (peft marks only the active one), so phase 2's two forwards both
        reach their adapter."""
        if name not in ADAPTERS:
            raise ValueError(f"adapter {name!r}: use one of {ADAPTERS}")
        self.transformer.set_adapter(name)
        self.active_adapter = name
        for pname, p in self.transformer.named_parameters():
            if ".lora_" in pname:
                p.requires_grad_(any(f".{a}." in pname for a in self.trainable))

    def set_trainable(self, adapters: Sequence[str]) -> None:
        self.trainable = tuple(adapters)
        self.use_adapter(self.active_adapter)

    def adapter_parameters(self, adapter: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.transformer.named_parameters() if ".lora_" in n and f".{adapter}." in n]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for a in self.trainable for p in self.adapter_parameters(a)]

    @property
    def unet(self):  # the name the platform's DeepSpeed builder wraps (armature.platform.engine)
        return self.transformer

    # ------------------------------------------------------------------ latents
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def _shift(self) -> float:
        return getattr(self.vae.config, "shift_factor", None) or 0.0

    def _check_size(self, height: int, width: int) -> None:
        step = 2 * self.vae_scale_factor
        if height % step or width % step:
            raise ValueError(
                f"image size {width}x{height}: each side must be a multiple of {step} "
                f"(VAE factor {self.vae_scale_factor} x FLUX's 2x2 patches)"
            )

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` (array or list of arrays) -> packed latents ``[B, H*W/(2f)^2, 4C]``."""
        array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
        _, height, width, _ = array.shape
        self._check_size(height, width)
        pixels = torch.from_numpy(array).to(self.device).permute(0, 3, 1, 2).to(self.vae.dtype) / 127.5 - 1
        encoded = self.vae.encode(pixels)  # AutoencoderKL: a posterior (its mode); AutoencoderTiny: latents
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        latents = (latents - self._shift) * self.vae.config.scaling_factor
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w).to(self.dtype)

    @torch.no_grad()
    def decode(self, packed: torch.Tensor, height: int, width: int) -> np.ndarray:
        latents = self.pipe._unpack_latents(packed, height, width, self.vae_scale_factor)
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self._shift
        images = (self.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        return (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            list(prompts), list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def _ids(self, tokens_h: int, tokens_w: int, first: float) -> torch.Tensor:
        ids = self.pipe._prepare_latent_image_ids(1, tokens_h, tokens_w, self.device, self.dtype)
        ids[:, 0] = first
        return ids

    # ------------------------------------------------------------------ the model
    def flow(
        self,
        adapter: str,
        x_t: torch.Tensor,
        t,
        cond: torch.Tensor,
        text: dict[str, torch.Tensor],
        size: tuple[int, int],
    ) -> torch.Tensor:
        """The velocity (data - noise) of ``adapter`` at the paper's time ``t`` (number or ``[B]``)
        for the noisy tokens ``x_t`` ``[B, N, 4C]``, condition tokens ``cond`` ``[B, N_c, 4C]``
        appended Kontext-style; ``size`` is the image's ``(height, width)``."""
        if adapter != self.active_adapter:
            self.use_adapter(adapter)
        height, width = size
        f2 = 2 * self.vae_scale_factor
        b, n = x_t.shape[:2]
        ids = torch.cat([self._ids(height // f2, width // f2, 0.0), self._ids(height // f2, width // f2, 1.0)])
        txt_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3, device=self.device, dtype=self.dtype)
        sigma = 1 - torch.as_tensor(t, device=self.device, dtype=self.dtype)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.params.guidance_scale, device=self.device, dtype=self.dtype)
        with self.mask.active(cond.shape[1]):
            out = self.denoiser(
                hidden_states=torch.cat([x_t, cond], dim=1),
                timestep=sigma,
                guidance=guidance,
                txt_ids=txt_ids,
                img_ids=ids,
                return_dict=False,
                **text,
            )[0]
        return -out[:, :n]  # diffusers' FLUX predicts noise - data

    def schedule(self, num_steps: int, tokens: int) -> list[float]:
        """``num_steps + 1`` times from 0 (noise) to 1 (data): FluxPipeline's sigmas, shifted by the scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        kwargs = {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}
        if scheduler.config.use_dynamic_shifting:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c = scheduler.config
            kwargs["mu"] = calculate_shift(
                tokens,
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.15),
            )
        scheduler.set_timesteps(num_steps, **kwargs)
        return [1.0 - float(s) for s in scheduler.sigmas]

    def _noise(self, batch: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
        """One noise draw per sample from ``seed + i``: an image does not depend on its batch."""
        return torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(batch)]
        ).to(self.device, self.dtype)

    @torch.no_grad()
    def sample(
        self,
        adapter: str,
        cond: torch.Tensor,
        text: dict,
        size: tuple[int, int],
        seed: int,
        num_steps: int,
        known: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Euler ODE from noise to data with ``adapter``. With ``known`` latents and a token mask
        ``keep`` ``[B, N, 1]`` (1 = generate), tokens outside the mask follow ``known`` noised to
        each step's level (blended latent diffusion) and equal ``known`` at the end."""
        noise = self._noise(cond.shape[0], (cond.shape[1], cond.shape[2]), seed)
        times = self.schedule(num_steps, cond.shape[1])
        x = noise
        for t, t_next in zip(times[:-1], times[1:]):
            x = x + (t_next - t) * self.flow(adapter, x, t, cond, text, size)
            if keep is not None:
                x = keep * x + (1 - keep) * flow_interpolate(noise, known, t_next)
        return x

    def token_mask(self, masks, height: int, width: int) -> torch.Tensor:
        """Pixel masks ``[B, H, W]`` (True = person) -> ``[B, N, 1]``: a token is generated if any
        of its pixels is in the region."""
        f2 = 2 * self.vae_scale_factor
        m = torch.from_numpy(np.stack([np.asarray(x, dtype=bool) for x in masks]).astype(np.float32))
        if m.shape[1:] != (height, width):
            raise ValueError(f"person_mask of shape {tuple(m.shape[1:])}; the images are {height}x{width}")
        m = torch.nn.functional.max_pool2d(m[:, None], f2).flatten(1)
        return m[..., None].to(self.device, self.dtype)

    # ------------------------------------------------------------------ stages
    def plan(self, scenes, prompts: Sequence[str], seed: int = 0, num_steps: int | None = None) -> np.ndarray:
        """Stage 1: scene-aware layouts ``[B, H, W, 3]`` uint8 from scenes and prompts (skeletal adapter)."""
        scenes = _images(scenes)
        height, width = scenes.shape[1:3]
        latents = self.sample(
            "skeletal",
            self.encode_images(scenes),
            self.encode_prompts(prompts),
            (height, width),
            seed,
            num_steps or self.params.num_steps,
        )
        return self.decode(latents, height, width)

    def render(
        self, scenes, layouts, prompts: Sequence[str], person_mask=None, seed: int = 0, num_steps: int | None = None
    ) -> np.ndarray:
        """Stage 2: the person rendered from the layouts (appearance adapter), ``[B, H, W, 3]``
        uint8. With ``person_mask`` (``[B, H, W]``, True = person) every pixel outside it is the scene's."""
        scenes, layouts = _images(scenes), _images(layouts)
        if scenes.shape != layouts.shape:
            raise ValueError(f"scenes {scenes.shape} and layouts {layouts.shape} differ in shape")
        height, width = scenes.shape[1:3]
        keep = known = None
        if person_mask is not None:
            keep, known = self.token_mask(person_mask, height, width), self.encode_images(scenes)
        latents = self.sample(
            "appearance",
            self.encode_images(layouts),
            self.encode_prompts(prompts),
            (height, width),
            seed,
            num_steps or self.params.num_steps,
            known,
            keep,
        )
        images = self.decode(latents, height, width)
        if person_mask is not None:
            region = np.stack([np.asarray(m, dtype=bool) for m in person_mask])[..., None]
            images = np.where(region, images, scenes)
        return images

    def __call__(
        self, scenes, prompts: Sequence[str], person_mask=None, poses=None, seed: int = 0, num_steps: int | None = None
    ) -> SkeleGuideOutput:
        """Plan (or take ``poses``: keypoint JSON dicts or ``Skeleton``s, one per scene), then render.

        Without ``poses`` the layouts are planned and their poses parsed back
        (``armature.skeleton.parse_layout``); with ``poses`` stage 1 is skipped and the layouts are
        ``render_layout(pose, scene)``. ``person_mask`` keeps the background outside it."""
        scenes = _images(scenes)
        if len(prompts) != len(scenes):
            raise ValueError(f"{len(prompts)} prompts for {len(scenes)} scenes")
        if poses is None:
            layouts = self.plan(scenes, prompts, seed, num_steps)
            skeletons = [parse_layout(layout, scene) for layout, scene in zip(layouts, scenes)]
        else:
            if len(poses) != len(scenes):
                raise ValueError(f"{len(poses)} poses for {len(scenes)} scenes")
            skeletons = [p if isinstance(p, Skeleton) else Skeleton.from_json(p) for p in poses]
            layouts = np.stack([render_layout(s, scene) for s, scene in zip(skeletons, scenes)])
        images = self.render(scenes, layouts, prompts, person_mask, seed, num_steps)
        return SkeleGuideOutput(images=images, layouts=layouts, poses=[s.to_json() for s in skeletons])


def _images(images) -> np.ndarray:
    array = np.stack([np.asarray(im) for im in images]) if not isinstance(images, np.ndarray) else images
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 [B, H, W, 3], got {array.dtype} {array.shape}")
    return array
