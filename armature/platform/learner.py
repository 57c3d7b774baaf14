"""The learner core: what every training job does around its algorithm.

An algorithm file (``armature/jobs/<name>.py``) holds its config, its update for a batch or an
epoch and its metrics; this module holds the rest.

* ``run_learner`` is the driver: connect to Ray and open the MLflow run (``launch.open_run``),
  start the sampler and reward actors when the learner samples on-policy, hand the one
  ``TorchTrainer`` the job's ``train_loop`` (plus whatever the job ``prepare``\\ d: data sets,
  arrays), fit, close the run and register the adapter, stop the actors.
* ``Worker`` is one Ray Train worker's life: seeds and threads, the policy, the DeepSpeed
  engine, the MLflow logger (rank 0), the restore of the last checkpoint, one optimizer step
  (``step``), checkpoint-then-log at the end of each epoch (``end_epoch``) and the trained
  adapter as the run's artifact (``finish``).
* ``epoch_plan`` and ``sample_and_score`` are the sampling step every on-policy learner uses:
  which prompts and seeds an epoch draws, and the rollouts, each batch scored by a reward actor
  as soon as it is sampled. ``reward_metrics`` is what the reward components report about
  their own scores.
* ``RolloutAhead`` keeps the samplers in step with the learner or one epoch ahead of it
  (``trainer.rollout_ahead``): epoch k+1 is rolled out with the weights before epoch k's update
  while the learner trains on epoch k; ``staleness`` says how many weight versions behind.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from armature.platform.checkpoints import commit_epoch, restore_checkpoint
from armature.platform.config import PromptConfig, SamplingConfig
from armature.platform.engine import deepspeed_engine, grad_norm
from armature.platform.overoptimisation import (
    TRAINED,
    MonitorGuard,
    curve_png,
    curve_points,
    monitor_key,
    monitors,
)

__all__ = [
    "run_learner",
    "LoopInputs",
    "start_actors",
    "stop_actors",
    "Worker",
    "EpochPlan",
    "epoch_plan",
    "sample_and_score",
    "submit_rollouts",
    "Submitted",
    "RolloutAhead",
    "idle_shares",
    "Sampled",
    "group_errors",
    "micro_batch_errors",
    "score_batches",
    "prompt_list",
    "all_gather",
    "quarantine_metrics",
    "reward_metrics",
    "reward_summary_line",
    "print_progress",
]


# ============================================================================ driver
@dataclass
class LoopInputs:
    """What a job's ``prepare`` hands its workers besides the config: entries of the loop
    config, and Ray Data sets (``train`` is split over the workers, the others are not)."""

    config: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)


def actor_cpus(cfg: DictConfig) -> float:
    """The CPUs the sampler and reward actors hold."""
    cluster, reward = cfg.cluster, cfg.reward
    return cluster.num_samplers * cluster.sampler_num_cpus + reward.num_actors * reward.num_cpus


def start_actors(job, sampling: SamplingConfig | None = None) -> tuple[list, list]:
    """``(samplers, reward actors)`` as ``cluster.*`` and ``reward.*`` say; the samplers use
    ``sampling`` (default: the job's ``sampling`` section)."""
    from armature.actors import start_reward_actors, start_samplers

    c = job.cfg
    cluster, reward = c.cluster, c.reward
    samplers = start_samplers(
        cluster.num_samplers,
        c.model,
        sampling or c.sampling,
        seed=c.trainer.seed,
        num_cpus=cluster.sampler_num_cpus,
        num_gpus=cluster.sampler_num_gpus,
        max_restarts=cluster.max_restarts,
        threads=job.sampler_threads or job.threads,
        resources=cluster.sampler_resources,
        scheduling=cluster.actor_scheduling,
    )
    rewards = start_reward_actors(
        reward.num_actors,
        reward.components,
        num_cpus=reward.num_cpus,
        num_gpus=reward.num_gpus,
        max_restarts=cluster.max_restarts,
        resources=reward.resources,
        scheduling=cluster.actor_scheduling,
    )
    return samplers, rewards


def stop_actors(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


def run_learner(
    cfg: DictConfig,
    train_loop: Callable[[dict], None],
    *,
    actors: bool = False,
    actor_sampling: dict | None = None,
    extra_cpus: float = 0.0,
    required_cpus: float | None = None,
    prepare: Callable[..., LoopInputs] | None = None,
) -> dict:
    """Run ``train_loop`` on Ray Train as configured; returns the last reported metrics.

    ``actors``: start the sampler and reward actors first (the loop config's ``samplers`` and
    ``rewards``; stopped when the trainer ends), the samplers with ``sampling`` updated by
    ``actor_sampling``. The local Ray is sized for the workers, the
    actors and ``extra_cpus`` (or exactly ``required_cpus``). ``prepare(job, samplers, rewards)``,
    run once the MLflow run is open, returns the job's own ``LoopInputs``.
    """
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    from armature.platform.launch import fit, open_run, trainer_kwargs

    if required_cpus is None:
        required_cpus = (
            cfg.trainer.num_workers * cfg.trainer.cpus_per_worker + (actor_cpus(cfg) if actors else 0.0) + extra_cpus
        )
    job = open_run(cfg, required_cpus)
    sampling = replace(job.cfg.sampling, **(actor_sampling or {}))
    samplers, rewards = start_actors(job, sampling) if actors else ([], [])
    try:
        inputs = prepare(job, samplers, rewards) if prepare else LoopInputs()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg": job.cfg,
                "samplers": samplers,
                "rewards": rewards,
                "run_id": job.run_id,
                "run_dir": job.run_dir,
                "tracking_uri": job.tracking_uri,
                "threads": job.threads,
                **inputs.config,
            },
            datasets=inputs.datasets or None,
            dataset_config=DataConfig(datasets_to_split=["train"]) if inputs.datasets else None,
            **trainer_kwargs(job),
        )
        return fit(trainer, job)
    finally:
        stop_actors(samplers + rewards)


def quarantine_metrics(quarantine_dir: str) -> dict[str, int]:
    """The records the pair pipeline quarantined, by reason (``data_quarantined_<reason>``), in all
    (``data_quarantined``), and the ties it dropped (``data_ties_dropped``)."""
    from armature.data.stream import quarantine_summary

    summary = quarantine_summary(quarantine_dir)
    out = {"data_quarantined": summary.get("quarantined", 0), "data_ties_dropped": summary.get("tie_dropped", 0)}
    out.update({f"data_quarantined_{k}": v for k, v in summary.items() if k not in ("quarantined", "tie_dropped")})
    return out


# ============================================================================ worker
class Worker:
    """One Ray Train worker of a learner job, from its seed to its trained adapter.

    ``Worker(config)`` seeds torch (``trainer.seed + rank``) and sets the threads;
    ``build_policy`` builds the policy every process of the job builds; ``start`` wraps the
    trainable weights in DeepSpeed, opens the logger (rank 0) and restores the last checkpoint
    (``start_epoch``, ``state``, ``extra``); ``step(loss)`` is one backward pass and, at an
    accumulation boundary, one optimizer step (its gradient norm kept in ``grad_norms``);
    ``end_epoch`` checkpoints, then logs; ``finish`` logs the trained weights and the config.
    """

    def __init__(self, config: dict):
        import ray.train

        self.config = config
        self.c = config["cfg"]
        self.algo, self.trainer = self.c.algo, self.c.trainer
        self.samplers, self.rewards = config.get("samplers") or [], config.get("rewards") or []
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.seed = self.trainer.seed
        torch.manual_seed(self.seed + self.rank)
        if config.get("threads"):
            torch.set_num_threads(config["threads"])
        self.logger = None
        self.engine = self.optimizer = None
        self.params: list = []
        self.start_epoch, self.state, self.extra = 0, {}, None
        self.unlogged: list = []  # (step, metrics) waiting for their checkpoint
        self.grad_norms: list[float] = []
        self.policy = None
        self.guard = Guard(self.c.guard) if self.c.guard.monitor else None
        # Work between epochs that a job adds before ``start`` (e.g. the reward refresh,
        # ``armature.feedback.refresh``): each hook has a ``name``, ``restore(state, extra)`` (its
        # part of a checkpoint; returns the rest of ``extra``), ``end_epoch(epoch, metrics, last)``,
        # ``state()`` (JSON) and ``extra()`` (tensors) for the checkpoint.
        self.hooks: list = []
        # trainer.time_budget_s: the training time of the job's earlier runs, and this run's start
        self.trained_before, self.began = 0.0, time.monotonic()

    def build_policy(self, sampling: SamplingConfig | None = None):
        from armature.policies import build_policy

        return build_policy(self.c.model, sampling or self.c.sampling, seed=self.seed)

    def start(self, model, accumulation: int, micro_batch: int | None = None, route: bool = True):
        """DeepSpeed over ``model``'s trainable weights (``algo`` optimizer settings, gradients
        accumulated over ``accumulation`` backward passes), the logger, the restore. ``route``:
        the policy's forward passes go through the engine. Returns the engine."""
        self.engine, self.optimizer, self.params = deepspeed_engine(
            model, self.algo, self.trainer, accumulation, micro_batch
        )
        if route:
            model.denoiser = self.engine
        self.policy = model
        self.open_logger()
        self.start_epoch, self.state, self.extra = restore_checkpoint(self.engine, self.logger)
        if self.guard is not None:
            self.extra = self.guard.restore(self.state, self.extra)
            if self.guard.stopped:  # a rerun of a run the guard stopped trains no further
                self.start_epoch = self.algo.num_epochs
        for hook in self.hooks:
            self.extra = hook.restore(self.state, self.extra)
        self.trained_before, self.began = float(self.state.get(TRAINED_S, 0.0)), time.monotonic()
        if self.state.get(BUDGET_SPENT):  # nor does a rerun of one that spent trainer.time_budget_s
            self.start_epoch = max(self.start_epoch, planned_epochs(self.algo))
        return self.engine

    def trained_s(self) -> float:
        """The job's training time so far: this run's since ``start``, plus its earlier runs'."""
        return self.trained_before + time.monotonic() - self.began

    def open_logger(self):
        """The MLflow logger of the job's run, on rank 0 (None elsewhere)."""
        from armature.platform.tracking import RunLogger

        if self.rank == 0 and self.logger is None:
            self.logger = RunLogger(self.config["tracking_uri"], self.config["run_id"])
        return self.logger

    def step(self, loss: torch.Tensor) -> bool:
        """Backward; at an accumulation boundary the optimizer steps and the gradient norm
        (before clipping) is kept. Returns whether it stepped."""
        engine = self.engine
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        norm = grad_norm(self.params) if boundary else None
        engine.step()  # DeepSpeed only steps the optimizer at a boundary
        if boundary:  # ZeRO-2 keeps gradients in its partitions: ask the engine
            self.grad_norms.append(engine.get_global_grad_norm() or norm)
        return boundary

    def optimizer_metrics(self) -> dict[str, float]:
        """The epoch's mean gradient norm and the learning rate; starts the next epoch's norms."""
        norms, self.grad_norms = self.grad_norms, []
        return {
            "grad_norm": float(np.nanmean(norms)) if norms else float("nan"),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
        }

    def end_epoch(
        self,
        epoch: int,
        metrics: dict,
        images=None,
        state: dict | None = None,
        extra_fn=None,
        progress: Callable[[int, int, dict], None] | None = None,
        total: int | None = None,
        checkpoint: bool | None = None,
    ) -> bool:
        """Log a sample grid (``images``: uint8 ``[N, H, W, 3]`` or a callable giving them) and
        print ``progress`` (rank 0), then checkpoint every ``trainer.checkpoint_every`` epochs
        and at the last of ``total`` (default ``algo.num_epochs``), or as ``checkpoint`` says;
        metrics reach MLflow only once their checkpoint is registered, so an epoch that a
        restart trains again is never logged twice.

        Returns True when the over-optimisation guard (``guard.*``) stops training: the learner
        breaks out of its loop; with ``guard.rollback`` the policy already holds the weights of
        the monitor's best epoch (as do this epoch's checkpoint and the adapter ``finish`` logs).
        It does too once the job's training time reaches ``trainer.time_budget_s``; the
        checkpoint keeps the time spent, so a resumed run counts it and a spent one trains no more.
        """
        num_epochs = total or self.algo.num_epochs
        stop = False
        for hook in self.hooks:  # before the guard: it may roll the policy back
            hook.end_epoch(epoch, metrics, last=epoch + 1 == num_epochs)
            state = {**(state or {}), hook.name: hook.state()}
            extra_fn = with_extra(extra_fn, hook.extra)
        if self.guard is not None:
            stop = self.guard.update(epoch, metrics, self.policy, last=epoch + 1 == num_epochs, rank=self.rank)
            state = {**(state or {}), "guard": self.guard.state()}
            extra_fn = self.guard.with_best(extra_fn)
            checkpoint = True if stop else checkpoint
        state = {**(state or {}), TRAINED_S: self.trained_s()}
        budget = self.trainer.time_budget_s
        if budget and epoch + 1 < num_epochs and agree(state[TRAINED_S] >= budget):  # rank 0's clock decides
            metrics["time_budget_stopped"] = epoch
            state[BUDGET_SPENT], checkpoint, stop = True, True, True
            if self.rank == 0:
                print(
                    f"[armature] trainer.time_budget_s={budget:g} spent after epoch {epoch + 1}: stopping", flush=True
                )
        if self.logger is not None:
            every = self.c.tracking.log_images_every
            if images is not None and every and epoch % every == 0:
                grid = images() if callable(images) else images
                self.logger.log_images(grid[: self.c.tracking.images_per_grid], f"samples/epoch_{epoch:04d}.png")
            (progress or print_progress)(epoch, num_epochs, metrics)
        if checkpoint is None:
            checkpoint = epoch + 1 == num_epochs or (epoch + 1) % self.trainer.checkpoint_every == 0
        self.commit(epoch, metrics, checkpoint, state, extra_fn)
        return stop

    def commit(self, step: int, metrics: dict, checkpoint: bool, state: dict | None = None, extra_fn=None) -> None:
        """Queue ``metrics`` (MLflow step ``step``); when ``checkpoint``, save one (with the JSON
        ``state`` and ``extra_fn()``'s tensors), then log everything queued."""
        self.unlogged = commit_epoch(
            self.engine, self.logger, step, metrics, self.unlogged, self.rank, checkpoint, state, extra_fn
        )

    def finish(self, policy, save: Callable[[Path], Any] | None = None, **metadata) -> None:
        """Log the trained adapter (or weights) and the config as the run's artifacts (rank 0);
        the adapter's metadata holds the model and sampling sections and ``metadata``. ``save``
        writes the adapter folder instead of ``policy.save_trainable``."""
        if self.logger is None:
            return
        c = self.c
        with tempfile.TemporaryDirectory() as tmp:
            if save is not None:
                save(Path(tmp) / "adapter")
            else:
                policy.save_trainable(
                    Path(tmp) / "adapter",
                    metadata={"model": asdict(c.model), "sampling": asdict(c.sampling), **metadata},
                )
            self.logger.log_artifacts(Path(tmp) / "adapter", "adapter")
            self.logger.log_text(json.dumps(asdict(c), indent=2, default=str), "config.json")
        log_curves(self.logger, c.reward.components)


def planned_epochs(algo) -> int:
    """How many epochs (online DPO: rounds) the job's loop runs."""
    return getattr(algo, "num_rounds", None) or algo.num_epochs


TRAINED_S = "trained_s"  # checkpoint state: training seconds so far (trainer.time_budget_s)
BUDGET_SPENT = "time_budget_spent"


# ============================================================================ over-optimisation
GUARD_PREFIX = "guard_best."  # the best epoch's weights among a checkpoint's extra tensors


class Guard:
    """``guard.*`` in a worker: the :class:`MonitorGuard`'s decision (rank 0's, shared with every
    rank), the weights of the monitor's best epoch (kept in memory and in the checkpoint) and the
    roll back to them."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.monitor = MonitorGuard(cfg.monitor, cfg.patience, cfg.min_delta)
        self.best: dict[str, torch.Tensor] | None = None
        self.stopped = False

    def update(self, epoch: int, metrics: dict, policy, last: bool, rank: int) -> bool:
        stop = agree(self.monitor.update(epoch, metrics))
        if self.monitor.best_epoch == epoch:
            self.best = policy.trainable_state_dict()
        metrics["guard_best_epoch"] = self.monitor.best_epoch
        if (stop or last) and self.cfg.rollback and self.best is not None and self.monitor.best_epoch != epoch:
            policy.load_trainable_state_dict(self.best)
            metrics["guard_rolled_back_to"] = self.monitor.best_epoch
        if stop:
            self.stopped = True
            metrics["guard_stopped"] = epoch
            if rank == 0:
                print(
                    f"[armature] guard: {self.cfg.monitor} has stayed below its epoch-{self.monitor.best_epoch + 1} "
                    f"best for {self.monitor.since_best} epochs while the trained reward rose: stopping"
                    + (f", back to epoch {self.monitor.best_epoch + 1}'s weights" if self.cfg.rollback else ""),
                    flush=True,
                )
        return stop

    def state(self) -> dict:
        return {**self.monitor.state_dict(), "stopped": self.stopped}

    def with_best(self, extra_fn):
        """``extra_fn`` with the best epoch's weights added (under ``GUARD_PREFIX``)."""

        def extra():
            tensors = dict(extra_fn() or {}) if extra_fn else {}
            tensors.update({GUARD_PREFIX + k: v for k, v in (self.best or {}).items()})
            return tensors or None

        return extra

    def restore(self, state: dict, extra: dict | None) -> dict | None:
        """Take the guard's part of a restored checkpoint; returns the job's own extra tensors."""
        if "guard" in state:
            saved = dict(state["guard"])
            self.stopped = saved.pop("stopped", False)
            self.monitor = MonitorGuard.from_state(saved)
        extra = dict(extra or {})
        best = {k[len(GUARD_PREFIX) :]: extra.pop(k) for k in list(extra) if k.startswith(GUARD_PREFIX)}
        self.best = best or None
        return extra or None


def with_extra(extra_fn, more) -> Callable[[], dict | None]:
    """``extra_fn`` (a checkpoint's extra tensors, or None) with ``more()``'s tensors added."""

    def extra():
        tensors = dict(extra_fn() or {}) if extra_fn else {}
        tensors.update(more() or {})
        return tensors or None

    return extra


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (each rank's metrics may differ: its own samples)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def log_curves(logger, components: dict) -> None:
    """``overoptimisation/<monitor>.png``: each monitor against the trained reward, per epoch, from
    the metrics the run logged (so a resumed run's curve has every epoch)."""
    names = monitors(components)
    if logger is None or not names:
        return
    history: dict[int, dict[str, float]] = {}
    for key in [TRAINED] + [monitor_key(n) for n in names]:
        for m in logger.client.get_metric_history(logger.run_id, key):
            history.setdefault(m.step, {})[key] = m.value
    for name in names:
        points = curve_points(list(history.items()), name)
        if len(points) >= 2:
            logger.log_bytes(curve_png({logger.run_id[:8]: points}, name), f"overoptimisation/{name}.png")


# ============================================================================ sampling
def group_errors(cfg: DictConfig) -> list[str]:
    """What ``epoch_plan`` needs of a group learner's ``algo`` (GRPO, DiffusionNFT): groups of two
    or more, prompt slots divided evenly over the workers, micro-batches that divide each share."""
    algo, workers, errors = cfg.algo, cfg.trainer.num_workers, []
    if algo.group_size < 2:
        errors.append(f"algo.group_size={algo.group_size}: a group needs >= 2 images to compare")
    if algo.prompts_per_epoch < 1 or algo.prompts_per_epoch % workers:
        errors.append(
            f"algo.prompts_per_epoch={algo.prompts_per_epoch} must be >= 1 and divide evenly "
            f"over trainer.num_workers={workers}"
        )
    else:
        per_worker = algo.prompts_per_epoch // workers * algo.group_size
        errors.extend(micro_batch_errors(algo, per_worker, "prompts_per_epoch / num_workers * group_size"))
    return errors


def micro_batch_errors(algo, per_worker: int, share: str) -> list[str]:
    """``algo.train_batch_size`` must divide a worker's ``per_worker`` samples (``share`` says how
    they are counted), and ``algo.gradient_accumulation_batches`` its micro-batches."""
    if per_worker % algo.train_batch_size:
        return [
            (
                f"algo.train_batch_size={algo.train_batch_size} must divide the samples per worker "
                f"({per_worker} = {share})"
            )
        ]
    if (per_worker // algo.train_batch_size) % algo.gradient_accumulation_batches:
        return [
            (
                f"algo.gradient_accumulation_batches={algo.gradient_accumulation_batches} must divide "
                f"the micro-batches per worker ({per_worker // algo.train_batch_size})"
            )
        ]
    return []


def prompt_list(prompt_cfg: PromptConfig) -> list[str]:
    """The job's prompts: ``prompts.file`` (one a line) when set, else ``prompts.prompts``."""
    if prompt_cfg.file:
        lines = Path(prompt_cfg.file).read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = list(prompt_cfg.prompts)
    if not prompts:
        raise ValueError("prompts: no prompts given (prompts.prompts or prompts.file)")
    return prompts


def all_gather(keys: list, rewards: np.ndarray) -> tuple[list, np.ndarray]:
    """Every worker's ``keys`` (prompts or groups) and rewards, in rank order."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(keys), rewards
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (list(keys), rewards))
    return [k for ks, _ in gathered for k in ks], np.concatenate([r for _, r in gathered])


@dataclass
class EpochPlan:
    """One worker's share of an epoch: its prompts, their groups and every sample's seed."""

    prompts: list[str]  # this worker's samples (each prompt slot repeated group_size times)
    groups: list[str]  # the group (prompt slot of the epoch) of each sample
    seeds: list[int]  # one seed per sample


def epoch_plan(
    prompts: list[str], seed: int, epoch: int, prompts_per_epoch: int, group_size: int, rank: int, world: int
) -> EpochPlan:
    """The epoch's prompt slots are drawn from (seed, epoch) alone; slot k's sample g has the
    seed SeedSequence([seed, epoch, k, g]). Worker ``rank`` takes slots rank, rank + world, ..."""
    rng = np.random.default_rng([seed, epoch])
    chosen = rng.integers(len(prompts), size=prompts_per_epoch)
    plan = EpochPlan([], [], [])
    for k in range(rank, prompts_per_epoch, world):
        for g in range(group_size):
            plan.prompts.append(prompts[chosen[k]])
            plan.groups.append(f"{epoch}:{k}")
            plan.seeds.append(int(np.random.SeedSequence([seed, epoch, k, g]).generate_state(1)[0] >> 1))
    return plan


@dataclass
class Sampled:
    """What ``sample_and_score`` returns: the rollouts, their rewards and how long it took."""

    traj: Any  # armature.policies.Trajectory of every batch, in plan order
    rewards: np.ndarray  # [N] float32, the weighted total
    components: dict[str, np.ndarray]  # each reward component's scores [N]
    image_refs: list  # one object reference per batch: uint8 [B, H, W, 3]
    timings: dict[str, float] = field(default_factory=dict)

    def images(self) -> np.ndarray:
        import ray

        return np.concatenate([ray.get(ref) for ref in self.image_refs])


def sample_and_score(
    plan: EpochPlan,
    samplers: list,
    rewards: list,
    batch_size: int,
    weights,
    version: int,
    rank: int,
    world: int,
    **rollout_kwargs,
) -> Sampled:
    """Roll out the plan in batches and score each batch as soon as it is sampled.

    Every batch is submitted at once; a reward actor's ``score`` waits on its batch's images
    (an object reference), so scoring overlaps the sampling of the following batches.
    ``timings`` (seconds of this call): how long the learner waited for every batch to be
    sampled and then for the scores not yet done; the samplers' time rolling out and waiting;
    the reward actors' time scoring and waiting (from when each batch's images and scores
    became ready, as seen from the learner).
    """
    return submit_rollouts(
        plan, samplers, rewards, batch_size, weights, version, rank, world, **rollout_kwargs
    ).collect()


def submit_rollouts(
    plan: EpochPlan,
    samplers: list,
    rewards: list,
    batch_size: int,
    weights,
    version: int,
    rank: int,
    world: int,
    **rollout_kwargs,
) -> Submitted:
    """``sample_and_score``'s calls, submitted and not waited for: ``.collect()`` waits."""
    t0 = time.perf_counter()
    traj_refs, score_refs, image_refs, scorer_of, samplers_used = [], [], [], [], set()
    for b, start in enumerate(range(0, len(plan.prompts), batch_size)):
        sl = slice(start, start + batch_size)
        samplers_used.add((rank + b * world) % len(samplers))
        sampler = samplers[(rank + b * world) % len(samplers)]
        traj_ref, images_ref = sampler.rollout.remote(
            plan.prompts[sl], plan.seeds[sl], weights, version, **rollout_kwargs
        )
        scorer = (rank + b * world) % len(rewards)
        traj_refs.append(traj_ref)
        image_refs.append(images_ref)
        scorer_of.append(scorer)
        score_refs.append(rewards[scorer].score.remote(images_ref, plan.prompts[sl]))
    return Submitted(t0, traj_refs, image_refs, score_refs, scorer_of, len(samplers_used))


@dataclass
class Submitted:
    """An epoch's rollout and scoring calls in flight (``submit_rollouts``)."""

    t0: float  # when they were submitted (perf_counter)
    traj_refs: list
    image_refs: list
    score_refs: list
    scorer_of: list[int]  # the reward actor of each batch
    num_samplers: int  # the samplers they went to

    def collect(self) -> Sampled:
        """Wait for every batch and its scores: the ``Sampled`` rollouts with their ``timings``."""
        import ray

        from armature.policies import Trajectory

        t0, image_refs, score_refs, scorer_of = self.t0, self.image_refs, self.score_refs, self.scorer_of
        # When each batch's images and scores became ready, as the learner sees them (not fetched).
        pending = {ref: ("images", i) for i, ref in enumerate(image_refs)}
        pending.update({ref: ("score", i) for i, ref in enumerate(score_refs)})
        ready_at = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
            ready_at[pending.pop(done[0])] = time.perf_counter() - t0
        sampled_at = max(ready_at[("images", i)] for i in range(len(image_refs)))
        parts = ray.get(self.traj_refs)
        scores = ray.get(score_refs)
        done_at = time.perf_counter() - t0
        reward, components = score_batches(scores)
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
            "wait_sampling_s": sampled_at,  # from the submission until every batch is sampled
            "wait_rewards_after_sampling_s": done_at - sampled_at,  # scoring not hidden behind sampling
            "sampler_busy_s": sampler_busy,
            "sampler_wait_s": max(0.0, self.num_samplers * sampled_at - sampler_busy),
            "reward_busy_s": reward_busy,
            "reward_wait_s": max(0.0, len(set(scorer_of)) * done_at - reward_busy),
        }
        return Sampled(Trajectory.concat(parts), reward, components, image_refs, timings)


class RolloutAhead:
    """An on-policy learner's rollouts, sampled in step with the learner or one epoch ahead.

    ``submit(epoch, weights, version)`` sends epoch ``epoch``'s rollout calls (Ray calls: it
    returns at once) and returns what the job collects them by. ``take(epoch, weights,
    version)``, at the top of an epoch with the learner's current weights, returns that handle
    and the epoch's ``staleness``: ``version`` (the weights the learner trains now) minus the
    version the rollouts were sampled with.

    * ``ahead=0`` (``trainer.rollout_ahead=0``): the epoch's rollouts are submitted now, with the
      current weights; the samplers idle while the learner trains. Staleness 0.
    * ``ahead=1``: the epoch's rollouts were submitted one epoch earlier, with that epoch's
      weights, and ``take`` submits the next epoch's with the current weights before returning:
      the samplers roll out epoch k+1 while the learner trains on epoch k. A sampler's calls run
      in order, so the new weights reach it (through the object store, by version) between two
      rollouts, never during one. Staleness 1 (0 for a run's or a resume's first epoch); the
      learner corrects with the log-probabilities recorded at rollout.

    The job draws an epoch's prompts and seeds from (seed, epoch) alone, so a seed repeats the
    same samples and metrics for a given ``ahead``.
    """

    def __init__(self, submit: Callable[[int, Any, int], Any], ahead: int, num_epochs: int):
        if ahead not in (0, 1):
            raise ValueError(f"trainer.rollout_ahead={ahead}: use 0 (in step) or 1 (one epoch ahead)")
        self.submit, self.ahead, self.num_epochs = submit, ahead, num_epochs
        self.pending: dict[int, tuple[Any, int]] = {}  # epoch -> (handle, version sampled with)

    def take(self, epoch: int, weights, version: int) -> tuple[Any, int]:
        if epoch in self.pending:
            handle, sampled_with = self.pending.pop(epoch)
        else:
            handle, sampled_with = self.submit(epoch, weights, version), version
        if self.ahead and epoch + 1 < self.num_epochs:
            self.pending[epoch + 1] = (self.submit(epoch + 1, weights, version), version)
        staleness = version - sampled_with
        if not 0 <= staleness <= self.ahead:
            raise RuntimeError(f"epoch {epoch}: rollouts {staleness} weight versions behind (bound {self.ahead})")
        return handle, staleness


def idle_shares(learner_wait_s: float, sampler_busy_s: float, num_samplers: int, epoch_s: float) -> dict[str, float]:
    """The epoch's ``learner_idle_share`` (its wait for rollouts over the epoch's time) and
    ``sampler_idle_share`` (1 - the samplers' time rolling out this epoch's samples over their
    time in the epoch; with rollouts one epoch ahead the samples trained on were rolled out
    during the previous epoch, which in a steady run took as long)."""
    return {
        "learner_idle_share": learner_wait_s / epoch_s,
        "sampler_idle_share": max(0.0, 1.0 - sampler_busy_s / (num_samplers * epoch_s)),
    }


def score_batches(scores: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The reward actors' answers for a list of batches joined: ``(reward [N], components)``."""
    reward = np.concatenate([s["reward"] for s in scores]).astype(np.float32)
    components = {k: np.concatenate([s[k] for s in scores]) for k in scores[0] if k != "reward"}
    return reward, components


def reward_metrics(components: dict[str, np.ndarray]) -> dict[str, float]:
    """What each reward component reports about its scores (its ``summary``):
    ``reward_<name>_mean`` and any others, e.g. a rate of failures."""
    from armature.rewards import summarize

    return {
        f"reward_{name}_{key}": value
        for name, scores in components.items()
        for key, value in summarize(name, np.asarray(scores)).items()
    }


def reward_summary_line(m: dict, prefix: str = "reward_") -> str:
    """``  <component> <key> <value>`` for every summary metric besides the components' means."""
    extra = [
        f"{k[len(prefix) :]} {v:.3f}"
        for k, v in m.items()
        if k.startswith(prefix) and not k.endswith(("_mean", "_std"))
    ]
    return "".join(f"  {e}" for e in extra)


def print_progress(epoch: int, total: int, m: dict) -> None:
    """The progress line of an on-policy learner's epoch."""
    done = epoch + 1
    bar = "#" * int(20 * done / total) + "-" * (20 - int(20 * done / total))
    print(
        f"[armature] [{bar}] epoch {done}/{total}  reward {m['reward_mean']:+.4f} ± {m['reward_std']:.4f}"
        + reward_summary_line(m)
        + f"  kl {m.get('approx_kl', float('nan')):.2e}  clip {m.get('clipfrac', float('nan')):.2f}"
        + f"  {m['epoch_time_s']:.1f}s",
        flush=True,
    )
