"""DDPO (Black et al., 2023): online RL fine-tuning of a diffusion policy, on Ray.

Read top to bottom:

* ``run`` (the driver) connects to Ray, opens the MLflow run, starts the sampler and reward
  actors and hands a ``TorchTrainer`` the learner loop.
* ``train_loop`` (each Ray Train worker) builds the policy, wraps its trainable weights with
  DeepSpeed, restores the last checkpoint if there is one, then per epoch:
  1. sends the current weights (one object-store put) and its share of prompts to the
     samplers; each finished batch of images goes straight on to a reward actor;
  2. gathers every worker's rewards and turns them into advantages (per-prompt statistics,
     global fallback);
  3. runs PPO-clipped updates over the stored denoising steps, accumulating gradients across
     steps and micro-batches, for ``num_inner_epochs`` passes;
  4. logs the epoch to MLflow (rank 0) and reports a checkpoint to Ray Train.

After the last epoch (``algo.final_eval_per_prompt`` > 0) every prompt is sampled with fixed
seeds twice, with the weights before training and after, the same noise for both, and every
reward component scores both sets (``final_before_*`` / ``final_after_*``): a paired comparison
that does not hang on which prompts an epoch happened to draw.

A rerun with the same ``tracking.run_name`` resumes from the last checkpoint and keeps
logging into the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from armature.losses import PerPromptStatTracker, ddpo_loss, normalize_rewards
from armature.platform.checkpoints import commit_epoch, restore_checkpoint
from armature.platform.engine import all_reduce_mean as _all_reduce_mean
from armature.platform.engine import deepspeed_engine, grad_norm

log = logging.getLogger("armature.ddpo")



# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Run a DDPO job as configured; returns the last epoch's metrics."""
    import ray
    from ray.train.torch import TorchTrainer

    from armature.actors import start_reward_actors, start_samplers
    from armature.platform.launch import fit, open_run, trainer_kwargs

    trainer_cfg, cluster, reward = cfg.trainer, cfg.cluster, cfg.reward
    required = (trainer_cfg.num_workers * trainer_cfg.cpus_per_worker
                + cluster.num_samplers * cluster.sampler_num_cpus + reward.num_actors * reward.num_cpus)
    job = open_run(cfg, required)
    c, threads = job.cfg, job.threads

    samplers = start_samplers(
        cluster.num_samplers, c["model"], c["sampling"], seed=trainer_cfg.seed,
        num_cpus=cluster.sampler_num_cpus, num_gpus=cluster.sampler_num_gpus,
        max_restarts=cluster.max_restarts, threads=threads,
        resources=c["cluster"]["sampler_resources"], scheduling=cluster.actor_scheduling,
    )
    rewards = start_reward_actors(
        reward.num_actors, c["reward"]["components"], num_cpus=reward.num_cpus, num_gpus=reward.num_gpus,
        max_restarts=cluster.max_restarts, resources=c["reward"]["resources"], scheduling=cluster.actor_scheduling,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": c, "samplers": samplers, "rewards": rewards,
                           "run_id": job.run_id, "tracking_uri": job.tracking_uri, "threads": threads},
        **trainer_kwargs(job),
    )
    try:
        return fit(trainer, job)
    finally:
        for actor in samplers + rewards:
            ray.kill(actor)


# ============================================================================ learner
def train_loop(config: dict) -> None:
    import ray.train

    from armature.platform.tracking import RunLogger
    from armature.policies import Trajectory, build_policy

    c, samplers, rewards = config["cfg"], config["samplers"], config["rewards"]
    algo, trainer_cfg = c["algo"], c["trainer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(trainer_cfg["seed"] + rank)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])

    policy = build_policy(c["model"], c["sampling"], seed=trainer_cfg["seed"])
    before = ({k: v.detach().clone() for k, v in policy.trainable_state_dict().items()}  # the final evaluation's
              if algo["final_eval_per_prompt"] else None)
    num_steps = c["sampling"]["num_steps"]
    train_steps = max(1, int(num_steps * algo["timestep_fraction"]))
    per_worker = algo["samples_per_epoch"] // world
    micro = algo["train_batch_size"]

    # gradients accumulate over every stored step of a micro-batch, and over micro-batches
    accumulation = train_steps * algo["gradient_accumulation_batches"]
    engine, optimizer, params = deepspeed_engine(policy, algo, trainer_cfg, accumulation)
    policy.denoiser = engine  # the learner's forward passes go through DeepSpeed

    tracker = PerPromptStatTracker(algo["stat_buffer_size"], algo["stat_min_count"])
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    start_epoch, state, _ = restore_checkpoint(engine, logger)
    if state:
        tracker.load_state_dict(state["tracker"])

    prompts = _prompt_list(c["prompts"])
    unlogged: list[tuple[int, dict]] = []  # epochs whose metrics wait for a checkpoint
    for epoch in range(start_epoch, algo["num_epochs"]):
        t_epoch = time.perf_counter()
        engine.module.eval()

        # ---- 1. sample with the current weights, score as batches finish ----------------
        version = epoch + 1  # weights after `epoch` updates
        weights = [ray.put(policy.trainable_state_dict())]
        rng = np.random.default_rng([trainer_cfg["seed"], epoch, rank])
        epoch_prompts = [prompts[i] for i in rng.integers(len(prompts), size=per_worker)]
        batch_size = c["sampling"]["batch_size"]
        traj_refs, score_refs = [], []
        for b, start in enumerate(range(0, per_worker, batch_size)):
            batch_prompts = epoch_prompts[start : start + batch_size]
            sampler = samplers[(rank + b * world) % len(samplers)]
            seed = int(rng.integers(2**31))
            traj_ref, images_ref = sampler.rollout.remote(batch_prompts, seed, weights, version)
            scorer = rewards[(rank + b * world) % len(rewards)]
            traj_refs.append(traj_ref)
            score_refs.append((scorer.score.remote(images_ref, batch_prompts), images_ref))
        traj = Trajectory.concat(ray.get(traj_refs))
        scores = [ray.get(ref) for ref, _ in score_refs]
        rewards_local = np.concatenate([s["reward"] for s in scores]).astype(np.float32)
        components = {k: np.concatenate([s[k] for s in scores]) for k in scores[0] if k != "reward"}
        sample_time = time.perf_counter() - t_epoch

        # ---- 2. advantages over the whole epoch (all workers) ------------------------------
        all_prompts, all_rewards = _all_gather(traj.prompts, rewards_local)
        if algo["per_prompt_stat_tracking"]:
            all_adv = tracker.update(all_prompts, all_rewards)
        else:
            all_adv = normalize_rewards(all_rewards)
        advantages = torch.as_tensor(all_adv[rank * per_worker : (rank + 1) * per_worker])

        # ---- 3. PPO updates over the stored steps -----------------------------------------
        t_train = time.perf_counter()
        engine.module.train()
        stats = {"loss": [], "approx_kl": [], "clipfrac": []}
        grad_norms = []
        for _ in range(algo["num_inner_epochs"]):
            order = torch.randperm(per_worker)
            step_order = torch.stack([torch.randperm(num_steps) for _ in range(per_worker)])
            for mb in order.split(micro):
                batch, adv = traj.select(mb), advantages[mb]
                rows = torch.arange(len(mb))
                for k in range(train_steps):
                    j = step_order[mb, k]  # each trajectory trains on its own random steps
                    log_prob = policy.step_log_prob(
                        batch.cond, batch.latents[rows, j], batch.timesteps[rows, j],
                        batch.latents[rows, j + 1],
                    )
                    loss, info = ddpo_loss(
                        log_prob, batch.log_probs[rows, j].to(log_prob.device), adv.to(log_prob.device),
                        algo["clip_range"], algo["adv_clip_max"],
                    )
                    engine.backward(loss)
                    boundary = engine.is_gradient_accumulation_boundary()
                    norm = grad_norm(params) if boundary else None
                    engine.step()  # DeepSpeed only steps the optimizer at a boundary
                    if boundary:  # ZeRO-2 keeps gradients in its partitions: ask the engine
                        grad_norms.append(engine.get_global_grad_norm() or norm)
                    stats["loss"].append(loss.item())
                    stats["approx_kl"].append(info["approx_kl"].item())
                    stats["clipfrac"].append(info["clipfrac"].item())
        train_time = time.perf_counter() - t_train
        policy.weights_version = version

        # ---- 4. log and checkpoint -------------------------------------------------------
        means = _all_reduce_mean({k: float(np.mean(v)) for k, v in stats.items()})
        metrics = {
            "epoch": epoch,
            "samples": len(all_rewards),  # every rollout of the epoch, none lost
            "reward_mean": float(np.mean(all_rewards)),
            "reward_std": float(np.std(all_rewards)),
            **component_metrics(components),
            **means,
            "grad_norm": float(np.nanmean(grad_norms)) if grad_norms else float("nan"),
            "learning_rate": optimizer.param_groups[0]["lr"],
            "samples_per_s": algo["samples_per_epoch"] / sample_time,
            "train_transitions_per_s": algo["num_inner_epochs"] * per_worker * train_steps * world / train_time,
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        if logger is not None:
            every = c["tracking"]["log_images_every"]
            if every and epoch % every == 0:
                images = np.concatenate([ray.get(ref) for _, ref in score_refs])
                logger.log_images(images[: c["tracking"]["images_per_grid"]], f"samples/epoch_{epoch:04d}.png")
            _print_progress(epoch, algo["num_epochs"], metrics)
        last = epoch + 1 == algo["num_epochs"]
        # Metrics reach MLflow only once their checkpoint is registered: an epoch that a
        # restart trains again is never logged twice (a restore logs what is missing).
        checkpoint = last or (epoch + 1) % trainer_cfg["checkpoint_every"] == 0
        unlogged = commit_epoch(engine, logger, epoch, metrics, unlogged, rank, checkpoint,
                                state={"tracker": tracker.state_dict()})

    if logger is not None and algo["final_eval_per_prompt"]:
        final = _before_and_after(prompts, samplers, rewards, c, before, policy.trainable_state_dict())
        logger.log_metrics(final, step=algo["num_epochs"])
        _print_before_and_after(final, len(prompts), algo["final_eval_per_prompt"])
    if logger is not None:
        with tempfile.TemporaryDirectory() as tmp:
            policy.save_trainable(Path(tmp) / "adapter", metadata={"model": c["model"], "sampling": c["sampling"]})
            logger.log_artifacts(Path(tmp) / "adapter", "adapter")
            logger.log_text(json.dumps(c, indent=2, default=str), "config.json")


# ============================================================================ helpers
def fixed_seed_plan(prompts: list[str], per_prompt: int, seed: int) -> tuple[list[str], list[int]]:
    """Every prompt ``per_prompt`` times, each sample with its own seed from (seed, prompt
    index, repeat): the same samples whichever run, actor or batch draws them."""
    plan, seeds = [], []
    for i, prompt in enumerate(prompts):
        for j in range(per_prompt):
            plan.append(prompt)
            seeds.append(int(np.random.SeedSequence([seed, 7_333, i, j]).generate_state(1)[0] >> 1))
    return plan, seeds


def _before_and_after(prompts, samplers, rewards, c: dict, before: dict, after: dict) -> dict:
    """The fixed-seed plan sampled with the weights ``before`` and ``after`` training, scored by
    every reward component: ``final_{before,after}_reward_mean`` and each component's metrics."""
    import ray

    plan, seeds = fixed_seed_plan(prompts, c["algo"]["final_eval_per_prompt"], c["trainer"]["seed"])
    size = c["sampling"]["batch_size"]
    metrics = {"final_samples": len(plan)}
    # versions no epoch uses, so that every sampler loads these weights
    for name, state, version in (("before", before, -1), ("after", after, c["algo"]["num_epochs"] + 1)):
        weights = [ray.put(state)]
        scores = []
        for b, start in enumerate(range(0, len(plan), size)):
            _, images = samplers[b % len(samplers)].rollout.remote(plan[start:start + size], seeds[start:start + size],
                                                                   weights, version)
            scores.append(rewards[b % len(rewards)].score.remote(images, plan[start:start + size]))
        scores = ray.get(scores)
        reward = np.concatenate([s["reward"] for s in scores])
        components = {k: np.concatenate([s[k] for s in scores]) for k in scores[0] if k != "reward"}
        metrics[f"final_{name}_reward_mean"] = float(np.mean(reward))
        metrics.update({f"final_{name}_{k}": v for k, v in component_metrics(components).items()})
    return metrics


def _print_before_and_after(m: dict, n_prompts: int, per_prompt: int) -> None:
    line = (f"[armature] fixed seeds ({n_prompts} prompts x {per_prompt}), before -> after training: "
            f"reward {m['final_before_reward_mean']:+.4f} -> {m['final_after_reward_mean']:+.4f}")
    if "final_before_reward_gym_oracle_severe_rate" in m:
        line += (f"; oracle severe-error rate {m['final_before_reward_gym_oracle_severe_rate']:.3f} -> "
                 f"{m['final_after_reward_gym_oracle_severe_rate']:.3f}, mean severity "
                 f"{-m['final_before_reward_gym_oracle_mean']:.2f} -> {-m['final_after_reward_gym_oracle_mean']:.2f}")
    print(line, flush=True)


def _prompt_list(prompt_cfg: dict) -> list[str]:
    if prompt_cfg.get("file"):
        lines = Path(prompt_cfg["file"]).read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = list(prompt_cfg["prompts"])
    if not prompts:
        raise ValueError("prompts: no prompts given (prompts.prompts or prompts.file)")
    return prompts


def _all_gather(prompts: list[str], rewards: np.ndarray) -> tuple[list[str], np.ndarray]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(prompts), rewards
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (list(prompts), rewards))
    return [p for ps, _ in gathered for p in ps], np.concatenate([r for _, r in gathered])


def component_metrics(components: dict[str, np.ndarray]) -> dict[str, float]:
    """Each reward component's mean over the epoch's rollouts (``reward_<name>_mean``) and, for
    the gym oracle (a weight-0 monitor in ``reward=gym_anatomy``), the share of rollouts with a
    severe anatomical error (``reward_gym_oracle_severe_rate``)."""
    from armature.rewards.gym_oracle import SEVERE_SCORE

    metrics = {f"reward_{k}_mean": float(np.mean(v)) for k, v in components.items()}
    if "gym_oracle" in components:
        metrics["reward_gym_oracle_severe_rate"] = float(np.mean(np.asarray(components["gym_oracle"]) <= SEVERE_SCORE))
    return metrics


def _print_progress(epoch: int, total: int, m: dict) -> None:
    done = epoch + 1
    bar = "#" * int(20 * done / total) + "-" * (20 - int(20 * done / total))
    print(
        f"[armature] [{bar}] epoch {done}/{total}  reward {m['reward_mean']:+.4f} ± {m['reward_std']:.4f}"
        + (f"  oracle severe-error rate {m['reward_gym_oracle_severe_rate']:.3f}"
           f" (mean severity {-m['reward_gym_oracle_mean']:.2f})" if "reward_gym_oracle_severe_rate" in m else "")
        + f"  kl {m['approx_kl']:.2e}  clip {m['clipfrac']:.2f}  {m['epoch_time_s']:.1f}s",
        flush=True,
    )
