"""The config schema of every job, and its composition with Hydra.

The dataclasses below are the schema: Hydra composes ``configs/<job>.yaml`` and its groups
(``algo``, ``model``, ``reward``, ``cluster``, ``tracking``) on top of them, so an unknown key
or a value of the wrong type fails at start with a message naming the key. Algorithms have
schemas of their own (``ALGO_SCHEMAS``), checked by :func:`validate_algo`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

__all__ = [
    "ConfigError",
    "TrainConfig",
    "DDPOConfig",
    "compose",
    "config_dir",
    "validate_algo",
    "flatten",
]


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


# --------------------------------------------------------------------------- groups
@dataclass
class TinyModelConfig:
    seed: int = 0
    image_size: int = 32
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    text_hidden: int = 32
    text_layers: int = 2
    max_prompt_tokens: int = 32


@dataclass
class LoraConfig:
    enabled: bool = True  # False: full fine-tuning of the UNet (with ZeRO for large models)
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0


@dataclass
class ModelConfig:
    family: str = "tiny"  # tiny | sd (SD 1.5 family) | sdxl
    pretrained: Optional[str] = None  # hub id or local path (family sd / sdxl)
    revision: Optional[str] = None
    variant: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when the actor has a GPU, else cpu
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SamplingConfig:
    num_steps: int = 10
    guidance_scale: float = 5.0
    eta: float = 1.0
    height: Optional[int] = None
    width: Optional[int] = None
    negative_prompt: str = ""
    batch_size: int = 8  # trajectories per sampler-actor call


@dataclass
class RewardConfig:
    # name -> {weight: float, **constructor overrides}; see armature.rewards.available()
    components: dict[str, Any] = field(default_factory=lambda: {"compressibility": {"weight": 1.0}})
    num_actors: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor


@dataclass
class PromptConfig:
    prompts: list[str] = field(default_factory=lambda: ["a cat", "a dog", "a horse", "a rabbit"])
    file: Optional[str] = None  # one prompt a line; replaces ``prompts`` when set


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS, else start a local Ray
    num_cpus: Optional[int] = None  # local Ray only
    num_samplers: int = 1
    sampler_num_cpus: float = 1.0
    sampler_num_gpus: float = 0.0
    sampler_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    actor_scheduling: str = "DEFAULT"  # DEFAULT or SPREAD: how samplers and reward actors are placed
    max_restarts: int = 2  # sampler and reward actors
    torch_threads: Optional[int] = None  # None: all cores on a local cluster, Ray's CPUs otherwise
    runtime_env: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    placement_strategy: str = "PACK"  # PACK, SPREAD, STRICT_PACK or STRICT_SPREAD
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1 or 2
    storage_path: str = "armature_runs/ray"
    max_failures: int = 0
    checkpoint_every: int = 1  # epochs
    checkpoints_to_keep: int = 2
    seed: int = 0


@dataclass
class TrackingConfig:
    tracking_uri: Optional[str] = None  # None: sqlite store under ``local_dir``
    local_dir: str = "armature_runs"
    experiment: str = "armature"
    run_name: Optional[str] = None  # also names the Ray Train run, so a rerun resumes it
    log_images_every: int = 1  # epochs; 0 disables
    images_per_grid: int = 16
    registered_model: Optional[str] = "armature-adapter"  # MLflow registry name; null: don't register
    run_id: Optional[str] = None  # an MLflow run made beforehand (by `armature submit`)


@dataclass
class TrainConfig:
    algo: Any = MISSING  # validated against ALGO_SCHEMAS[algo.name]
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- algorithms
@dataclass
class DDPOConfig:
    name: str = "ddpo"
    num_epochs: int = 10
    samples_per_epoch: int = 32  # over all workers
    train_batch_size: int = 8  # trajectories per micro-batch on one worker
    gradient_accumulation_batches: int = 1  # micro-batches per optimizer step (times the steps)
    num_inner_epochs: int = 1
    timestep_fraction: float = 1.0  # share of each trajectory's steps trained on
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    per_prompt_stat_tracking: bool = True
    stat_buffer_size: int = 32
    stat_min_count: int = 16


ALGO_SCHEMAS: dict[str, type] = {"ddpo": DDPOConfig}


def validate_algo(algo: DictConfig) -> DictConfig:
    """Check ``algo`` against its schema: unknown keys and wrong types fail naming the key."""
    name = algo.get("name") if isinstance(algo, DictConfig) else None
    if name not in ALGO_SCHEMAS:
        raise ConfigError(f"algo.name={name!r}: choose one of {sorted(ALGO_SCHEMAS)} (e.g. algo=ddpo)")
    schema = OmegaConf.structured(ALGO_SCHEMAS[name])
    try:
        return OmegaConf.merge(schema, algo)
    except Exception as err:  # omegaconf's errors carry the key; re-raise with the section
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
        raise ConfigError(f"algo.{key}: {_first_line(err)}") from err


# --------------------------------------------------------------------------- composition
def config_dir() -> Path:
    """``configs/`` of the checkout (or ARMATURE_CONFIG_DIR)."""
    env = os.environ.get("ARMATURE_CONFIG_DIR")
    checkout = Path(__file__).resolve().parents[2] / "configs"
    packaged = Path(__file__).resolve().parents[1] / "conf"  # in a wheel: a copy of configs/
    path = Path(env) if env else (checkout if checkout.is_dir() else packaged)
    if not (path / "train.yaml").is_file():
        raise ConfigError(f"no Hydra configs at {path}: set ARMATURE_CONFIG_DIR to the configs/ folder")
    return path


def _register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides, validated by the schema."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except Exception as err:
        raise ConfigError(_hydra_message(err)) from err
    if "algo" in cfg:
        algo = validate_algo(cfg.algo)
        OmegaConf.set_struct(cfg, False)
        cfg.algo = algo
        OmegaConf.set_struct(cfg, True)
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """Cross-field checks that a type system cannot express."""
    errors = []
    if cfg.trainer.zero_stage not in (0, 1, 2):
        errors.append(f"trainer.zero_stage={cfg.trainer.zero_stage}: use 0, 1 or 2")
    if cfg.trainer.num_workers < 1:
        errors.append("trainer.num_workers must be >= 1")
    if cfg.cluster.actor_scheduling not in ("DEFAULT", "SPREAD"):
        errors.append(f"cluster.actor_scheduling={cfg.cluster.actor_scheduling}: use DEFAULT or SPREAD")
    if cfg.trainer.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        errors.append(
            f"trainer.placement_strategy={cfg.trainer.placement_strategy}: "
            "use PACK, SPREAD, STRICT_PACK or STRICT_SPREAD"
        )
    if cfg.cluster.num_samplers < 1:
        errors.append("cluster.num_samplers must be >= 1")
    if cfg.sampling.eta <= 0:
        errors.append(f"sampling.eta={cfg.sampling.eta}: DDPO needs a stochastic sampler, set eta > 0")
    if not cfg.reward.components:
        errors.append("reward.components is empty: name at least one reward, e.g. reward=compressibility")
    algo = cfg.get("algo")
    if algo is not None and algo.name == "ddpo":
        per_worker = algo.samples_per_epoch // cfg.trainer.num_workers
        if algo.samples_per_epoch % cfg.trainer.num_workers:
            errors.append(
                f"algo.samples_per_epoch={algo.samples_per_epoch} must divide evenly over "
                f"trainer.num_workers={cfg.trainer.num_workers}"
            )
        elif per_worker % algo.train_batch_size:
            errors.append(
                f"algo.train_batch_size={algo.train_batch_size} must divide the samples per worker "
                f"({per_worker} = algo.samples_per_epoch / trainer.num_workers)"
            )
        elif (per_worker // algo.train_batch_size) % algo.gradient_accumulation_batches:
            errors.append(
                f"algo.gradient_accumulation_batches={algo.gradient_accumulation_batches} must divide "
                f"the micro-batches per worker ({per_worker // algo.train_batch_size})"
            )
        if not 0 < algo.timestep_fraction <= 1:
            errors.append(f"algo.timestep_fraction={algo.timestep_fraction}: must be in (0, 1]")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    """``{"algo.learning_rate": "0.0003", ...}`` for logging as parameters."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, str] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _hydra_message(err: Exception) -> str:
    """Hydra wraps omegaconf's error; keep the lines that name the key."""
    parts = []
    while err is not None:
        text = str(err).strip()
        if text and text not in parts:
            parts.append(text)
        err = err.__cause__
    return "invalid config: " + "\n".join(parts)
