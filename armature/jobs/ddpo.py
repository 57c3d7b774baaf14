"""DDPO (Black et al., 2023): online RL fine-tuning of a diffusion policy, on Ray.

Read top to bottom:

* ``run``: the learner core's driver (``armature.platform.learner.run_learner``) with sampler
  and reward actors.
* ``train_loop`` (each Ray Train worker): a ``Worker`` builds the policy, wraps its trainable
  weights with DeepSpeed and restores the last checkpoint if there is one; then per epoch:
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

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from armature.losses import PerPromptStatTracker, ddpo_loss, decoupled_ppo_loss, k3_kl, normalize_rewards
from armature.platform.algorithms import Algorithm, register
from armature.platform.config import OptimizerConfig, TrainConfig
from armature.platform.engine import all_reduce_mean
from armature.platform.learner import (
    RolloutAhead,
    Worker,
    all_gather,
    idle_shares,
    micro_batch_errors,
    print_progress,
    prompt_list,
    reward_metrics,
    reward_summary_line,
    run_learner,
    score_batches,
)


# ============================================================================ config
@dataclass
class DDPOConfig(OptimizerConfig):
    name: str = "ddpo"
    num_epochs: int = 10
    samples_per_epoch: int = 32  # over all workers
    train_batch_size: int = 8  # trajectories per micro-batch on one worker
    gradient_accumulation_batches: int = 1  # micro-batches per optimizer step (times the steps)
    num_inner_epochs: int = 1
    timestep_fraction: float = 1.0  # share of each trajectory's steps trained on
    learning_rate: float = 3e-4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    per_prompt_stat_tracking: bool = True
    stat_buffer_size: int = 32
    stat_min_count: int = 16
    # trainer.rollout_ahead=1 trains on samples one weight version old: "ppo" clips the ratio to the
    # sampling policy's log-probs (recorded at rollout); "decoupled" (AReaL) clips it to the weights
    # before this epoch's update (recomputed, one more forward pass a step) and weights each sample
    # by min(p_prox / p_sampling, behaviour_weight_cap)
    stale_correction: str = "ppo"
    behaviour_weight_cap: float = 5.0
    # KL penalty to the base policy (the adapter switched off, or a frozen copy of the network):
    # loss + beta * k3 estimate on each trained step, one more forward pass a step (0: off)
    beta: float = 0.0
    # after training: every prompt x this many fixed seeds, sampled with the weights before and
    # after training (the same noise), scored by every reward component (0: off)
    final_eval_per_prompt: int = 0


def check(cfg: DictConfig) -> list[str]:
    """Samples that divide evenly over workers and micro-batches; the evaluation's seeds."""
    algo, workers, errors = cfg.algo, cfg.trainer.num_workers, []
    per_worker = algo.samples_per_epoch // workers
    if algo.samples_per_epoch % workers:
        errors.append(
            f"algo.samples_per_epoch={algo.samples_per_epoch} must divide evenly over trainer.num_workers={workers}"
        )
    else:
        errors.extend(micro_batch_errors(algo, per_worker, "algo.samples_per_epoch / trainer.num_workers"))
    if not 0 < algo.timestep_fraction <= 1:
        errors.append(f"algo.timestep_fraction={algo.timestep_fraction}: must be in (0, 1]")
    if algo.stale_correction not in ("ppo", "decoupled"):
        errors.append(
            f"algo.stale_correction={algo.stale_correction}: use ppo (clip to the sampling policy) or "
            "decoupled (clip to the weights before the update, weight by the behaviour ratio)"
        )
    if algo.behaviour_weight_cap <= 0:
        errors.append(f"algo.behaviour_weight_cap={algo.behaviour_weight_cap}: must be > 0, e.g. 5")
    if algo.final_eval_per_prompt < 0:
        errors.append(
            f"algo.final_eval_per_prompt={algo.final_eval_per_prompt}: seeds per prompt of the "
            "evaluation after training; use 0 to skip it, e.g. 16"
        )
    if algo.beta < 0:
        errors.append(f"algo.beta={algo.beta}: the KL penalty's weight must be >= 0 (0: off), e.g. 0.01")
    return errors


def run(cfg: DictConfig) -> dict:
    """Run a DDPO job as configured; returns the last epoch's metrics."""
    return run_learner(cfg, train_loop, actors=True)


register(Algorithm("ddpo", DDPOConfig, run, check, rollout_ahead=True, refresh=True))


def train_loop(config: dict) -> None:
    import ray

    from armature.feedback.refresh import attach_refresh
    from armature.policies import Trajectory

    w = Worker(config)
    c, algo, rank, world = w.c, w.algo, w.rank, w.world
    policy = w.build_policy()
    before = (
        {k: v.detach().clone() for k, v in policy.trainable_state_dict().items()}  # the final evaluation's
        if algo.final_eval_per_prompt
        else None
    )
    num_steps = c.sampling.num_steps
    train_steps = max(1, int(num_steps * algo.timestep_fraction))
    per_worker = algo.samples_per_epoch // world
    micro = algo.train_batch_size

    # The KL reference (algo.beta > 0): the network with its adapter off, or a frozen full copy.
    frozen = None
    if algo.beta > 0 and policy.lora is None:
        frozen = copy.deepcopy(policy.unet).requires_grad_(False).eval()
    attach_refresh(w)  # refresh.* (off by default): the reward fine-tuned on the policy's own samples
    # gradients accumulate over every stored step of a micro-batch, and over micro-batches
    engine = w.start(policy, train_steps * algo.gradient_accumulation_batches)
    tracker = PerPromptStatTracker(algo.stat_buffer_size, algo.stat_min_count)
    if w.state:
        tracker.load_state_dict(w.state["tracker"])

    prompts = prompt_list(c.prompts)
    batch_size = c.sampling.batch_size

    def submit(epoch: int, weights, version: int) -> tuple[list, list, list]:
        """Epoch ``epoch``'s rollouts and scores, submitted: prompts and seeds from (seed, epoch, rank)."""
        rng = np.random.default_rng([w.seed, epoch, rank])
        epoch_prompts = [prompts[i] for i in rng.integers(len(prompts), size=per_worker)]
        traj_refs, score_refs, image_refs = [], [], []
        for b, start in enumerate(range(0, per_worker, batch_size)):
            batch_prompts = epoch_prompts[start : start + batch_size]
            sampler = w.samplers[(rank + b * world) % len(w.samplers)]
            seed = int(rng.integers(2**31))
            traj_ref, images_ref = sampler.rollout.remote(batch_prompts, seed, weights, version)
            scorer = w.rewards[(rank + b * world) % len(w.rewards)]
            traj_refs.append(traj_ref)
            image_refs.append(images_ref)
            score_refs.append(scorer.score.remote(images_ref, batch_prompts))
        return traj_refs, score_refs, image_refs

    # trainer.rollout_ahead=1: the samplers roll out epoch k+1 while the learner trains on epoch k
    rollouts = RolloutAhead(submit, w.trainer.rollout_ahead, algo.num_epochs)
    for epoch in range(w.start_epoch, algo.num_epochs):
        t_epoch = time.perf_counter()
        engine.module.eval()

        # ---- 1. sample with the current weights, score as batches finish ----------------
        version = epoch + 1  # weights after `epoch` updates
        weights = [ray.put(policy.trainable_state_dict())]
        (traj_refs, score_refs, image_refs), staleness = rollouts.take(epoch, weights, version)
        parts = ray.get(traj_refs)
        traj = Trajectory.concat(parts)
        rewards_local, components = score_batches([ray.get(ref) for ref in score_refs])
        sample_time = time.perf_counter() - t_epoch

        # ---- 2. advantages over the whole epoch (all workers) ------------------------------
        all_prompts, all_rewards = all_gather(traj.prompts, rewards_local)
        if algo.per_prompt_stat_tracking:
            all_adv = tracker.update(all_prompts, all_rewards)
        else:
            all_adv = normalize_rewards(all_rewards)
        advantages = torch.as_tensor(all_adv[rank * per_worker : (rank + 1) * per_worker])

        # ---- 3. PPO updates over the stored steps -----------------------------------------
        t_train = time.perf_counter()
        decoupled = staleness > 0 and algo.stale_correction == "decoupled"
        prox = proximal_log_probs(policy, traj, micro) if decoupled else None
        engine.module.train()
        stats = {"loss": [], "approx_kl": [], "clipfrac": []}
        if algo.beta > 0:
            stats["kl"] = []
        for _ in range(algo.num_inner_epochs):
            order = torch.randperm(per_worker)
            step_order = torch.stack([torch.randperm(num_steps) for _ in range(per_worker)])
            for mb in order.split(micro):
                batch, adv = traj.select(mb), advantages[mb]
                rows = torch.arange(len(mb))
                for k in range(train_steps):
                    j = step_order[mb, k]  # each trajectory trains on its own random steps
                    step = (batch.cond, batch.latents[rows, j], batch.timesteps[rows, j], batch.latents[rows, j + 1])
                    log_prob = policy.step_log_prob(*step)
                    behaviour = batch.log_probs[rows, j].to(log_prob.device)
                    if prox is None:
                        loss, info = ddpo_loss(
                            log_prob, behaviour, adv.to(log_prob.device), algo.clip_range, algo.adv_clip_max
                        )
                    else:
                        loss, info = decoupled_ppo_loss(
                            log_prob,
                            prox[mb][rows, j].to(log_prob.device),
                            behaviour,
                            adv.to(log_prob.device),
                            algo.clip_range,
                            algo.adv_clip_max,
                            algo.behaviour_weight_cap,
                        )
                    if algo.beta > 0:
                        with torch.no_grad(), policy.reference(frozen):
                            ref_log_prob = policy.step_log_prob(*step)
                        kl = k3_kl(log_prob, ref_log_prob)
                        loss = loss + algo.beta * kl
                        stats["kl"].append(kl.item())
                    w.step(loss)
                    stats["loss"].append(loss.item())
                    stats["approx_kl"].append(info["approx_kl"].item())
                    stats["clipfrac"].append(info["clipfrac"].item())
                    if prox is not None:
                        for key in ("behaviour_weight", "behaviour_capped"):
                            stats.setdefault(key, []).append(info[key].item())
        train_time = time.perf_counter() - t_train
        policy.weights_version = version

        # ---- 4. log and checkpoint -------------------------------------------------------
        metrics = {
            "epoch": epoch,
            "samples": len(all_rewards),  # every rollout of the epoch, none lost
            "reward_mean": float(np.mean(all_rewards)),
            "reward_std": float(np.std(all_rewards)),
            **reward_metrics(components),
            **all_reduce_mean({k: float(np.mean(v)) for k, v in stats.items()}),
            **w.optimizer_metrics(),
            "samples_per_s": algo.samples_per_epoch / sample_time,
            "train_transitions_per_s": algo.num_inner_epochs * per_worker * train_steps * world / train_time,
            "staleness": staleness,  # weight versions between the rollouts and the learner
        }
        metrics["epoch_time_s"] = epoch_time = time.perf_counter() - t_epoch
        busy = sum(p.elapsed_s for p in parts)
        metrics.update(idle_shares(sample_time, busy, min(len(w.samplers), len(parts)), epoch_time))
        if w.end_epoch(
            epoch,
            metrics,
            lambda refs=image_refs: np.concatenate([ray.get(ref) for ref in refs]),
            state={"tracker": tracker.state_dict()},
            progress=print_progress,
        ):
            break  # the over-optimisation guard (guard.*) or trainer.time_budget_s stopped the run

    if w.logger is not None and algo.final_eval_per_prompt:
        final = before_and_after(prompts, w.samplers, w.rewards, c, before, policy.trainable_state_dict())
        w.logger.log_metrics(final, step=algo.num_epochs)
        _print_before_and_after(final, len(prompts), algo.final_eval_per_prompt)
    w.finish(policy)


# ============================================================================ helpers
def proximal_log_probs(policy, traj, micro: int) -> torch.Tensor:
    """Every stored step's log-probability under the policy's weights now (before the epoch's
    update), without gradients: the decoupled objective's proximal policy. ``[N, T]``."""
    out = torch.empty_like(traj.log_probs)
    with torch.no_grad():
        for idx in torch.arange(len(traj)).split(micro):
            batch = traj.select(idx)
            for j in range(traj.timesteps.shape[1]):
                out[idx, j] = policy.step_log_prob(
                    batch.cond, batch.latents[:, j], batch.timesteps[:, j], batch.latents[:, j + 1]
                ).cpu()
    return out


def fixed_seed_plan(prompts: list[str], per_prompt: int, seed: int) -> tuple[list[str], list[int]]:
    """Every prompt ``per_prompt`` times, each sample with its own seed from (seed, prompt
    index, repeat): the same samples whichever run, actor or batch draws them."""
    plan, seeds = [], []
    for i, prompt in enumerate(prompts):
        for j in range(per_prompt):
            plan.append(prompt)
            seeds.append(int(np.random.SeedSequence([seed, 7_333, i, j]).generate_state(1)[0] >> 1))
    return plan, seeds


def before_and_after(prompts, samplers, rewards, c: TrainConfig, before: dict, after: dict) -> dict:
    """The fixed-seed plan sampled with the weights ``before`` and ``after`` training, scored by
    every reward component: ``final_{before,after}_reward_mean`` and each component's metrics."""
    import ray

    plan, seeds = fixed_seed_plan(prompts, c.algo.final_eval_per_prompt, c.trainer.seed)
    size = c.sampling.batch_size
    metrics = {"final_samples": len(plan)}
    # versions no epoch uses, so that every sampler loads these weights
    for name, state, version in (("before", before, -1), ("after", after, c.algo.num_epochs + 1)):
        weights = [ray.put(state)]
        scores = []
        for b, start in enumerate(range(0, len(plan), size)):
            _, images = samplers[b % len(samplers)].rollout.remote(
                plan[start : start + size], seeds[start : start + size], weights, version
            )
            scores.append(rewards[b % len(rewards)].score.remote(images, plan[start : start + size]))
        reward, components = score_batches(ray.get(scores))
        metrics[f"final_{name}_reward_mean"] = float(np.mean(reward))
        metrics.update({f"final_{name}_{k}": v for k, v in reward_metrics(components).items()})
    return metrics


def _print_before_and_after(m: dict, n_prompts: int, per_prompt: int) -> None:
    line = (
        f"[armature] fixed seeds ({n_prompts} prompts x {per_prompt}), before -> after training: "
        f"reward {m['final_before_reward_mean']:+.4f} -> {m['final_after_reward_mean']:+.4f}"
    )
    before, after = reward_summary_line(m, "final_before_reward_"), reward_summary_line(m, "final_after_reward_")
    print(line + (f";  before:{before};  after:{after}" if before else ""), flush=True)
