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

import numpy as np
import torch
from omegaconf import DictConfig

from armature.jobs.ddpo import component_metrics
from armature.jobs.online import (
    _all_gather,
    _all_reduce_mean,
    _param_grad_norm,
    _prompt_list,
    epoch_plan,
    finish_epoch,
    restore_checkpoint,
    run_online,
    sample_and_score,
    save_final,
)
from armature.losses import group_advantages, grpo_loss
from armature.platform.engine import deepspeed_engine


def run(cfg: DictConfig) -> dict:
    """Run a GRPO job as configured; returns the last epoch's metrics."""
    return run_online(cfg, train_loop)


def sde_window(epoch: int, num_steps: int, algo: dict) -> tuple[int, int]:
    """MixGRPO's sliding window ``[start, start + size)`` of SDE (and trained) steps.

    It starts at the first (noisiest) step and moves ``sde_window_stride`` steps towards the
    clean end every ``sde_window_shift_every`` epochs, wrapping round once it has passed the
    last position. ``sde_window_size`` 0 is the whole trajectory (plain Flow-GRPO).
    """
    size = algo["sde_window_size"] or num_steps
    positions = num_steps - size + 1
    start = (epoch // algo["sde_window_shift_every"]) * algo["sde_window_stride"] % positions
    return start, start + size


def train_loop(config: dict) -> None:
    import ray
    import ray.train

    from armature.platform.tracking import RunLogger
    from armature.policies import build_policy

    c, samplers, rewards = config["cfg"], config["samplers"], config["rewards"]
    algo, trainer_cfg = c["algo"], c["trainer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = trainer_cfg["seed"]
    torch.manual_seed(seed + rank)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])

    policy = build_policy(c["model"], c["sampling"], seed=seed)
    num_steps = algo["train_num_steps"] or c["sampling"]["num_steps"]
    window_size = algo["sde_window_size"] or num_steps
    beta, micro = algo["beta"], algo["train_batch_size"]
    # The KL reference: the network with its adapter off, or a frozen copy of the full network.
    frozen = None
    if beta > 0 and policy.lora is None:
        frozen = copy.deepcopy(policy.unet).requires_grad_(False).eval()
    engine, optimizer, params = deepspeed_engine(
        policy, algo, trainer_cfg, window_size * algo["gradient_accumulation_batches"])
    policy.denoiser = engine  # the learner's forward passes go through DeepSpeed

    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    start_epoch, _, _ = restore_checkpoint(engine, logger)
    prompts = _prompt_list(c["prompts"])
    unlogged: list = []
    for epoch in range(start_epoch, algo["num_epochs"]):
        t_epoch = time.perf_counter()
        engine.module.eval()

        # ---- 1. sample groups with the current weights; rewards overlap the rollouts -------
        version = epoch + 1
        weights = [ray.put(policy.trainable_state_dict())]
        plan = epoch_plan(prompts, seed, epoch, algo["prompts_per_epoch"], algo["group_size"], rank, world)
        window = sde_window(epoch, num_steps, algo)
        traj, local_rewards, components, image_refs, timings = sample_and_score(
            plan, samplers, rewards, c["sampling"]["batch_size"], weights, version, rank, world,
            num_steps=num_steps, sde_window=window)
        sample_time = time.perf_counter() - t_epoch

        # ---- 2. advantages within each prompt's group (all workers) -----------------------
        all_groups, all_rewards = _all_gather(plan.groups, local_rewards)
        all_adv = group_advantages(all_rewards, all_groups, eps=algo["adv_eps"],
                                   scale_by_std=algo["scale_by_group_std"])
        n = len(plan.prompts)
        advantages = torch.as_tensor(all_adv[rank * n : (rank + 1) * n])

        # ---- 3. PPO-clipped GRPO updates on the window's steps ----------------------------
        t_train = time.perf_counter()
        engine.module.train()
        stats = {"loss": [], "policy_loss": [], "kl": [], "approx_kl": [], "clipfrac": []}
        grad_norms = []
        for _ in range(algo["num_inner_epochs"]):
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
                        log_prob, batch.log_probs[:, j].to(log_prob.device), adv.to(log_prob.device),
                        algo["clip_range"], algo["adv_clip_max"], ref_log_prob, beta)
                    engine.backward(loss)
                    boundary = engine.is_gradient_accumulation_boundary()
                    norm = _param_grad_norm(params) if boundary else None
                    engine.step()
                    if boundary:
                        grad_norms.append(engine.get_global_grad_norm() or norm)
                    stats["loss"].append(loss.item())
                    for key in ("policy_loss", "kl", "approx_kl", "clipfrac"):
                        stats[key].append(info[key].item())
        train_time = time.perf_counter() - t_train
        policy.weights_version = version

        # ---- 4. log and checkpoint ---------------------------------------------------------
        means = _all_reduce_mean({k: float(np.mean(v)) for k, v in stats.items()})
        group_std = np.mean([np.std(all_rewards[np.asarray(all_groups) == g]) for g in dict.fromkeys(all_groups)])
        metrics = {
            "epoch": epoch,
            "samples": len(all_rewards),
            "reward_mean": float(np.mean(all_rewards)),
            "reward_std": float(np.std(all_rewards)),
            "reward_group_std": float(group_std),
            **component_metrics(components),
            **means,
            "grad_norm": float(np.nanmean(grad_norms)) if grad_norms else float("nan"),
            "learning_rate": optimizer.param_groups[0]["lr"],
            "sde_window_start": window[0],
            "samples_per_s": len(all_rewards) / sample_time,
            **timings,
            "train_time_s": train_time,
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        unlogged = finish_epoch(engine, logger, c, epoch, metrics, unlogged, rank, image_refs)

    save_final(policy, logger, c)
