"""GRPO for diffusion and flow policies (Flow-GRPO, arXiv 2505.05470; MixGRPO's window), on Ray.

``algo=grpo`` runs on any policy: the tiny DDIM UNet (``model=tiny``), the tiny flow model
(``model=tiny_flow``), SD 1.5 / SDXL / SD 3.x / FLUX. The policy decides how a step is sampled
and scored (DDIM with eta, or Flow-GRPO's SDE with ``sampling.noise_level``); this file never
asks which.

Read top to bottom (``train_loop``, on each Ray Train worker), per epoch:
  1. ``epoch_plan``: ``prompts_per_epoch`` prompt slots drawn from the seed and epoch only, each
     sampled ``group_size`` times with its own seed (a run does not depend on the number of
     workers or actors). The samplers roll out with ``train_num_steps`` steps (Flow-GRPO's
     denoising reduction: fewer steps in training than ``sampling.num_steps`` uses at
     evaluation and serving); with ``sde_window_size`` > 0 only the steps of MixGRPO's sliding
     window are stochastic (the rest are ODE steps) and only they are trained. Rewards are
     scored as each batch finishes, overlapping the remaining rollouts.
  2. Advantages normalised within each prompt slot's group (``armature.losses.group_advantages``).
  3. PPO-clipped updates on every window step (``armature.losses.grpo_loss``), with the KL
     penalty ``beta`` to the frozen reference (the base network: LoRA switched off, or a
     frozen copy when fully fine-tuning).
  4. Log to MLflow (rank 0), checkpoint through Ray Train; a rerun resumes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from armature.losses import group_advantages, grpo_loss
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
class GRPOConfig(OptimizerConfig):
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
    clip_range: float = 0.05
    adv_clip_max: float = 5.0
    adv_eps: float = 1e-4
    scale_by_group_std: bool = True  # False: only centre within the group
    beta: float = 0.0  # KL penalty to the frozen reference policy


def check(cfg: DictConfig) -> list[str]:
    """The groups, the training rollout's steps and MixGRPO's window; SDE steps on flow models."""
    algo, errors = cfg.algo, group_errors(cfg)
    steps = algo.train_num_steps or cfg.sampling.num_steps
    if algo.train_num_steps is not None and algo.train_num_steps < 1:
        errors.append(f"algo.train_num_steps={algo.train_num_steps}: must be >= 1 (or null: sampling.num_steps)")
    if not 0 <= algo.sde_window_size <= steps:
        errors.append(
            f"algo.sde_window_size={algo.sde_window_size}: must be in [0, {steps}] "
            "(0: every step; at most the training rollout's steps)"
        )
    if algo.sde_window_stride < 0 or algo.sde_window_shift_every < 1:
        errors.append("algo.sde_window_stride must be >= 0 and algo.sde_window_shift_every >= 1")
    if algo.beta < 0 or algo.clip_range < 0:
        errors.append(f"algo.beta={algo.beta} and algo.clip_range={algo.clip_range} must be >= 0")
    if cfg.model.family in FLOW_MODEL_FAMILIES and cfg.sampling.noise_level <= 0:
        errors.append(f"sampling.noise_level={cfg.sampling.noise_level}: GRPO needs SDE steps, set it > 0")
    return errors


def run(cfg: DictConfig) -> dict:
    """Run a GRPO job as configured; returns the last epoch's metrics."""
    return run_learner(cfg, train_loop, actors=True)


register(Algorithm("grpo", GRPOConfig, run, check, rollout_ahead=True, refresh=True))


def sde_window(epoch: int, num_steps: int, algo: GRPOConfig) -> tuple[int, int]:
    """MixGRPO's sliding window ``[start, start + size)`` of SDE (and trained) steps.

    It starts at the first (noisiest) step and moves ``sde_window_stride`` steps towards the
    clean end every ``sde_window_shift_every`` epochs, wrapping round once it has passed the
    last position. ``sde_window_size`` 0 is the whole trajectory (plain Flow-GRPO).
    """
    size = algo.sde_window_size or num_steps
    positions = num_steps - size + 1
    start = (epoch // algo.sde_window_shift_every) * algo.sde_window_stride % positions
    return start, start + size


def train_loop(config: dict) -> None:
    import ray

    from armature.feedback.refresh import attach_refresh

    w = Worker(config)
    c, algo, rank, world, seed = w.c, w.algo, w.rank, w.world, w.seed
    policy = w.build_policy()
    num_steps = algo.train_num_steps or c.sampling.num_steps
    window_size = algo.sde_window_size or num_steps
    beta, micro = algo.beta, algo.train_batch_size
    # The KL reference: the network with its adapter off, or a frozen copy of the full network.
    frozen = None
    if beta > 0 and policy.lora is None:
        frozen = copy.deepcopy(policy.unet).requires_grad_(False).eval()
    attach_refresh(w)  # refresh.* (off by default): the reward fine-tuned on the policy's own samples
    engine = w.start(policy, window_size * algo.gradient_accumulation_batches)

    prompts = prompt_list(c.prompts)

    def submit(epoch: int, weights, version: int):
        """Epoch ``epoch``'s groups (plan and SDE window from the seed and epoch), submitted."""
        plan = epoch_plan(prompts, seed, epoch, algo.prompts_per_epoch, algo.group_size, rank, world)
        window = sde_window(epoch, num_steps, algo)
        return plan, submit_rollouts(
            plan,
            w.samplers,
            w.rewards,
            c.sampling.batch_size,
            weights,
            version,
            rank,
            world,
            num_steps=num_steps,
            sde_window=window,
        )

    # trainer.rollout_ahead=1: the samplers roll out epoch k+1 while the learner trains on epoch k
    rollouts = RolloutAhead(submit, w.trainer.rollout_ahead, algo.num_epochs)
    for epoch in range(w.start_epoch, algo.num_epochs):
        t_epoch = time.perf_counter()
        engine.module.eval()

        # ---- 1. sample groups with the current weights; rewards overlap the rollouts -------
        version = epoch + 1
        weights = [ray.put(policy.trainable_state_dict())]
        (plan, submitted), staleness = rollouts.take(epoch, weights, version)
        window = sde_window(epoch, num_steps, algo)
        sampled = submitted.collect()
        traj = sampled.traj
        sample_time = time.perf_counter() - t_epoch

        # ---- 2. advantages within each prompt's group (all workers) -----------------------
        all_groups, all_rewards = all_gather(plan.groups, sampled.rewards)
        all_adv = group_advantages(all_rewards, all_groups, eps=algo.adv_eps, scale_by_std=algo.scale_by_group_std)
        n = len(plan.prompts)
        advantages = torch.as_tensor(all_adv[rank * n : (rank + 1) * n])

        # ---- 3. PPO-clipped GRPO updates on the window's steps ----------------------------
        t_train = time.perf_counter()
        engine.module.train()
        stats = {"loss": [], "policy_loss": [], "kl": [], "approx_kl": [], "clipfrac": []}
        for _ in range(algo.num_inner_epochs):
            for mb in torch.randperm(n).split(micro):
                batch, adv = traj.select(mb), advantages[mb]
                for j in (window[0] + torch.randperm(window_size)).tolist():
                    args = (batch.cond, batch.latents[:, j], batch.timesteps[:, j], batch.latents[:, j + 1])
                    log_prob = policy.step_log_prob(*args, num_steps=num_steps)
                    ref_log_prob = None
                    if beta > 0:
                        with torch.no_grad(), policy.reference(frozen):
                            ref_log_prob = policy.step_log_prob(*args, num_steps=num_steps)
                    loss, info = grpo_loss(
                        log_prob,
                        batch.log_probs[:, j].to(log_prob.device),
                        adv.to(log_prob.device),
                        algo.clip_range,
                        algo.adv_clip_max,
                        ref_log_prob,
                        beta,
                    )
                    w.step(loss)
                    stats["loss"].append(loss.item())
                    for key in ("policy_loss", "kl", "approx_kl", "clipfrac"):
                        stats[key].append(info[key].item())
        train_time = time.perf_counter() - t_train
        policy.weights_version = version

        # ---- 4. log and checkpoint ---------------------------------------------------------
        group_std = np.mean([np.std(all_rewards[np.asarray(all_groups) == g]) for g in dict.fromkeys(all_groups)])
        metrics = {
            "epoch": epoch,
            "samples": len(all_rewards),
            "reward_mean": float(np.mean(all_rewards)),
            "reward_std": float(np.std(all_rewards)),
            "reward_group_std": float(group_std),
            **reward_metrics(sampled.components),
            **all_reduce_mean({k: float(np.mean(v)) for k, v in stats.items()}),
            **w.optimizer_metrics(),
            "sde_window_start": window[0],
            "samples_per_s": len(all_rewards) / sample_time,
            **sampled.timings,
            "train_time_s": train_time,
            "staleness": staleness,  # weight versions between the rollouts and the learner
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        metrics.update(
            idle_shares(sample_time, sampled.timings["sampler_busy_s"], submitted.num_samplers, metrics["epoch_time_s"])
        )
        if w.end_epoch(epoch, metrics, sampled.images):
            break  # the over-optimisation guard (guard.*) or trainer.time_budget_s stopped the run

    w.finish(policy)
