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
    "ServeConfig",
    "DDPOConfig",
    "DPOConfig",
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
    vae_channels: list[int] = field(default_factory=lambda: [16, 32])
    latent_channels: int = 4
    vae_kind: str = "kl"  # or taesd (AutoencoderTiny)
    text_hidden: int = 32
    text_layers: int = 2
    max_prompt_tokens: int = 32
    # family tiny_flow only (armature.policies.tiny.TinyFlowConfig): sd3 or flux transformer
    arch: str = "sd3"
    transformer_layers: int = 2
    transformer_heads: int = 4
    head_dim: int = 8
    shift: float = 3.0


@dataclass
class LoraConfig:
    enabled: bool = True  # False: full fine-tuning of the UNet (with ZeRO for large models)
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0


@dataclass
class ModelConfig:
    family: str = "tiny"  # tiny | tiny_flow | gym (armature gym pretrain) | sd (SD 1.5 family) | sdxl | sd3 | flux
    #   | skeleguide_stage (one SkeleGuide adapter as an RL policy)
    pretrained: Optional[str] = None  # hub id or local path (family sd / sdxl)
    revision: Optional[str] = None
    variant: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when the actor has a GPU, else cpu
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # family skeleguide_stage only (armature.policies.skeleguide_policy): which SkeleGuide adapter
    # trains (skeletal | appearance), where each sample's condition comes from (gym | a folder of
    # images), and the pipeline's SkeleGuideParams when model.pretrained is unset
    stage: str = "skeletal"
    conditions: str = "gym"
    skeleguide: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingConfig:
    num_steps: int = 10
    guidance_scale: float = 5.0
    eta: float = 1.0
    noise_level: float = 0.7  # flow models: Flow-GRPO's SDE noise level
    height: Optional[int] = None
    width: Optional[int] = None
    negative_prompt: str = ""
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
class TrainConfig:
    algo: Any = MISSING  # validated against ALGO_SCHEMAS[algo.name]
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)  # preference pairs (the DPO jobs)



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
    batch_wait_timeout_s: float = 0.05
    pass_size: int = 8  # images per model pass; every pass has this many rows (padded)


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


@dataclass
class EditsConfig:
    """``POST /v1/images/edits``: a person rendered into a scene by a SkeleGuide pipeline."""

    pipeline: Optional[str] = None  # a SkeleGuidePipeline folder (save_pretrained); None: no edits route
    num_steps: int = 8  # steps of each stage when a request does not say
    max_body_bytes: int = 4_194_304  # edit requests carry images: their own body limit
    editor: ServeDeploymentConfig = field(default_factory=lambda: ServeDeploymentConfig(
        max_ongoing_requests=8, max_queued_requests=16))


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
    # after training: every prompt x this many fixed seeds, sampled with the weights before and
    # after training (the same noise), scored by every reward component (0: off)
    final_eval_per_prompt: int = 0


@dataclass
class DPOConfig:
    name: str = "dpo"  # dpo (Diffusion-DPO) or asap_dpo (ASAP's localized, margin-bounded DPO)
    num_epochs: int = 4
    train_batch_size: int = 8  # pairs per micro-batch on one worker
    gradient_accumulation_batches: int = 1  # micro-batches per optimizer step
    learning_rate: float = 3e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    beta: float = 5000.0  # Diffusion-DPO's KL strength: loss = -log sigmoid(beta / 2 * delta)
    alpha: float = 0.0  # ASAP eq. 4: residuals weighted by 1 + alpha * mask
    tau: Optional[float] = None  # ASAP eq. 6: set -> loss (delta - tau)^2 instead of DPO's
    prediction_type: Optional[str] = None  # None: the scheduler's (epsilon or v_prediction)
    heldout_draws: int = 4  # timestep/noise draws per held-out pair
    eval_every: int = 1  # epochs


@dataclass
class GRPOConfig:
    """GRPO (armature/jobs/grpo.py): Flow-GRPO with denoising reduction and MixGRPO's window."""

    name: str = "grpo"
    num_epochs: int = 10
    prompts_per_epoch: int = 8  # prompt slots per epoch, over all workers
    group_size: int = 4  # images per prompt slot (G); advantages are normalised within it
    train_batch_size: int = 8  # samples per micro-batch on one worker
    gradient_accumulation_batches: int = 1  # micro-batches per optimizer step (times the window steps)
    num_inner_epochs: int = 1
    train_num_steps: Optional[int] = None  # denoising reduction: steps of training rollouts (None: sampling.num_steps)
    sde_window_size: int = 0  # MixGRPO: SDE (and trained) steps per trajectory; 0: all of them
    sde_window_stride: int = 1  # steps the window moves ...
    sde_window_shift_every: int = 1  # ... every this many epochs
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 0.05
    adv_clip_max: float = 5.0
    adv_eps: float = 1e-4
    scale_by_group_std: bool = True  # False: only centre within the group
    beta: float = 0.0  # KL penalty to the frozen reference policy


@dataclass
class NFTConfig:
    """DiffusionNFT (armature/jobs/nft.py): negative-aware fine-tuning on the forward process."""

    name: str = "nft"
    num_epochs: int = 10
    prompts_per_epoch: int = 8
    group_size: int = 4
    train_batch_size: int = 8
    gradient_accumulation_batches: int = 1
    num_inner_epochs: int = 1
    timesteps_per_sample: int = 2  # forward-process draws (t, noise) per clean sample
    sampler: str = "ode"  # how the sampling policy draws images: ode or sde (any solver works)
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    beta: float = 1.0  # strength of the implicit positive / negative mixing
    reward_norm: str = "group"  # Z_c of r = 1/2 + 1/2 clip((R - mean_c) / Z_c, -1, 1): group or global std
    ema_decay_rate: float = 0.1  # sampling policy <- eta * sampling + (1 - eta) * trained, eta_i = ...
    ema_decay_max: float = 0.5  # ... min(ema_decay_rate * i, ema_decay_max) at epoch i


@dataclass
class AlignPropConfig:
    """Reward-gradient learners (armature/jobs/alignprop.py): AlignProp, DRaFT-K and ReFL."""

    name: str = "alignprop"  # alignprop | draft | refl (one learner, three settings)
    num_epochs: int = 10
    batches_per_epoch: int = 4  # micro-batches per worker per epoch
    batch_size: int = 4  # images per micro-batch on one worker
    gradient_accumulation_batches: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # K, the steps the gradient passes through, drawn per micro-batch uniformly from
    # [truncation_min, truncation_max] (AlignProp); equal bounds: DRaFT-K's fixed K
    truncation_min: int = 1
    truncation_max: int = 10
    predict_x0: bool = False  # ReFL: reward on the predicted x0 of the K-th step from the end
    gradient_checkpointing: bool = True  # recompute each backpropagated UNet call
    reward_scale: float = 1.0  # loss = -reward_scale * reward


@dataclass
class BestOfNConfig:
    """Best-of-N selection job (armature/jobs/bon.py): `armature train algo=bon`."""

    name: str = "bon"
    n: int = 8  # candidates per prompt
    k: int = 1  # kept per prompt
    repeats: int = 1  # each prompt of prompts.* this many times
    log_prompts: int = 4  # prompts whose kept and rejected candidates are logged as images
    pairs_path: Optional[str] = None  # write each prompt's (best, worst) as preference pairs (Parquet)


@dataclass
class EvalConfig:
    """Anatomy evaluation (armature/jobs/evaluate.py): `armature eval`, AER and RSI per policy."""

    name: str = "eval"
    suite: str = "gym"  # `gym` (the anatomy gym's pose prompts) or a JSONL / text file of prompts
    samples_per_prompt: int = 4  # the same seeds for every policy
    judge: str = "gym_oracle"  # the reward component that judges; an image passes at score >= threshold
    threshold: float = 0.0  # gym_oracle scores -severity: 0 passes only defect-free figures
    tie_tolerance: float = 0.0  # judge scores this close are a tie (RSI)
    severe_at: Optional[float] = None  # a judge score <= this counts as severe (gym_oracle: -3)
    # name -> a trained adapter folder (or null: the base model); RSI is against the first
    policies: dict[str, Optional[str]] = field(default_factory=lambda: {"base": None})
    # Best-of-N rows: for each N > 1, every policy also keeps the best of N candidates by the
    # reward component `selector` (never the judge, or the selection would be the answer)
    best_of: list[int] = field(default_factory=lambda: [1])
    selector: Optional[str] = None


@dataclass
class RewardModelConfig:
    """Reward-model training (armature/jobs/reward_model.py): a CLIP scorer on preference pairs."""

    name: str = "reward_model"
    num_epochs: int = 6
    train_batch_size: int = 16  # pairs per micro-batch on one worker
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "bradley_terry"  # bradley_terry (ties at target 0.5) or listwise (HPS: one chosen among n)
    max_choices: int = 4  # listwise: the most images in a choice set (pairs sharing prompt and chosen image)
    severity_weight: float = 0.0  # > 0: ordinal severity head (BACON's 4 levels) on the same score
    backbone: str = "tiny"  # tiny (a small random CLIP built from config), a CLIPModel hub id / folder, or conv
    conv_widths: list[int] = field(default_factory=lambda: [32, 64, 64, 128])  # backbone=conv: block channels
    processor: Optional[str] = None  # tokenizer + preprocessing source (default: the backbone)
    synthetic_choices: int = 3  # synthetic data: degraded copies per drawing (choice sets of up to this + 1)
    synthetic_tie_fraction: float = 0.1  # synthetic data: share of drawings that also give a tie pair


@dataclass
class RewardEvalConfig:
    """Reward evaluation (armature/jobs/reward_eval.py) on a pair dataset."""

    name: str = "reward_eval"
    # label -> reward spec ({registered name: {weight, **options}}), each scored in its own actors
    rewards: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16  # pairs per scoring call
    num_actors: int = 1  # per reward


@dataclass
class HPSPrefixConfig:
    """HPS-style preference-prefix LoRA tuning (armature/jobs/hps_prefix.py): `algo=hps_prefix`."""

    name: str = "hps_prefix"
    identifier: str = "Weird image."  # prefix of non-preferred captions; the negative prompt at inference
    candidates: int = 4  # images per prompt group (HPS's n)
    repeats: int = 16  # groups per prompt of prompts.*
    alpha: float = 2.0  # selectivity: keep the best (worst) if softmax(score_scale * score) > alpha / n
    score_scale: float = 100.0  # reward -> logit scale of the softmax
    num_epochs: int = 20
    train_batch_size: int = 16
    gradient_accumulation_batches: int = 1
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    eval_repeats: int = 8  # evaluation samples per prompt, with and without the identifier
    eval_guidance_scale: float = 5.0  # classifier-free guidance at evaluation (the identifier needs it > 1)
    eval_seed: int = 1234


ALGO_SCHEMAS: dict[str, type] = {"ddpo": DDPOConfig, "dpo": DPOConfig, "asap_dpo": DPOConfig}
ALGO_SCHEMAS.update({"hps_prefix": HPSPrefixConfig})
ALGO_SCHEMAS.update({"bon": BestOfNConfig, "eval": EvalConfig})
ALGO_SCHEMAS.update({"alignprop": AlignPropConfig, "draft": AlignPropConfig, "refl": AlignPropConfig})
ALGO_SCHEMAS.update({"grpo": GRPOConfig, "nft": NFTConfig})


@dataclass
class OnlineDPOConfig:
    """The online feedback loop (armature/jobs/online_dpo.py): sample pairs, label, Diffusion-DPO, repeat."""

    name: str = "online_dpo"
    num_rounds: int = 4  # sample -> label -> learn -> new weights to the samplers
    pairs_per_round: int = 32  # pairs stored for labeling each round
    prefilter_keep: float = 1.0  # share of sampled pairs kept, the reward's (reward.*) most uncertain first
    prefilter_order: str = "uncertain"  # which pairs prefilter_keep keeps: uncertain (first) | confident (first)
    store: Optional[str] = None  # preference store: SQLite path or SQLAlchemy URL; None: <run folder>/feedback.db
    annotator: str = "simulated"  # simulated (a reward stands in for people) | human (the labeling page)
    annotator_reward: dict[str, Any] = field(default_factory=lambda: {"brightness": {"weight": 1.0}})
    num_annotators: int = 2  # simulated annotators
    annotator_noise: float = 0.1  # probability a simulated annotator picks the reward's loser
    annotator_tie_rate: float = 0.05  # probability it answers "no preference"
    labels_per_pair: int = 2  # people (or simulated annotators) who label each pair
    min_labels_per_round: int = 0  # human: new labels to wait for per round; 0: pairs_per_round * labels_per_pair
    label_timeout_s: float = 3600.0  # human: train on what is there after this long
    epochs_per_round: int = 2  # passes over the labeled training pairs per round
    train_batch_size: int = 8
    gradient_accumulation_batches: int = 1
    learning_rate: float = 3e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    beta: float = 5000.0  # Diffusion-DPO's KL strength
    alpha: float = 0.0  # ASAP's region weight (the online pairs have no masks: 0)
    tau: Optional[float] = None
    prediction_type: Optional[str] = None
    heldout_draws: int = 4
    probe_pairs: int = 0  # >0: a fixed probe of that many pairs from the base policy, labeled first, never trained on


def _check_online_dpo(cfg: DictConfig, algo: DictConfig) -> list[str]:
    errors = []
    if algo.num_rounds < 1 or algo.pairs_per_round < 1 or algo.epochs_per_round < 1:
        errors.append("algo.num_rounds, algo.pairs_per_round and algo.epochs_per_round must be >= 1")
    if algo.probe_pairs < 0:
        errors.append(f"algo.probe_pairs={algo.probe_pairs}: use 0 (the first round's held-out pairs are the probe) "
                      "or a number of pairs for a fixed probe, e.g. 96")
    if not 0 < algo.prefilter_keep <= 1:
        errors.append(f"algo.prefilter_keep={algo.prefilter_keep}: must be in (0, 1] (1 keeps every pair)")
    if algo.prefilter_order not in ("uncertain", "confident"):
        errors.append(f"algo.prefilter_order={algo.prefilter_order}: use uncertain (the pairs the reward is least "
                      "sure of first) or confident (the clearest gaps first)")
    if algo.annotator not in ("simulated", "human"):
        errors.append(f"algo.annotator={algo.annotator}: use simulated or human")
    if algo.annotator == "simulated" and not algo.annotator_reward:
        errors.append("algo.annotator_reward is empty: name the simulated annotator's reward, e.g. {brightness: {weight: 1}}")
    if not 0 <= algo.annotator_noise <= 1 or not 0 <= algo.annotator_tie_rate <= 1:
        errors.append(f"algo.annotator_noise={algo.annotator_noise}, algo.annotator_tie_rate={algo.annotator_tie_rate}: "
                      "probabilities in [0, 1]")
    if algo.labels_per_pair < 1 or (algo.annotator == "simulated" and algo.labels_per_pair > algo.num_annotators):
        errors.append(f"algo.labels_per_pair={algo.labels_per_pair}: must be >= 1 and, with simulated annotators, "
                      f"<= algo.num_annotators={algo.num_annotators}")
    if algo.beta <= 0 or algo.prediction_type not in (None, "epsilon", "v_prediction"):
        errors.append(f"algo.beta={algo.beta} must be > 0; algo.prediction_type: epsilon, v_prediction or null")
    if not 0 < cfg.data.heldout_fraction < 1:
        errors.append(f"data.heldout_fraction={cfg.data.heldout_fraction}: online_dpo measures held-out accuracy, "
                      "use a value in (0, 1), e.g. 0.25")
    return errors


ALGO_SCHEMAS.update({"online_dpo": OnlineDPOConfig})

@dataclass
class SkeleGuideConfig:
    """SkeleGuide's three training phases (armature/jobs/skeleguide.py): `algo=skeleguide model=tiny_skeleguide`."""

    name: str = "skeleguide"
    phase1_steps: int = 30  # reasoning loss alone (eq. 4), skeletal adapter
    phase2_steps: int = 30  # joint: lambda_reason * L_reason + lambda_render * L_render, renderer on M_hat
    phase3_steps: int = 30  # rendering loss alone on ground-truth layouts, appearance adapter
    steps_per_epoch: int = 10  # optimizer steps between checkpoints; an epoch never spans two phases
    train_batch_size: int = 4  # triples per step on one worker
    learning_rate: float = 3e-3  # the paper: 1e-4 on FLUX.1-dev (the tiny random model needs more)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lambda_reason: float = 0.5
    lambda_render: float = 1.0
    layout_estimate: str = "noise"  # noise: eq. 6, M_0 + v_hat(M_0, t=0) | shared: M_t + (1 - t) v_hat at L_reason's t
    lora_targets: str = "qkv"  # qkv: eq. 3 (condition tokens' Q/K/V) | all: every attention projection
    guidance_scale: float = 2.5  # guidance-distilled models only (FLUX.1-Kontext-dev)
    triples: Optional[str] = None  # Parquet of triples (armature.skeleton.scenes.write_triples); None: gym, on the fly
    pose: Optional[str] = None  # gym triples of one pose class only
    heldout_triples: int = 8  # fixed triples and noise: held-out losses every epoch, sample grids at phase ends
    sample_steps: int = 8  # Euler steps of each stage in the sample grids (and the saved pipeline's default)
    # model=tiny_skeleguide: a trained AutoencoderKL folder (benchmarks/skeleguide.py --vae-cache makes one)
    tiny_vae: Optional[str] = None


ALGO_SCHEMAS.update({"skeleguide": SkeleGuideConfig})
ALGO_SCHEMAS.update({"reward_model": RewardModelConfig, "reward_eval": RewardEvalConfig})


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
        raise ConfigError(_hydra_message(err)) from err
    if "algo" in cfg:
        algo = validate_algo(cfg.algo)
        OmegaConf.set_struct(cfg, False)
        cfg.algo = algo
        OmegaConf.set_struct(cfg, True)
    check_serve(cfg) if "generator" in cfg else check(cfg)
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
    errors = [f"{key}=???: this value is required; set it on the command line, e.g. {key}=/path/to/model"
              for key in sorted(OmegaConf.missing_keys(cfg))]
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
        if algo.final_eval_per_prompt < 0:
            errors.append(f"algo.final_eval_per_prompt={algo.final_eval_per_prompt}: seeds per prompt of the "
                          "evaluation after training; use 0 to skip it, e.g. 16")
    if algo is not None and algo.name in ("dpo", "asap_dpo"):
        if algo.beta <= 0 or algo.alpha < 0 or (algo.tau is not None and algo.tau < 0):
            errors.append(f"algo.beta={algo.beta} must be > 0, algo.alpha={algo.alpha} and algo.tau={algo.tau} >= 0")
        if algo.prediction_type not in (None, "epsilon", "v_prediction"):
            errors.append(f"algo.prediction_type={algo.prediction_type}: use epsilon or v_prediction (or null)")
        if not 0 <= cfg.data.heldout_fraction < 1:
            errors.append(f"data.heldout_fraction={cfg.data.heldout_fraction}: must be in [0, 1)")
        if cfg.data.heldout_fraction > 0 and algo.heldout_draws < 1:
            errors.append(f"algo.heldout_draws={algo.heldout_draws}: must be >= 1")
    if algo is not None and algo.name in ("grpo", "nft"):
        errors.extend(_check_group_learner(cfg, algo))
    if algo is not None and algo.name == "online_dpo":
        errors.extend(_check_online_dpo(cfg, algo))
    if algo is not None and algo.name in ("alignprop", "draft", "refl"):
        if not 1 <= algo.truncation_min <= algo.truncation_max <= cfg.sampling.num_steps:
            errors.append(f"algo.truncation_min={algo.truncation_min}, algo.truncation_max={algo.truncation_max}: "
                          f"need 1 <= truncation_min <= truncation_max <= sampling.num_steps={cfg.sampling.num_steps}")
        if algo.batch_size < 1 or algo.batches_per_epoch < 1 or algo.gradient_accumulation_batches < 1:
            errors.append("algo.batch_size, algo.batches_per_epoch and algo.gradient_accumulation_batches must be >= 1")
    if algo is not None and algo.name == "eval" and (algo.samples_per_prompt < 1 or not algo.policies):
        errors.append(f"algo.samples_per_prompt={algo.samples_per_prompt}, algo.policies={dict(algo.policies)}: "
                      "need at least one sample per prompt and one policy (name: adapter folder or null)")
    if algo is not None and algo.name == "eval":
        if not algo.best_of or min(algo.best_of) < 1:
            errors.append(f"algo.best_of={list(algo.best_of)}: a list of N >= 1, e.g. [1, 4, 8]")
        elif max(algo.best_of) > 1 and (not algo.selector or algo.selector == algo.judge):
            errors.append(f"algo.best_of={list(algo.best_of)} needs algo.selector: a reward component other than "
                          f"the judge ({algo.judge}) to rank the candidates, e.g. algo.selector=learned")
    if algo is not None and algo.name == "bon" and (algo.n < 1 or not 1 <= algo.k <= algo.n or algo.repeats < 1):
        errors.append(f"algo.n={algo.n}, algo.k={algo.k}, algo.repeats={algo.repeats}: need n >= 1, 1 <= k <= n, repeats >= 1")
    if algo is not None and algo.name == "hps_prefix":
        if algo.candidates < 2 or algo.repeats < 1 or algo.eval_repeats < 2 or algo.alpha <= 0:
            errors.append(f"algo.candidates={algo.candidates}, algo.repeats={algo.repeats}, algo.eval_repeats="
                          f"{algo.eval_repeats}, algo.alpha={algo.alpha}: need candidates >= 2, repeats >= 1, "
                          "eval_repeats >= 2, alpha > 0")
        if not algo.identifier.strip() or algo.eval_guidance_scale <= 1:
            errors.append(f"algo.identifier={algo.identifier!r}, algo.eval_guidance_scale={algo.eval_guidance_scale}: "
                          "the identifier must be non-empty and the guidance scale > 1 (it is the negative prompt)")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


FLOW_MODEL_FAMILIES = ("tiny_flow", "sd3", "flux", "skeleguide_stage")


def _check_group_learner(cfg: DictConfig, algo: DictConfig) -> list[str]:
    """GRPO and DiffusionNFT: group sizes, batch divisibility, window and NFT settings."""
    errors = []
    workers = cfg.trainer.num_workers
    if algo.group_size < 2:
        errors.append(f"algo.group_size={algo.group_size}: a group needs >= 2 images to compare")
    if algo.prompts_per_epoch < 1 or algo.prompts_per_epoch % workers:
        errors.append(f"algo.prompts_per_epoch={algo.prompts_per_epoch} must be >= 1 and divide evenly "
                      f"over trainer.num_workers={workers}")
    else:
        per_worker = algo.prompts_per_epoch // workers * algo.group_size
        if per_worker % algo.train_batch_size:
            errors.append(f"algo.train_batch_size={algo.train_batch_size} must divide the samples per worker "
                          f"({per_worker} = prompts_per_epoch / num_workers * group_size)")
        elif (per_worker // algo.train_batch_size) % algo.gradient_accumulation_batches:
            errors.append(f"algo.gradient_accumulation_batches={algo.gradient_accumulation_batches} must divide "
                          f"the micro-batches per worker ({per_worker // algo.train_batch_size})")
    if algo.name == "grpo":
        steps = algo.train_num_steps or cfg.sampling.num_steps
        if algo.train_num_steps is not None and algo.train_num_steps < 1:
            errors.append(f"algo.train_num_steps={algo.train_num_steps}: must be >= 1 (or null: sampling.num_steps)")
        if not 0 <= algo.sde_window_size <= steps:
            errors.append(f"algo.sde_window_size={algo.sde_window_size}: must be in [0, {steps}] "
                          "(0: every step; at most the training rollout's steps)")
        if algo.sde_window_stride < 0 or algo.sde_window_shift_every < 1:
            errors.append("algo.sde_window_stride must be >= 0 and algo.sde_window_shift_every >= 1")
        if algo.beta < 0 or algo.clip_range < 0:
            errors.append(f"algo.beta={algo.beta} and algo.clip_range={algo.clip_range} must be >= 0")
        if cfg.model.family in FLOW_MODEL_FAMILIES and cfg.sampling.noise_level <= 0:
            errors.append(f"sampling.noise_level={cfg.sampling.noise_level}: GRPO needs SDE steps, set it > 0")
    if algo.name == "nft":
        if cfg.model.family not in FLOW_MODEL_FAMILIES:
            errors.append(f"model.family={cfg.model.family}: DiffusionNFT trains flow-matching models; "
                          "use model=tiny_flow (or family sd3 / flux, or model=skeleguide_stage)")
        if algo.sampler not in ("ode", "sde"):
            errors.append(f"algo.sampler={algo.sampler}: use ode or sde")
        if algo.reward_norm not in ("group", "global"):
            errors.append(f"algo.reward_norm={algo.reward_norm}: use group or global")
        if algo.beta <= 0 or algo.timesteps_per_sample < 1:
            errors.append(f"algo.beta={algo.beta} must be > 0 and algo.timesteps_per_sample >= 1")
        if not (0 <= algo.ema_decay_max < 1 and algo.ema_decay_rate >= 0):
            errors.append(f"algo.ema_decay_max={algo.ema_decay_max} must be in [0, 1), algo.ema_decay_rate >= 0")
    return errors


def check_serve(cfg: DictConfig) -> None:
    """Cross-field checks of a serving config."""
    from armature.rewards import available

    errors = []
    lim, batching = cfg.limits, cfg.batching
    if not 0 < lim.min_size <= lim.max_size:
        errors.append(f"limits.min_size={lim.min_size}, limits.max_size={lim.max_size}: "
                      "need 0 < min_size <= max_size")
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
    if not 1 <= cfg.sampling.num_steps <= lim.max_steps:
        errors.append(f"sampling.num_steps={cfg.sampling.num_steps}: "
                      f"must be in [1, limits.max_steps={lim.max_steps}]")
    if cfg.sampling.eta < 0:
        errors.append(f"sampling.eta={cfg.sampling.eta}: must be >= 0 (0: deterministic DDIM)")
    if not 1 <= cfg.edits.num_steps <= lim.max_steps:
        errors.append(f"edits.num_steps={cfg.edits.num_steps}: must be in [1, limits.max_steps={lim.max_steps}]")
    if batching.max_batch_size < 1 or batching.pass_size < 1 or batching.batch_wait_timeout_s < 0:
        errors.append("batching.max_batch_size and batching.pass_size must be >= 1, batch_wait_timeout_s >= 0")
    for name in ("generator", "ingress"):
        auto = cfg[name].autoscaling
        if not 0 <= auto.min_replicas <= auto.max_replicas or auto.max_replicas < 1:
            errors.append(f"{name}.autoscaling: need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if cfg[name].max_ongoing_requests < 1:
            errors.append(f"{name}.max_ongoing_requests must be >= 1")
    unknown = [r for r in cfg.rewards if r not in available()]
    if unknown:
        errors.append(f"rewards: unknown {unknown}; available rewards: {', '.join(available())}")
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
