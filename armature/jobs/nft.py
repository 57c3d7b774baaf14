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
from armature.losses import ema_update, forward_process, nft_loss, optimality_probability
from armature.platform.engine import deepspeed_engine


def run(cfg: DictConfig) -> dict:
    """Run a DiffusionNFT job as configured; returns the last epoch's metrics."""
    return run_online(cfg, train_loop)


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


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
    if not policy.is_flow:
        raise ValueError(f"model.family={c['model']['family']}: DiffusionNFT needs a flow-matching model")
    policy.sampling.guidance_scale = 1.0  # CFG-free training
    # The sampling ("old") policy: a frozen copy of the network holding the EMA weights.
    old = copy.deepcopy(policy.unet).requires_grad_(False).eval()
    old_state = policy.trainable_state_dict()
    engine, optimizer, params = deepspeed_engine(
        policy, algo, trainer_cfg, algo["timesteps_per_sample"] * algo["gradient_accumulation_batches"])
    policy.denoiser = engine

    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    start_epoch, _, extra = restore_checkpoint(engine, logger)
    if extra is not None:
        old_state = extra
    _load_into(old, old_state)
    prompts = _prompt_list(c["prompts"])
    scale = policy.scheduler.config.num_train_timesteps  # model timesteps are t * 1000
    unlogged: list = []
    for epoch in range(start_epoch, algo["num_epochs"]):
        t_epoch = time.perf_counter()
        engine.module.eval()

        # ---- 1. clean images from the sampling policy; rewards overlap the rollouts ---------
        version = epoch + 1
        weights = [ray.put(old_state)]
        plan = epoch_plan(prompts, seed, epoch, algo["prompts_per_epoch"], algo["group_size"], rank, world)
        window = (0, 0) if algo["sampler"] == "ode" else None
        traj, local_rewards, components, image_refs, timings = sample_and_score(
            plan, samplers, rewards, c["sampling"]["batch_size"], weights, version, rank, world, sde_window=window)
        sample_time = time.perf_counter() - t_epoch

        # ---- 2. optimality probabilities within each prompt's group -----------------------
        all_groups, all_rewards = _all_gather(plan.groups, local_rewards)
        all_r = optimality_probability(all_rewards, all_groups, norm=algo["reward_norm"])
        n = len(plan.prompts)
        r = torch.as_tensor(all_r[rank * n : (rank + 1) * n])
        x0 = traj.latents[:, -1]

        # ---- 3. the NFT flow-matching objective on the forward process --------------------
        t_train = time.perf_counter()
        engine.module.train()
        stats = {"loss": [], "positive_error": [], "negative_error": [], "policy_shift": []}
        grad_norms = []
        for _ in range(algo["num_inner_epochs"]):
            for mb in torch.randperm(n).split(algo["train_batch_size"]):
                cond = {k: v[mb].to(policy.device) for k, v in traj.cond.items()}
                clean, r_mb = x0[mb].to(policy.device), r[mb].to(policy.device)
                for _ in range(algo["timesteps_per_sample"]):
                    t = torch.rand(len(mb)).clamp(1e-3, 1.0).to(policy.device)
                    noise = torch.randn(clean.shape).to(policy.device)
                    x_t, target = forward_process(clean, noise, t)
                    v_theta = policy.predict(cond, x_t, t * scale)
                    with torch.no_grad(), policy.reference(old):
                        v_old = policy.predict(cond, x_t, t * scale)
                    loss, info = nft_loss(v_theta.float(), v_old.float(), target.float(), r_mb, algo["beta"])
                    engine.backward(loss)
                    boundary = engine.is_gradient_accumulation_boundary()
                    norm = _param_grad_norm(params) if boundary else None
                    engine.step()
                    if boundary:
                        grad_norms.append(engine.get_global_grad_norm() or norm)
                    stats["loss"].append(loss.item())
                    for key in ("positive_error", "negative_error", "policy_shift"):
                        stats[key].append(info[key].item())
        train_time = time.perf_counter() - t_train

        # ---- 4. the sampling policy follows the trained one (soft update) -----------------
        eta = min(algo["ema_decay_rate"] * epoch, algo["ema_decay_max"])
        old_state = ema_update(old_state, policy.trainable_state_dict(), eta)
        _load_into(old, old_state)
        policy.weights_version = version

        # ---- 5. log and checkpoint ---------------------------------------------------------
        means = _all_reduce_mean({k: float(np.mean(v)) for k, v in stats.items()})
        metrics = {
            "epoch": epoch,
            "samples": len(all_rewards),
            "reward_mean": float(np.mean(all_rewards)),
            "reward_std": float(np.std(all_rewards)),
            "optimality_mean": float(np.mean(all_r)),
            **component_metrics(components),
            **means,
            "approx_kl": means["policy_shift"],  # for the progress line: how far v_theta is from v_old
            "clipfrac": 0.0,
            "ema_eta": eta,
            "grad_norm": float(np.nanmean(grad_norms)) if grad_norms else float("nan"),
            "learning_rate": optimizer.param_groups[0]["lr"],
            "samples_per_s": len(all_rewards) / sample_time,
            **timings,
            "train_time_s": train_time,
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        unlogged = finish_epoch(engine, logger, c, epoch, metrics, unlogged, rank, image_refs,
                                extra_fn=lambda: old_state)

    save_final(policy, logger, c)
