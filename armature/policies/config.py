"""The settings a policy is built from, defined once: the ``model`` and ``sampling`` sections of
every job's config (``armature.platform.config`` composes them with Hydra) and the arguments of
:func:`armature.policies.build_policy`.

Options that apply to one family only sit in that family's group: ``model.tiny_flow`` (the tiny
rectified-flow transformers: family tiny_flow, and the skeleguide job's tiny_skeleguide) and
``model.skeleguide_stage`` (family skeleguide_stage). ``model.tiny`` holds what every tiny model
built from config shares (its seed, size, text encoder and, for family tiny, its UNet and VAE).

The field types are the ones OmegaConf checks (no tuples, no unions but ``X | None``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "SamplingParams",
    "LoraParams",
    "LoraConfig",
    "TinyConfig",
    "TinyFlowOptions",
    "SkeleGuideStageOptions",
    "ModelConfig",
    "MOVED_MODEL_KEYS",
    "sampling_params",
]


@dataclass
class SamplingParams:
    num_steps: int = 10
    guidance_scale: float = 5.0
    eta: float = 1.0  # DDIM noise level (UNet families)
    noise_level: float = 0.7  # Flow-GRPO's SDE noise level a (flow families)
    height: int | None = None  # None: the model's native size
    width: int | None = None
    negative_prompt: str = ""


@dataclass
class LoraParams:
    """A LoRA adapter's shape (what ``adapter_config.json`` records under ``lora``)."""

    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0


@dataclass
class LoraConfig(LoraParams):
    """``model.lora``: the adapter, or none (full fine-tuning of the denoiser)."""

    enabled: bool = True  # False: full fine-tuning of the UNet (with ZeRO for large models)

    def params(self) -> LoraParams:
        return LoraParams(**{f.name: getattr(self, f.name) for f in fields(LoraParams)})


@dataclass
class TinyConfig:
    """``model.tiny``: a tiny random model built from config (families tiny, tiny_flow; the keys of
    :class:`armature.policies.tiny.TinySDConfig`, of which tiny_flow reads the ones it has)."""

    seed: int = 0
    image_size: int = 32
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    vae_channels: list[int] = field(default_factory=lambda: [16, 32])
    latent_channels: int = 4
    vae_kind: str = "kl"  # or taesd (AutoencoderTiny)
    text_hidden: int = 32
    text_layers: int = 2
    max_prompt_tokens: int = 32


@dataclass
class TinyFlowOptions:
    """``model.tiny_flow``: the transformer of a tiny rectified-flow model (family tiny_flow,
    :class:`armature.policies.tiny.TinyFlowConfig`; the skeleguide job's tiny_skeleguide too)."""

    arch: str = "sd3"  # sd3 or flux
    transformer_layers: int = 2
    transformer_heads: int = 4
    head_dim: int = 8
    shift: float = 3.0  # the scheduler's timestep shift


@dataclass
class SkeleGuideStageOptions:
    """``model.skeleguide_stage``: which SkeleGuide adapter trains as an RL policy
    (:mod:`armature.policies.skeleguide_policy`)."""

    stage: str = "skeletal"  # skeletal | appearance
    conditions: str = "gym"  # gym (drawn from each sample's seed) or a folder of images
    params: dict[str, Any] = field(default_factory=dict)  # SkeleGuideParams when model.pretrained is unset


@dataclass
class ModelConfig:
    family: str = "tiny"  # tiny | tiny_flow | gym (armature gym pretrain) | sd (SD 1.5 family) | sdxl | sd3 | flux
    #   | skeleguide_stage (one SkeleGuide adapter as an RL policy)
    pretrained: str | None = None  # hub id or local path (family sd / sdxl / sd3 / flux)
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when the actor has a GPU, else cpu
    tiny: TinyConfig = field(default_factory=TinyConfig)
    tiny_flow: TinyFlowOptions = field(default_factory=TinyFlowOptions)
    skeleguide_stage: SkeleGuideStageOptions = field(default_factory=SkeleGuideStageOptions)
    lora: LoraConfig = field(default_factory=LoraConfig)

    @classmethod
    def from_dict(cls, model: dict) -> ModelConfig:
        """A ``model`` section given as a mapping: a test's, a server's, or the one an adapter's
        metadata recorded (before the family groups, ``tiny.arch`` or ``stage`` were top-level
        keys: they are moved to their group). Unknown keys are an error naming them."""
        model = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(model).items()}
        lora = LoraConfig(**(model.pop("lora", None) or {}))
        tiny = model.pop("tiny", None) or {}
        groups = {"tiny_flow": dict(model.pop("tiny_flow", None) or {})}
        groups["skeleguide_stage"] = dict(model.pop("skeleguide_stage", None) or {})
        for old, new in MOVED_MODEL_KEYS.items():
            parent, key = old.split(".")[1:-1], old.split(".")[-1]
            source = tiny if parent == ["tiny"] else model
            if key in source:
                group, new_key = new.split(".")[1:]
                groups[group].setdefault(new_key, source.pop(key))
        unknown = sorted(set(model) - {f.name for f in fields(cls)})
        unknown += sorted(f"tiny.{k}" for k in set(tiny) - {f.name for f in fields(TinyConfig)})
        if unknown:
            raise ValueError(f"model.{unknown[0]}: not a key of the model section ({', '.join(unknown)})")
        return cls(
            **model,
            tiny=TinyConfig(**tiny),
            tiny_flow=TinyFlowOptions(**groups["tiny_flow"]),
            skeleguide_stage=SkeleGuideStageOptions(**groups["skeleguide_stage"]),
            lora=lora,
        )


# The keys that moved into a family's group: old -> new (``armature.platform.config.compose``
# refuses the old ones naming the new; an adapter's recorded metadata is read either way).
MOVED_MODEL_KEYS = {
    "model.tiny.arch": "model.tiny_flow.arch",
    "model.tiny.transformer_layers": "model.tiny_flow.transformer_layers",
    "model.tiny.transformer_heads": "model.tiny_flow.transformer_heads",
    "model.tiny.head_dim": "model.tiny_flow.head_dim",
    "model.tiny.shift": "model.tiny_flow.shift",
    "model.stage": "model.skeleguide_stage.stage",
    "model.conditions": "model.skeleguide_stage.conditions",
    "model.skeleguide": "model.skeleguide_stage.params",
}


def sampling_params(sampling: SamplingParams | dict) -> SamplingParams:
    """The policy's :class:`SamplingParams` from a ``sampling`` section (typed, or a mapping);
    ``batch_size`` (the sampler actors' setting, ``armature.platform.config.SamplingConfig``) is
    left out."""
    if not isinstance(sampling, dict):
        return SamplingParams(**{f.name: getattr(sampling, f.name) for f in fields(SamplingParams)})
    return SamplingParams(**{k: v for k, v in sampling.items() if k != "batch_size"})
