"""The config schema of every job, and its composition with Hydra.

The dataclasses below are the schema (the ``model`` section and the policy's sampling settings are
the policies' own, :mod:`armature.policies.config`): Hydra composes ``configs/<job>.yaml`` and its groups
(``algo``, ``model``, ``reward``, ``cluster``, ``tracking``) on top of them, so an unknown key
or a value of the wrong type fails at start with a message naming the key. Each algorithm has
a schema of its own, declared with it (``armature.platform.algorithms``), checked by
:func:`validate_algo`; the learners' schemas share ``OptimizerConfig``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from armature.policies.config import MOVED_MODEL_KEYS, ModelConfig, SamplingParams

__all__ = [
    "ConfigError",
    "TrainConfig",
    "ServeConfig",
    "OptimizerConfig",
    "ModelConfig",
    "SamplingConfig",
    "compose",
    "config_dir",
    "validate_algo",
    "flatten",
]


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


# --------------------------------------------------------------------------- groups
@dataclass
class SamplingConfig(SamplingParams):
    """``sampling``: the policy's sampling settings (:class:`armature.policies.SamplingParams`)
    and how many trajectories a sampler actor rolls out per call."""

    batch_size: int = 8  # trajectories per sampler-actor call


@dataclass
class RewardConfig:
    # name -> {weight: float, **constructor overrides}; see armature.rewards.available()
    # Empty here: the `reward` group file names them (a default here would be merged into every
    # group's components, e.g. reward=pose would score compressibility + pose).
    components: dict[str, Any] = field(default_factory=dict)
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
    # on-policy learners: 1 rolls out epoch k+1 (with the weights before epoch k's update) while
    # the learner trains on epoch k, samplers and learner each on their own CPU share; 0: in turn
    rollout_ahead: int = 0
    # stop after the epoch in which the job's training time (seconds since the trainer started,
    # summed over resumes; sampling and scoring included) reaches this; 0: epochs alone decide
    time_budget_s: float = 0.0


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
class DataConfig:
    # Parquet file/folder, or an image folder with pairs.jsonl / pairs.csv (armature/data/pairs.py);
    # None: synthetic pairs (procedural drawings with localized degradations), built in the run folder
    pairs: Optional[str] = None
    keep_ties: bool = False  # False: ties are dropped (and counted); True: trained as 50/50
    allow_outside_root: bool = False  # image paths may leave the pairs' folder (../, absolute, URIs elsewhere)
    image_size: Optional[int] = None  # None: the model's native size
    heldout_fraction: float = 0.1  # pairs held out (by a hash of pair_id) for the implicit accuracy
    cache_latents: bool = True  # VAE-encode on actors in the pipeline, so the learner never decodes
    materialize: bool = True  # run the pipeline once and keep its output (else again every epoch)
    batch_size: int = 32  # records per pipeline batch
    decode_num_cpus: float = 1.0  # per validate/decode task
    encoder_actors: int = 1  # their CPUs are held: leave the decode tasks some
    encoder_num_cpus: float = 1.0
    encoder_num_gpus: float = 0.0
    quarantine_path: Optional[str] = None  # None: <run folder>/quarantine
    synthetic_pairs: int = 256
    # the most visible degradations (armature.data.synthetic.DEGRADATIONS adds mirror and warp)
    synthetic_kinds: list[str] = field(default_factory=lambda: ["duplicate", "remove", "shift"])
    synthetic_pad: float = 0.15  # the region: a box around one hand, padded by this share of the side


@dataclass
class GuardConfig:
    """The over-optimisation guard (``armature.platform.overoptimisation``): early stop when a
    monitor (a reward component at weight 0) falls while the trained reward rises."""

    monitor: Optional[str] = None  # e.g. gym_oracle; None: no early stop (every monitor is still logged and plotted)
    patience: int = 2  # epochs the monitor may stay below its best while the trained reward is above its value then
    min_delta: float = 0.0  # a new best must beat the old by more than this
    rollback: bool = True  # the run ends with the weights of the monitor's best epoch


@dataclass
class RefreshConfig:
    """The on-policy reward refresh (``armature.feedback.refresh``; ddpo, grpo, nft, alignprop, draft, refl): every
    ``every`` epochs, pairs of the current policy's samples are labelled through the preference
    store and the trained reward's conv scorers are fine-tuned on them. Off by default."""

    every: int = 0  # epochs between refreshes; 0: off
    pairs: int = 16  # pairs of the current policy's samples (2 per prompt) labelled per refresh
    annotator: str = "simulated"  # simulated (a reward labels, with flips and ties) | human (the labeling page)
    annotator_reward: dict[str, Any] = field(default_factory=lambda: {"gym_oracle": {"weight": 1.0}})
    num_annotators: int = 2  # simulated annotators
    noise: float = 0.1  # probability a simulated annotator picks the reward's loser
    tie_rate: float = 0.05  # probability it answers "no preference"
    labels_per_pair: int = 2  # annotators who label each pair
    min_labels: int = 0  # human: new labels to wait for per refresh; 0: pairs * labels_per_pair
    label_timeout_s: float = 3600.0  # human: fine-tune on what is there after this long
    steps: int = 50  # AdamW steps per scorer per refresh
    batch_size: int = 16  # pairs per step
    learning_rate: float = 1e-4
    replay: float = 1.0  # share of the earlier refreshes' labelled pairs mixed in (0: the new pairs alone)
    store: Optional[str] = None  # SQLite path or SQLAlchemy URL; None: <run folder>/refresh.db


@dataclass
class TrainConfig:
    algo: Any = MISSING  # the registered algorithm's schema (armature.platform.algorithms)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)  # preference pairs (the DPO jobs)
    guard: GuardConfig = field(default_factory=GuardConfig)  # reward over-optimisation
    refresh: RefreshConfig = field(default_factory=RefreshConfig)  # the reward fine-tuned on-policy


# --------------------------------------------------------------------------- serving
@dataclass
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0  # per replica
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0


@dataclass
class ServeDeploymentConfig:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: Optional[int] = None  # None: Ray's default (the replica's CPUs)
    max_ongoing_requests: int = 32  # per replica
    max_queued_requests: int = 64  # per caller; beyond it the caller gets a 503
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)


@dataclass
class BatchingConfig:
    enabled: bool = True
    max_batch_size: int = 8  # requests per batch
    arrival_gap_s: float = 0.05  # the free model waits for a group to fill until no request came for this long,
    batch_wait_timeout_s: float = 0.2  # ... at most this long
    pass_size: int = 8  # the most images per model pass
    pad_passes: bool = True  # every pass has pass_size rows: an image's bits do not depend on its batch mates


@dataclass
class LimitsConfig:
    max_prompt_chars: int = 500
    max_steps: int = 50
    min_size: int = 16  # pixels, each side
    max_size: int = 1024
    size_multiple: int = 8
    max_images: int = 4  # n
    max_best_of: int = 8  # candidates scored per request
    max_guidance_scale: float = 20.0
    max_body_bytes: int = 65536
    request_timeout_s: float = 60.0
    body_timeout_s: Optional[float] = 30.0  # a request's whole body must arrive within this (else 408); None: no limit
    max_requests_per_client: Optional[int] = 64  # /v1 requests in flight per client address and ingress replica (429)


@dataclass
class ServeAdaptersConfig:
    max_per_replica: int = 4  # LRU of loaded adapters per replica
    cache_dir: str = "armature_runs/adapter_cache"
    resolve_ttl_s: float = 5.0  # how long a name or alias -> version lookup is reused
    local: dict[str, str] = field(default_factory=dict)  # adapters served from folders: name -> path


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    keep_alive_timeout_s: int = 5  # an idle kept-alive connection is closed after this
    # Ray Serve's direct ingress: the ingress replica serves HTTP itself, on a port of its own (30000 for the
    # first on a node), with no proxy hop; a load balancer (a Kubernetes Service) replaces the proxy.
    direct_ingress: bool = False
    direct_ingress_drain_s: float = 30.0  # a stopping replica keeps answering this long: load balancers drop it


@dataclass
class EditsConfig:
    """``POST /v1/images/edits``: a person rendered into a scene by a SkeleGuide pipeline."""

    pipeline: Optional[str] = None  # a SkeleGuidePipeline folder (save_pretrained); None: no edits route
    num_steps: int = 8  # steps of each stage when a request does not say
    max_body_bytes: int = 4_194_304  # edit requests carry images: their own body limit
    editor: ServeDeploymentConfig = field(
        default_factory=lambda: ServeDeploymentConfig(max_ongoing_requests=8, max_queued_requests=16)
    )


@dataclass
class ServeConfig:
    app_name: str = "armature"
    route_prefix: str = "/"
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # defaults of a request
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    generator: ServeDeploymentConfig = field(default_factory=ServeDeploymentConfig)
    ingress: ServeDeploymentConfig = field(default_factory=ServeDeploymentConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    adapters: ServeAdaptersConfig = field(default_factory=ServeAdaptersConfig)
    edits: EditsConfig = field(default_factory=EditsConfig)
    # Rewards a request may name for Best-of-N: name -> options (see armature.rewards.available())
    rewards: dict[str, Any] = field(default_factory=lambda: {"compressibility": {}})
    api_key_env: Optional[str] = "ARMATURE_API_KEY"  # bearer token required when this variable is set
    # The generator replica as its own HTTP ingress: no Ray hop between the FastAPI app and the model.
    # None: when there is one generator replica (generator.autoscaling.max_replicas 1).
    ingress_in_generator: Optional[bool] = None


# --------------------------------------------------------------------------- algorithms
@dataclass
class OptimizerConfig:
    """The optimizer every learner's schema inherits (``algo.learning_rate``, ...): AdamW with
    gradient clipping (``armature.platform.engine``). A schema overrides only its defaults."""

    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0


FLOW_MODEL_FAMILIES = ("tiny_flow", "sd3", "flux", "skeleguide_stage")  # flow-matching policies


def validate_algo(algo: DictConfig) -> DictConfig:
    """Check ``algo`` against its registered schema: unknown keys and wrong types fail naming the key."""
    from armature.platform.algorithms import get

    name = algo.get("name") if isinstance(algo, DictConfig) else None
    try:
        schema = OmegaConf.structured(get(name).schema)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for key in algo:  # a mapping the config sets replaces the schema's default mapping, never adds to it
        if key in schema and OmegaConf.get_type(schema, key) is dict:
            schema[key] = {}
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
    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


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
        raise ConfigError(_moved_key_message(err) or _hydra_message(err)) from err
    if "algo" in cfg:
        algo = validate_algo(cfg.algo)
        OmegaConf.set_struct(cfg, False)
        cfg.algo = algo
        OmegaConf.set_struct(cfg, True)
    if "generator" in cfg:
        check_serve(cfg)
    elif "trainer" in cfg:
        check(cfg)
    prompt_file = cfg.get("prompts", {}).get("file") if "prompts" in cfg else None
    if prompt_file and not os.path.isabs(prompt_file):
        # relative to where the command ran, else to the packaged configs (suites/gym_poses.txt):
        # Ray workers run elsewhere, so they get the absolute path
        for candidate in (os.path.abspath(prompt_file), os.path.join(config_dir(), prompt_file)):
            if os.path.isfile(candidate):
                OmegaConf.update(cfg, "prompts.file", os.path.abspath(candidate), force_add=False)
                break
    return cfg


def check(cfg: DictConfig) -> None:
    """Cross-field checks that a type system cannot express."""
    errors = [
        f"{key}=???: this value is required; set it on the command line, e.g. {key}=/path/to/model"
        for key in sorted(OmegaConf.missing_keys(cfg))
    ]
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
    if cfg.trainer.time_budget_s < 0:
        errors.append(
            f"trainer.time_budget_s={cfg.trainer.time_budget_s}: a number of seconds of training, or 0 for no budget"
        )
    if cfg.trainer.rollout_ahead not in (0, 1):
        errors.append(
            f"trainer.rollout_ahead={cfg.trainer.rollout_ahead}: use 0 (sample, then train) or 1 "
            "(sample the next epoch while training; at most one weight version behind)"
        )
    if cfg.cluster.num_samplers < 1:
        errors.append("cluster.num_samplers must be >= 1")
    if cfg.sampling.eta <= 0:
        errors.append(f"sampling.eta={cfg.sampling.eta}: DDPO needs a stochastic sampler, set eta > 0")
    if not cfg.reward.components:
        errors.append("reward.components is empty: name at least one reward, e.g. reward=compressibility")
    errors.extend(guard_errors(cfg))
    errors.extend(refresh_errors(cfg))
    if cfg.get("algo") is not None:  # the algorithm's own checks (armature.platform.algorithms)
        from armature.platform.algorithms import get

        algorithm = get(cfg.algo.name)
        errors.extend(algorithm.check(cfg) if algorithm.check else [])
        if cfg.refresh.every and not algorithm.refresh:
            errors.append(
                f"refresh.every={cfg.refresh.every}: algo={cfg.algo.name} does not refresh its reward "
                "(ddpo, grpo and nft do); set refresh.every=0"
            )
        if cfg.trainer.rollout_ahead and not algorithm.rollout_ahead:
            errors.append(
                f"trainer.rollout_ahead={cfg.trainer.rollout_ahead}: algo={cfg.algo.name} does not roll out "
                "on-policy one epoch ahead (ddpo, grpo, nft and online_dpo do); set trainer.rollout_ahead=0"
            )
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def guard_errors(cfg: DictConfig) -> list[str]:
    """``guard.monitor`` must name a reward component at weight 0 (one the learner never sees)."""
    guard, components = cfg.guard, cfg.reward.components
    if guard.monitor is None:
        return []
    errors = []
    if guard.monitor not in components:
        errors.append(
            f"guard.monitor={guard.monitor}: not a reward component ({', '.join(components) or 'none'}); add it "
            f"at weight 0, e.g. '++reward.components.{guard.monitor}={{weight: 0.0}}'"
        )
    elif float((components[guard.monitor] or {}).get("weight", 1.0)) != 0.0:
        errors.append(
            f"guard.monitor={guard.monitor}: the learner is trained on it (weight "
            f"{components[guard.monitor].get('weight', 1.0)}); a monitor has weight 0"
        )
    if guard.patience < 1:
        errors.append(f"guard.patience={guard.patience}: must be >= 1 epoch")
    return errors


def refresh_errors(cfg: DictConfig) -> list[str]:
    """``refresh.*``: a trained reward with a trainable member, annotators that can label, sane
    sizes. An annotator reward that is also the trained reward is allowed (simulated annotators
    only: they label with their own copy, frozen at its starting weights)."""
    r = cfg.refresh
    if r.every == 0:
        return []
    from armature.rewards.fine_tune import TRAINABLE_REWARDS

    if r.every < 0:
        return [f"refresh.every={r.every}: epochs between refreshes, >= 1 (0: off)"]
    errors = []
    trained = [n for n, o in cfg.reward.components.items() if float((o or {}).get("weight", 1.0)) != 0.0]
    if not set(trained) & set(TRAINABLE_REWARDS):
        errors.append(
            f"refresh.every={r.every}: the trained reward ({', '.join(trained) or 'none'}) has no trainable member; "
            f"the refresh fine-tunes the conv scorers of {' or '.join(TRAINABLE_REWARDS)} (e.g. reward=gym_anatomy), "
            "or set refresh.every=0"
        )
    for key in ("pairs", "steps", "batch_size", "labels_per_pair"):
        if r[key] < 1:
            errors.append(f"refresh.{key}={r[key]}: must be >= 1")
    if r.learning_rate <= 0:
        errors.append(f"refresh.learning_rate={r.learning_rate}: must be > 0, e.g. 1e-4")
    if not 0 <= r.replay <= 1:
        errors.append(f"refresh.replay={r.replay}: the share of earlier pairs mixed in, in [0, 1]")
    if r.annotator not in ("simulated", "human"):
        errors.append(f"refresh.annotator={r.annotator}: use simulated (a reward labels) or human (the labeling page)")
    if r.annotator == "simulated":
        if not r.annotator_reward:
            errors.append(
                "refresh.annotator_reward is empty: name the annotators' reward, e.g. {gym_oracle: {weight: 1}}"
            )
        if r.labels_per_pair > r.num_annotators:
            errors.append(
                f"refresh.labels_per_pair={r.labels_per_pair}: at most refresh.num_annotators={r.num_annotators} "
                "simulated annotators can label a pair"
            )
    if not 0 <= r.noise <= 1 or not 0 <= r.tie_rate <= 1:
        errors.append(f"refresh.noise={r.noise}, refresh.tie_rate={r.tie_rate}: probabilities in [0, 1]")
    if r.store is None and "://" in str(cfg.trainer.storage_path):
        errors.append(
            f"refresh.store=null keeps the store in the run folder, but trainer.storage_path={cfg.trainer.storage_path} "
            "is not local: give refresh.store a database URL or a local path"
        )
    return errors


def check_serve(cfg: DictConfig) -> None:
    """Cross-field checks of a serving config (the reward names: ``armature serve`` checks them)."""
    errors = []
    lim, batching = cfg.limits, cfg.batching
    if not 0 < lim.min_size <= lim.max_size:
        errors.append(f"limits.min_size={lim.min_size}, limits.max_size={lim.max_size}: need 0 < min_size <= max_size")
    if lim.size_multiple < 1 or lim.min_size % lim.size_multiple or lim.max_size % lim.size_multiple:
        errors.append(f"limits.size_multiple={lim.size_multiple} must be >= 1 and divide min_size and max_size")
    for key in ("max_prompt_chars", "max_steps", "max_images", "max_best_of", "max_body_bytes"):
        if lim[key] < 1:
            errors.append(f"limits.{key} must be >= 1")
    if lim.request_timeout_s <= 0:
        errors.append("limits.request_timeout_s must be > 0")
    if lim.body_timeout_s is not None and lim.body_timeout_s <= 0:
        errors.append("limits.body_timeout_s must be > 0 (null: no limit)")
    if lim.max_requests_per_client is not None and lim.max_requests_per_client < 1:
        errors.append("limits.max_requests_per_client must be >= 1 (null: no limit)")
    if cfg.http.keep_alive_timeout_s < 1:
        errors.append("http.keep_alive_timeout_s must be >= 1")
    if cfg.http.direct_ingress_drain_s < 0:
        errors.append("http.direct_ingress_drain_s must be >= 0 (0: stop at once)")
    if not 1 <= cfg.sampling.num_steps <= lim.max_steps:
        errors.append(f"sampling.num_steps={cfg.sampling.num_steps}: must be in [1, limits.max_steps={lim.max_steps}]")
    if cfg.sampling.eta < 0:
        errors.append(f"sampling.eta={cfg.sampling.eta}: must be >= 0 (0: deterministic DDIM)")
    if not 1 <= cfg.edits.num_steps <= lim.max_steps:
        errors.append(f"edits.num_steps={cfg.edits.num_steps}: must be in [1, limits.max_steps={lim.max_steps}]")
    if batching.max_batch_size < 1 or batching.pass_size < 1:
        errors.append("batching.max_batch_size and batching.pass_size must be >= 1")
    if batching.batch_wait_timeout_s < 0 or batching.arrival_gap_s < 0:
        errors.append("batching.batch_wait_timeout_s and batching.arrival_gap_s must be >= 0 (0: no waiting)")
    for name in ("generator", "ingress"):
        auto = cfg[name].autoscaling
        if not 0 <= auto.min_replicas <= auto.max_replicas or auto.max_replicas < 1:
            errors.append(f"{name}.autoscaling: need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if cfg[name].max_ongoing_requests < 1:
            errors.append(f"{name}.max_ongoing_requests must be >= 1")
    if cfg.ingress_in_generator and cfg.generator.autoscaling.max_replicas > 1:
        errors.append(
            "ingress_in_generator=true with generator.autoscaling.max_replicas > 1: adapter-aware routing "
            "across replicas needs a separate ingress; set it false or null"
        )
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def flatten(cfg: DictConfig | dict | TrainConfig, prefix: str = "") -> dict[str, str]:
    """``{"algo.learning_rate": "0.0003", ...}`` for logging as parameters."""
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True)
    else:
        container = asdict(cfg) if is_dataclass(cfg) else cfg
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


def _moved_key_message(err: Exception) -> str | None:
    """A key that moved into a family's group (``model.stage``, ``model.tiny.arch``): name the new one."""
    while err is not None:
        found = re.search(r"full_key: (\S+)", str(err))
        key = getattr(err, "full_key", None) or (found.group(1) if found else None)
        if key in MOVED_MODEL_KEYS:
            return f"invalid config: {key} is now {MOVED_MODEL_KEYS[key]} (family options sit in the family's group)"
        err = err.__cause__
    return None


def _hydra_message(err: Exception) -> str:
    """Hydra wraps omegaconf's error; keep the lines that name the key."""
    parts = []
    while err is not None:
        text = str(err).strip()
        if text and text not in parts:
            parts.append(text)
        err = err.__cause__
    return "invalid config: " + "\n".join(parts)
