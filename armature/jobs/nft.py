"""DiffusionNFT (Zheng et al., 2025, arXiv 2509.16117): online RL on the forward process, on Ray.

No trajectories and no log-probabilities: the samplers draw clean images with the *sampling
policy* (any solver: ``algo.sampler`` ode or sde), the reward actors score them, and the
learner trains the flow-matching objective of ``armature.losses.nft_loss`` on those clean
latents. Flow-matching models only (``model=tiny_flow``, SD 3.x, FLUX); training is CFG-free
(the learner's predictions use no guidance, whatever ``sampling.guidance_scale`` the samplers use).

Read top to bottom (``train_loop``, on each Ray Train worker), per epoch:
  1. the samplers draw ``group_size`` images per prompt slot with the sampling policy's weights
     (seeds per sample, as in GRPO); rewards are scored as batches finish;
  2. rewards -> optimality probabilities r in [0, 1] within each prompt's group;
  3. per micro-batch and forward-process draw (t ~ U(0, 1), noise): x_t, the target velocity,
     the trained policy's and the sampling policy's velocities, the NFT loss; DeepSpeed steps;
  4. the sampling policy follows the trained one: theta_old <- eta theta_old + (1 - eta) theta,
     eta = min(ema_decay_rate * epoch, ema_decay_max);
  5. log to MLflow (rank 0) and checkpoint (the sampling policy's weights included).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from armature.losses import ema_update, forward_process, nft_loss, optimality_probability
from armature.platform.algorithms import Algorithm, register
from armature.platform.config import FLOW_MODEL_FAMILIES, OptimizerConfig
from armature.platform.engine import all_reduce_mean
from armature.platform.learner import (
    RolloutAhead,
    Worker,
    all_gather,
    epoch_plan,
    group_errors,
    idle_shares,
    prompt_list,
    reward_metrics,
    run_learner,
    submit_rollouts,
)


# ============================================================================ config
@dataclass
class NFTConfig(OptimizerConfig):
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
    beta: float = 1.0  # strength of the implicit positive / negative mixing
    reward_norm: str = "group"  # Z_c of r = 1/2 + 1/2 clip((R - mean_c) / Z_c, -1, 1): group or global std
    ema_decay_rate: float = 0.1  # sampling policy <- eta * sampling + (1 - eta) * trained, eta_i = ...
    ema_decay_max: float = 0.5  # ... min(ema_decay_rate * i, ema_decay_max) at epoch i


def check(cfg: DictConfig) -> list[str]:
    """The groups; a flow-matching model; the sampler, reward normalisation and EMA settings."""
    algo, errors = cfg.algo, group_errors(cfg)
    if cfg.model.family not in FLOW_MODEL_FAMILIES:
        errors.append(
            f"model.family={cfg.model.family}: DiffusionNFT trains flow-matching models; "
            "use model=tiny_flow (or family sd3 / flux, or model=skeleguide_stage)"
        )
    if algo.sampler not in ("ode", "sde"):
        errors.append(f"algo.sampler={algo.sampler}: use ode or sde")
    if algo.reward_norm not in ("group", "global"):
        errors.append(f"algo.reward_norm={algo.reward_norm}: use group or global")
    if algo.beta <= 0 or algo.timesteps_per_sample < 1:
        errors.append(f"algo.beta={algo.beta} must be > 0 and algo.timesteps_per_sample >= 1")
    if not (0 <= algo.ema_decay_max < 1 and algo.ema_decay_rate >= 0):
        errors.append(f"algo.ema_decay_max={algo.ema_decay_max} must be in [0, 1), algo.ema_decay_rate >= 0")
    return errors


def run(cfg: DictConfig) -> dict:
    """Run a DiffusionNFT job as configured; returns the last epoch's metrics."""
    return run_learner(cfg, train_loop, actors=True)


register(Algorithm("nft", NFTConfig, run, check, rollout_ahead=True, refresh=True))


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def train_loop(config: dict) -> None:
    import ray

    from armature.feedback.refresh import attach_refresh

    w = Worker(config)
    c, algo, rank, world, seed = w.c, w.algo, w.rank, w.world, w.seed
    policy = w.build_policy()
    if not policy.is_flow:
        raise ValueError(f"model.family={c.model.family}: DiffusionNFT needs a flow-matching model")
    policy.sampling.guidance_scale = 1.0  # CFG-free training
    # The sampling ("old") policy: a frozen copy of the network holding the EMA weights.
    old = copy.deepcopy(policy.unet).requires_grad_(False).eval()
    old_state = policy.trainable_state_dict()
    # refresh.* (off by default): the reward fine-tuned on labels of the sampling policy's own pairs
    attach_refresh(w, sampling_weights=lambda: old_state)
    engine = w.start(policy, algo.timesteps_per_sample * algo.gradient_accumulation_batches)
    if w.extra is not None:
        old_state = w.extra
    _load_into(old, old_state)
    prompts = prompt_list(c.prompts)
    scale = policy.scheduler.config.num_train_timesteps  # model timesteps are t * 1000
    window = (0, 0) if algo.sampler == "ode" else None

    def submit(epoch: int, weights, version: int):
        """Epoch ``epoch``'s groups (plan from the seed and epoch), submitted."""
        plan = epoch_plan(prompts, seed, epoch, algo.prompts_per_epoch, algo.group_size, rank, world)
        batch = c.sampling.batch_size
        return plan, submit_rollouts(
            plan, w.samplers, w.rewards, batch, weights, version, rank, world, sde_window=window
        )

    # trainer.rollout_ahead=1: the samplers roll out epoch k+1 (with the sampling policy before
    # epoch k's soft update) while the learner trains on epoch k. NFT needs no correction: its
    # objective uses the clean images and their rewards only, never the sampler's log-probabilities,
    # and its implicit reference (v_old) is the learner's own sampling policy of now.
    rollouts = RolloutAhead(submit, w.trainer.rollout_ahead, algo.num_epochs)
    for epoch in range(w.start_epoch, algo.num_epochs):
        t_epoch = time.perf_counter()
        engine.module.eval()

        # ---- 1. clean images from the sampling policy; rewards overlap the rollouts ---------
        version = epoch + 1
        weights = [ray.put(old_state)]
        (plan, submitted), staleness = rollouts.take(epoch, weights, version)
        sampled = submitted.collect()
        sample_time = time.perf_counter() - t_epoch

        # ---- 2. optimality probabilities within each prompt's group -----------------------
        all_groups, all_rewards = all_gather(plan.groups, sampled.rewards)
        all_r = optimality_probability(all_rewards, all_groups, norm=algo.reward_norm)
        n = len(plan.prompts)
        r = torch.as_tensor(all_r[rank * n : (rank + 1) * n])
        traj = sampled.traj
        x0 = traj.latents[:, -1]

        # ---- 3. the NFT flow-matching objective on the forward process --------------------
        t_train = time.perf_counter()
        engine.module.train()
        stats = {"loss": [], "positive_error": [], "negative_error": [], "policy_shift": []}
        for _ in range(algo.num_inner_epochs):
            for mb in torch.randperm(n).split(algo.train_batch_size):
                cond = {k: v[mb].to(policy.device) for k, v in traj.cond.items()}
                clean, r_mb = x0[mb].to(policy.device), r[mb].to(policy.device)
                for _ in range(algo.timesteps_per_sample):
                    t = torch.rand(len(mb)).clamp(1e-3, 1.0).to(policy.device)
                    noise = torch.randn(clean.shape).to(policy.device)
                    x_t, target = forward_process(clean, noise, t)
                    v_theta = policy.predict(cond, x_t, t * scale)
                    with torch.no_grad(), policy.reference(old):
                        v_old = policy.predict(cond, x_t, t * scale)
                    loss, info = nft_loss(v_theta.float(), v_old.float(), target.float(), r_mb, algo.beta)
                    w.step(loss)
                    stats["loss"].append(loss.item())
                    for key in ("positive_error", "negative_error", "policy_shift"):
                        stats[key].append(info[key].item())
        train_time = time.perf_counter() - t_train

        # ---- 4. the sampling policy follows the trained one (soft update) -----------------
        eta = min(algo.ema_decay_rate * epoch, algo.ema_decay_max)
        old_state = ema_update(old_state, policy.trainable_state_dict(), eta)
        _load_into(old, old_state)
        policy.weights_version = version

        # ---- 5. log and checkpoint ---------------------------------------------------------
        means = all_reduce_mean({k: float(np.mean(v)) for k, v in stats.items()})
        metrics = {
            "epoch": epoch,
            "samples": len(all_rewards),
            "reward_mean": float(np.mean(all_rewards)),
            "reward_std": float(np.std(all_rewards)),
            "optimality_mean": float(np.mean(all_r)),
            **reward_metrics(sampled.components),
            **means,
            "approx_kl": means["policy_shift"],  # for the progress line: how far v_theta is from v_old
            "clipfrac": 0.0,
            "ema_eta": eta,
            **w.optimizer_metrics(),
            "samples_per_s": len(all_rewards) / sample_time,
            **sampled.timings,
            "train_time_s": train_time,
            "staleness": staleness,  # sampling-policy versions between the rollouts and the learner
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        metrics.update(
            idle_shares(sample_time, sampled.timings["sampler_busy_s"], submitted.num_samplers, metrics["epoch_time_s"])
        )
        if w.end_epoch(epoch, metrics, sampled.images, extra_fn=lambda state=old_state: state):
            break  # the over-optimisation guard (guard.*) or trainer.time_budget_s stopped the run

    w.finish(policy)
