"""What the online group learners (GRPO, DiffusionNFT) share: driver, sampling plan, checkpoints.

* ``run_online`` is the driver: ``armature.platform.launch`` opens the run (Ray, MLflow);
  it starts the sampler and reward actors and hands a ``TorchTrainer`` the job's ``train_loop``.
* ``epoch_plan`` decides, from the seed and the epoch only, which prompts the epoch draws, how
  they group (``group_size`` images per prompt slot) and every sample's seed: a run's samples do
  not depend on the number of workers, sampler or reward actors.
* ``sample_and_score`` sends the batches to the samplers; each batch's images go straight from
  its sampler to a reward actor (an object reference), so rewards are scored while the next
  batches are still being sampled. It reports how long the learner waited on each side.
* ``finish_epoch``: the progress line, the sample grid, and ``armature.platform.checkpoints``'
  checkpoint-then-log (``save_checkpoint`` / ``restore_checkpoint`` are re-exported from there).

The DDPO job's helpers (prompt lists, all-gather, progress line) are imported, not copied.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from armature.jobs.ddpo import _all_gather, _all_reduce_mean, _print_progress, _prompt_list
from armature.platform.checkpoints import commit_epoch, restore_checkpoint, save_checkpoint
from armature.platform.engine import grad_norm as _param_grad_norm

__all__ = ["run_online", "epoch_plan", "sample_and_score", "save_checkpoint", "restore_checkpoint",
           "EpochPlan", "_all_gather", "_all_reduce_mean", "_param_grad_norm", "_print_progress", "_prompt_list"]



# ============================================================================ driver
def run_online(cfg: DictConfig, train_loop) -> dict:
    """Run an online learner job (``train_loop`` on Ray Train) with sampler and reward actors."""
    import ray
    from ray.train.torch import TorchTrainer

    from armature.actors import start_reward_actors, start_samplers
    from armature.platform.launch import fit, open_run, trainer_kwargs

    trainer_cfg, cluster, reward = cfg.trainer, cfg.cluster, cfg.reward
    required = (trainer_cfg.num_workers * trainer_cfg.cpus_per_worker
                + cluster.num_samplers * cluster.sampler_num_cpus + reward.num_actors * reward.num_cpus)
    job = open_run(cfg, required)
    c = job.cfg
    samplers = start_samplers(
        cluster.num_samplers, c["model"], c["sampling"], seed=trainer_cfg.seed,
        num_cpus=cluster.sampler_num_cpus, num_gpus=cluster.sampler_num_gpus,
        max_restarts=cluster.max_restarts, threads=job.threads,
        resources=c["cluster"]["sampler_resources"], scheduling=cluster.actor_scheduling,
    )
    rewards = start_reward_actors(
        reward.num_actors, c["reward"]["components"], num_cpus=reward.num_cpus, num_gpus=reward.num_gpus,
        max_restarts=cluster.max_restarts, resources=c["reward"]["resources"], scheduling=cluster.actor_scheduling,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": c, "samplers": samplers, "rewards": rewards, "run_id": job.run_id,
                           "tracking_uri": job.tracking_uri, "threads": job.threads},
        **trainer_kwargs(job),
    )
    try:
        return fit(trainer, job)
    finally:
        for actor in samplers + rewards:
            ray.kill(actor)


# ============================================================================ sampling
@dataclass
class EpochPlan:
    """One worker's share of an epoch: its prompts, their groups and every sample's seed."""

    prompts: list[str]  # this worker's samples (each prompt slot repeated group_size times)
    groups: list[str]  # the group (prompt slot of the epoch) of each sample
    seeds: list[int]  # one seed per sample


def epoch_plan(prompts: list[str], seed: int, epoch: int, prompts_per_epoch: int, group_size: int,
               rank: int, world: int) -> EpochPlan:
    """The epoch's prompt slots are drawn from (seed, epoch) alone; slot k's sample g has the
    seed SeedSequence([seed, epoch, k, g]). Worker ``rank`` takes slots rank, rank + world, ..."""
    rng = np.random.default_rng([seed, epoch])
    chosen = rng.integers(len(prompts), size=prompts_per_epoch)
    mine = range(rank, prompts_per_epoch, world)
    plan = EpochPlan([], [], [])
    for k in mine:
        for g in range(group_size):
            plan.prompts.append(prompts[chosen[k]])
            plan.groups.append(f"{epoch}:{k}")
            plan.seeds.append(int(np.random.SeedSequence([seed, epoch, k, g]).generate_state(1)[0] >> 1))
    return plan


def sample_and_score(plan: EpochPlan, samplers: list, rewards: list, batch_size: int, weights, version: int,
                     rank: int, world: int, **rollout_kwargs):
    """Roll out the plan in batches and score each batch as soon as it is sampled.

    Every batch is submitted at once; a reward actor's ``score`` waits on its batch's images
    (an object reference), so scoring overlaps the sampling of the following batches. Returns
    ``(trajectory, rewards [N], components, images, timings)``. ``timings`` (seconds of this
    call): how long the learner waited for every batch to be sampled and then for the scores not
    yet done; the samplers' time rolling out and waiting; the reward actors' time scoring and
    waiting (from when each batch's images and scores became ready, as seen from the learner).
    """
    import ray

    from armature.policies import Trajectory

    t0 = time.perf_counter()
    traj_refs, score_refs, image_refs, scorer_of, samplers_used = [], [], [], [], set()
    for b, start in enumerate(range(0, len(plan.prompts), batch_size)):
        sl = slice(start, start + batch_size)
        samplers_used.add((rank + b * world) % len(samplers))
        sampler = samplers[(rank + b * world) % len(samplers)]
        traj_ref, images_ref = sampler.rollout.remote(plan.prompts[sl], plan.seeds[sl], weights, version,
                                                      **rollout_kwargs)
        scorer = (rank + b * world) % len(rewards)
        traj_refs.append(traj_ref)
        image_refs.append(images_ref)
        scorer_of.append(scorer)
        score_refs.append(rewards[scorer].score.remote(images_ref, plan.prompts[sl]))
    # When each batch's images and scores became ready, as the learner sees them (not fetched).
    pending = {ref: ("images", i) for i, ref in enumerate(image_refs)}
    pending.update({ref: ("score", i) for i, ref in enumerate(score_refs)})
    ready_at = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
        ready_at[pending.pop(done[0])] = time.perf_counter() - t0
    sampled_at = max(ready_at[("images", i)] for i in range(len(image_refs)))
    parts = ray.get(traj_refs)
    scores = ray.get(score_refs)
    done_at = time.perf_counter() - t0
    traj = Trajectory.concat(parts)
    reward = np.concatenate([s["reward"] for s in scores]).astype(np.float32)
    components = {k: np.concatenate([s[k] for s in scores]) for k in scores[0] if k != "reward"}
    # A reward actor works on a batch from when both its images and the actor are free until the
    # score is ready; the rest of the phase it waits.
    reward_busy = 0.0
    for actor in set(scorer_of):
        free = 0.0
        for b in (i for i, a in enumerate(scorer_of) if a == actor):
            start = max(ready_at[("images", b)], free)
            free = max(ready_at[("score", b)], start)
            reward_busy += free - start
    sampler_busy = float(sum(p.elapsed_s for p in parts))
    timings = {
        "wait_sampling_s": sampled_at,  # the learner, until every batch is sampled
        "wait_rewards_after_sampling_s": done_at - sampled_at,  # scoring not hidden behind sampling
        "sampler_busy_s": sampler_busy,
        "sampler_wait_s": max(0.0, len(samplers_used) * sampled_at - sampler_busy),
        "reward_busy_s": reward_busy,
        "reward_wait_s": max(0.0, len(set(scorer_of)) * done_at - reward_busy),
    }
    return traj, reward, components, image_refs, timings


# ============================================================================ epochs
def finish_epoch(engine, logger, c: dict, epoch: int, metrics: dict, unlogged: list, rank: int,
                 image_refs: list, state: dict | None = None, extra_fn=None) -> list:
    """Print, checkpoint (every ``trainer.checkpoint_every`` epochs) and log an epoch's metrics;
    metrics reach MLflow only once their checkpoint is registered. Returns the unlogged list."""
    import ray

    if logger is not None:
        every = c["tracking"]["log_images_every"]
        if every and epoch % every == 0:
            images = np.concatenate([ray.get(ref) for ref in image_refs])
            logger.log_images(images[: c["tracking"]["images_per_grid"]], f"samples/epoch_{epoch:04d}.png")
        _print_progress(epoch, c["algo"]["num_epochs"], metrics)
    last = epoch + 1 == c["algo"]["num_epochs"]
    checkpoint = last or (epoch + 1) % c["trainer"]["checkpoint_every"] == 0
    return commit_epoch(engine, logger, epoch, metrics, unlogged, rank, checkpoint, state, extra_fn)


def save_final(policy, logger, c: dict) -> None:
    """Log the trained adapter (or weights) and the config as the run's artifacts."""
    if logger is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        policy.save_trainable(Path(tmp) / "adapter", metadata={"model": c["model"], "sampling": c["sampling"]})
        logger.log_artifacts(Path(tmp) / "adapter", "adapter")
        logger.log_text(json.dumps(c, indent=2, default=str), "config.json")
