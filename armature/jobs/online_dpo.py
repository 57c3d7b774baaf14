"""Online Diffusion-DPO from human feedback (D3PO-style): the policy samples pairs, people (or a
simulated annotator) label them through the preference store, the learner trains on the labels
so far, and the samplers get the new weights. ``armature train algo=online_dpo``.

Read top to bottom. The driver (``run``: the learner core's, ``armature.platform.learner``)
opens the MLflow run, starts the sampler actors and the reward actors (``reward.*``: the
pre-filter's reward), and hands Ray Train the learner loop. Each round (``train_loop``; the store work happens on rank 0):

  1. **Sample** ``pairs_per_round / prefilter_keep`` pairs from the current policy: two images
     per prompt slot, each with its own seed (``epoch_plan`` with groups of 2), through the
     sampler actors with the learner's weights (version = round + 1, fetched by a sampler only
     when its version differs). The reward actors score every image meanwhile.
  2. **Pre-filter and store:** each pair's reward uncertainty ``1 / (1 + |r_a - r_b| / median)``
     (``armature.feedback.simulated.uncertainty``) is its priority in the store (the labeling
     page serves the most uncertain first); with ``prefilter_keep < 1`` only that share, most
     uncertain first, is stored at all: human effort goes where the reward is unsure
     (``prefilter_order=confident`` keeps the clearest gaps instead: fewer near-ties to label).
  3. **Label:** ``annotator=simulated``: ``num_annotators`` simulated annotators (the reward
     ``annotator_reward`` with ``annotator_noise`` flips and ``annotator_tie_rate`` ties) label
     through the store like people; ``annotator=human``: wait until people have given
     ``min_labels_per_round`` new labels on the page (``armature label serve --db <store>``).
  4. **Stream the labels** (Ray Data): the store exports every labeled pair (majority label per
     pair) in the pair Parquet format; ``armature.data.stream`` validates, decodes, resizes and
     splits it (held out by a hash of the pair id, ``data.heldout_fraction``).
  5. **Learn:** ``epochs_per_round`` passes of Diffusion-DPO (eq. 14 of Wallace et al.; the DPO
     job's ``pair_errors`` and loss, imported) over the training pairs so far.
  6. **Measure and log** an MLflow step per round: label counts, inter-annotator agreement
     (percent and Fleiss' kappa), the learner's loss, and its held-out implicit accuracy
     against the annotators' labels (the DPO job's ``evaluate_heldout``): on every held-out pair so
     far (``heldout_*``) and on a fixed probe (``probe_*``: with ``probe_pairs`` > 0, that many
     base-policy pairs labeled before round 1 and never trained on; else round 1's held-out
     pairs); checkpoint (a rerun resumes
     at the next round; the store keeps every pair and label).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig

from armature.data.stream import PROBE_PREFIX
from armature.jobs.dpo import evaluate_heldout, native_size, pair_errors, result
from armature.losses import diffusion_dpo_loss, margin_bounded_loss
from armature.platform.algorithms import Algorithm, register
from armature.platform.config import DataConfig, OptimizerConfig, TrainConfig
from armature.platform.engine import all_reduce_mean
from armature.platform.learner import (
    LoopInputs,
    RolloutAhead,
    Worker,
    epoch_plan,
    idle_shares,
    prompt_list,
    quarantine_metrics,
    run_learner,
    submit_rollouts,
)


# ============================================================================ config
@dataclass
class OnlineDPOConfig(OptimizerConfig):
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
    adam_weight_decay: float = 0.0
    beta: float = 5000.0  # Diffusion-DPO's KL strength
    alpha: float = 0.0  # ASAP's region weight (the online pairs have no masks: 0)
    tau: Optional[float] = None
    prediction_type: Optional[str] = None
    heldout_draws: int = 4
    probe_pairs: int = 0  # >0: a fixed probe of that many pairs from the base policy, labeled first, never trained on


def check(cfg: DictConfig) -> list[str]:
    """Rounds, the pre-filter, the annotators, the loss and the held-out split."""
    algo, errors = cfg.algo, []
    if algo.num_rounds < 1 or algo.pairs_per_round < 1 or algo.epochs_per_round < 1:
        errors.append("algo.num_rounds, algo.pairs_per_round and algo.epochs_per_round must be >= 1")
    if algo.probe_pairs < 0:
        errors.append(
            f"algo.probe_pairs={algo.probe_pairs}: use 0 (the first round's held-out pairs are the probe) "
            "or a number of pairs for a fixed probe, e.g. 96"
        )
    if not 0 < algo.prefilter_keep <= 1:
        errors.append(f"algo.prefilter_keep={algo.prefilter_keep}: must be in (0, 1] (1 keeps every pair)")
    if algo.prefilter_order not in ("uncertain", "confident"):
        errors.append(
            f"algo.prefilter_order={algo.prefilter_order}: use uncertain (the pairs the reward is least "
            "sure of first) or confident (the clearest gaps first)"
        )
    if algo.annotator not in ("simulated", "human"):
        errors.append(f"algo.annotator={algo.annotator}: use simulated or human")
    if algo.annotator == "simulated" and not algo.annotator_reward:
        errors.append(
            "algo.annotator_reward is empty: name the simulated annotator's reward, e.g. {brightness: {weight: 1}}"
        )
    if not 0 <= algo.annotator_noise <= 1 or not 0 <= algo.annotator_tie_rate <= 1:
        errors.append(
            f"algo.annotator_noise={algo.annotator_noise}, algo.annotator_tie_rate={algo.annotator_tie_rate}: "
            "probabilities in [0, 1]"
        )
    if algo.labels_per_pair < 1 or (algo.annotator == "simulated" and algo.labels_per_pair > algo.num_annotators):
        errors.append(
            f"algo.labels_per_pair={algo.labels_per_pair}: must be >= 1 and, with simulated annotators, "
            f"<= algo.num_annotators={algo.num_annotators}"
        )
    if algo.beta <= 0 or algo.prediction_type not in (None, "epsilon", "v_prediction"):
        errors.append(f"algo.beta={algo.beta} must be > 0; algo.prediction_type: epsilon, v_prediction or null")
    if not 0 < cfg.data.heldout_fraction < 1:
        errors.append(
            f"data.heldout_fraction={cfg.data.heldout_fraction}: online_dpo measures held-out accuracy, "
            "use a value in (0, 1), e.g. 0.25"
        )
    return errors


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Run the online feedback loop as configured; returns the last round's metrics."""
    return run_learner(cfg, train_loop, actors=True, extra_cpus=cfg.data.decode_num_cpus, prepare=_prepare)


register(Algorithm("online_dpo", OnlineDPOConfig, run, check, result, rollout_ahead=True))


def _prepare(job, samplers: list, rewards: list) -> LoopInputs:
    store_url = job.cfg.algo.store or f"{_local_dir(job.run_dir)}/feedback.db"
    print(f"[armature] preference store {store_url}", flush=True)
    return LoopInputs({"store": store_url, "work_dir": _local_dir(job.run_dir)})


def _local_dir(run_dir: str) -> str:
    if "://" in run_dir:
        from armature.platform.config import ConfigError

        raise ConfigError(
            f"trainer.storage_path={run_dir}: algo=online_dpo keeps its label exports in the "
            "run folder, so it needs a local trainer.storage_path (the store may still be a "
            "database URL: algo.store)"
        )
    return run_dir


# ============================================================================ learner
def train_loop(config: dict) -> None:
    import ray
    import ray.data
    import torch.distributed as dist

    from armature.feedback.store import PreferenceStore

    w = Worker(config)
    c, algo, data, rank, world, seed = w.c, w.algo, w.c.data, w.rank, w.world, w.seed
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    data_context.execution_options.preserve_order = True  # a seeded run is repeatable

    policy = w.build_policy()
    frozen = None if policy.lora is not None else copy.deepcopy(policy.unet).requires_grad_(False)
    prediction_type = algo.prediction_type or policy.scheduler.config.prediction_type
    engine = w.start(policy, algo.gradient_accumulation_batches, route=False)

    def errors(batch, generator=None, train=True):
        return pair_errors(
            policy, engine if train else engine.module, batch, algo.alpha, prediction_type, frozen, generator, train
        )

    def loss_fn(errs, tie):
        if algo.tau is not None:
            return margin_bounded_loss(*errs, tau=algo.tau, tie=tie)
        return diffusion_dpo_loss(*errs, beta=algo.beta, tie=tie)

    start_round = w.start_epoch
    store = PreferenceStore(config["store"], labels_per_pair=algo.labels_per_pair) if rank == 0 else None
    annotators = _simulated_annotators(algo, seed) if rank == 0 and algo.annotator == "simulated" else []
    work = Path(config["work_dir"])
    quarantine = data.quarantine_path or str(work / "quarantine")
    prompts = prompt_list(c.prompts)
    size = data.image_size or native_size(c.model)  # the size the samplers draw at
    if rank == 0 and algo.probe_pairs and start_round == 0:
        # ---- 0. the fixed probe: base-policy pairs, labeled first, held out for good ------------
        t_probe = time.perf_counter()
        engine.module.eval()
        probe_info = _sample_into_store(
            store,
            -1,
            prompts,
            config["samplers"],
            config["rewards"],
            [ray.put(policy.trainable_state_dict())],
            c,
            seed,
            probe=True,
        )
        probe_info.update(
            _collect_labels(store, annotators, algo, -1, wanted=probe_info["pairs_new"] * algo.labels_per_pair)
        )
        print(
            f"[armature] probe: {probe_info['pairs_new']} base-policy pairs, {probe_info['labels_new']} labels, "
            f"{time.perf_counter() - t_probe:.1f}s",
            flush=True,
        )

    def submit(rnd: int, weights, version: int):
        return _submit_pairs(store, rnd, prompts, config["samplers"], config["rewards"], weights, version, c, seed)

    # trainer.rollout_ahead=1: the samplers draw round r+1's pairs (with the weights before round
    # r's update) while round r is labeled and trained on. Diffusion-DPO needs no correction: its
    # loss compares the policy with the frozen reference on each pair, never with the policy
    # that drew it; the stored pairs say which version drew them (policy_version).
    rollouts = RolloutAhead(submit, w.trainer.rollout_ahead, algo.num_rounds)
    for rnd in range(start_round, algo.num_rounds):
        t_round = time.perf_counter()
        engine.module.eval()
        metrics: dict = {"epoch": rnd, "round": rnd, "policy_version": rnd + 1}
        if rank == 0:
            # ---- 1-2. sample pairs with the current weights; pre-filter; into the store -----
            weights = [ray.put(policy.trainable_state_dict())]
            submitted, metrics["staleness"] = rollouts.take(rnd, weights, rnd + 1)
            metrics.update(_store_pairs(store, rnd, submitted, algo))
            t_label = time.perf_counter()
            metrics["sample_time_s"] = t_label - t_round
            # ---- 3. labels: simulated annotators, or people on the labeling page -------------
            metrics.update(_collect_labels(store, annotators, algo, rnd))
            metrics["label_time_s"] = time.perf_counter() - t_label
            counts = store.counts()
            metrics.update({f"store_{k}": v for k, v in counts.items()})
            metrics.update({f"annotators_{k}": v for k, v in store.agreement().items()})
            export = work / "labels" / f"round_{rnd:04d}.parquet"
            metrics["exported_pairs"] = store.export(export)
        if dist.is_initialized():
            dist.barrier()
        export = work / "labels" / f"round_{rnd:04d}.parquet"

        # ---- 4. the labels so far, through the Ray Data pipeline ------------------------------
        train_ds, heldout_ds = _label_datasets(export, size, quarantine, data)
        t_train = time.perf_counter()

        # ---- 5. Diffusion-DPO passes over the labeled training pairs ---------------------------
        engine.module.train()
        stats = []
        for epoch in range(algo.epochs_per_round):
            batches = list(
                train_ds.iter_torch_batches(
                    batch_size=algo.train_batch_size,
                    drop_last=True,
                    collate_fn=_collate(),
                    local_shuffle_buffer_size=4 * algo.train_batch_size,
                    local_shuffle_seed=seed * 10_000 + rnd * 100 + epoch,
                )
            )
            usable = len(batches) // world * world  # every rank takes as many steps
            for batch in batches[rank:usable:world]:
                loss, info = loss_fn(errors(batch), batch["tie"].to(policy.device))
                w.step(loss)
                stats.append({"loss": loss.item(), **{k: v.item() for k, v in info.items() if k != "num_pairs"}})
        policy.weights_version = rnd + 1
        if stats:
            metrics.update(all_reduce_mean({k: float(np.mean([s[k] for s in stats])) for k in stats[0]}))
        metrics["train_batches"] = len(stats)
        metrics["train_time_s"] = time.perf_counter() - t_train

        # ---- 6. held-out implicit accuracy against the annotators; log; checkpoint -----------
        if rank == 0:
            probe_prefix = PROBE_PREFIX if algo.probe_pairs else "r0000-"
            rounds_ds = (
                heldout_ds.filter(lambda row: not str(row["pair_id"]).startswith(PROBE_PREFIX))
                if algo.probe_pairs
                else heldout_ds
            )
            metrics.update(evaluate_heldout(rounds_ds, errors, loss_fn, engine, algo, seed))
            # The held-out set grows each round with pairs from the moving policy; the probe
            # stays fixed and compares round with round: algo.probe_pairs pairs of the base
            # policy, labeled before round 1, or else the first round's held-out pairs.
            probe = heldout_ds.filter(lambda row, prefix=probe_prefix: str(row["pair_id"]).startswith(prefix))
            metrics.update(
                {
                    k.replace("heldout_", "probe_"): v
                    for k, v in evaluate_heldout(probe, errors, loss_fn, engine, algo, seed).items()
                }
            )
            metrics["probe_pairs"] = probe.count()
            metrics["train_pairs"], metrics["heldout_pairs"] = train_ds.count(), rounds_ds.count()
            metrics.update(quarantine_metrics(quarantine))
        metrics.update(w.optimizer_metrics())
        metrics["round_time_s"] = time.perf_counter() - t_round
        if "num_samplers" in metrics:  # rank 0, when the round sampled
            used = metrics.pop("num_samplers")
            metrics.update(
                idle_shares(metrics["sample_time_s"], metrics["sampler_busy_s"], used, metrics["round_time_s"])
            )
        if w.end_epoch(rnd, metrics, progress=_print_round, total=algo.num_rounds, checkpoint=True):
            break  # trainer.time_budget_s spent
    w.finish(policy)


# ============================================================================ helpers
def _simulated_annotators(algo: OnlineDPOConfig, seed: int) -> list:
    from armature.feedback.simulated import SimulatedAnnotator
    from armature.rewards import load_weighted

    reward = load_weighted(algo.annotator_reward)
    return [
        SimulatedAnnotator(
            reward, name=f"sim-{i}", noise=algo.annotator_noise, tie_rate=algo.annotator_tie_rate, seed=seed
        )
        for i in range(algo.num_annotators)
    ]


def _sample_into_store(
    store,
    rnd: int,
    prompts: list[str],
    samplers: list,
    rewards: list,
    weights,
    c: TrainConfig,
    seed: int,
    probe: bool = False,
) -> dict:
    """Sample the round's pairs and store ``prefilter_keep`` of them, the most uncertain first
    (``prefilter_order=confident``: the clearest first). A
    resumed round whose pairs are already stored samples nothing.

    ``probe``: instead, the fixed probe: ``algo.probe_pairs`` pairs from the base policy (every
    one kept), stored as round -1 with ids ``probe-NNNNN``, which the pair stream always holds out."""
    submitted = _submit_pairs(store, rnd, prompts, samplers, rewards, weights, rnd + 1, c, seed, probe)
    return _store_pairs(store, rnd, submitted, c.algo, probe)


def _submit_pairs(
    store, rnd: int, prompts, samplers, rewards, weights, version: int, c: TrainConfig, seed: int, probe: bool = False
):
    """The round's pair rollouts, submitted: ``(plan, Submitted, version)``, or None when the
    round's pairs are already stored (a resumed round)."""
    algo = c.algo
    if store.counts_by_round().get(rnd, 0):
        return None
    wanted = algo.probe_pairs if probe else algo.pairs_per_round
    n_sampled = wanted if probe else int(np.ceil(wanted / algo.prefilter_keep))
    # 2 images per prompt slot; the probe draws its slots and seeds apart from every round's
    plan = epoch_plan(prompts, seed + 104_729 if probe else seed, max(rnd, 0), n_sampled, 2, rank=0, world=1)
    batch = c.sampling.batch_size
    return plan, submit_rollouts(plan, samplers, rewards, batch, weights, version, 0, 1), version


def _store_pairs(store, rnd: int, submitted, algo, probe: bool = False) -> dict:
    """Wait for ``_submit_pairs``'s rollouts; store the pre-filtered pairs."""
    from armature.feedback.simulated import select_pairs, uncertainty

    if submitted is None:
        return {"pairs_new": 0, "pairs_sampled": 0}
    plan, pending, version = submitted
    wanted = algo.probe_pairs if probe else algo.pairs_per_round
    n_sampled = len(plan.prompts) // 2
    sampled = pending.collect()
    scores, images = sampled.rewards, sampled.images()
    unsure = uncertainty(scores[0::2], scores[1::2])
    keep = select_pairs(unsure, wanted, "uncertain" if probe else algo.prefilter_order)
    prefix = PROBE_PREFIX if probe else f"r{rnd:04d}-"
    store.add_pairs(
        {
            "pair_id": f"{prefix}{k:05d}",
            "prompt": plan.prompts[2 * k],
            "image_a": images[2 * k],
            "image_b": images[2 * k + 1],
            "policy_version": version,
            "round": rnd,
            "priority": float(unsure[k]),
            "source": f"online:v{version}",
        }
        for k in sorted(keep.tolist())
    )
    return {
        "pairs_new": len(keep),
        "pairs_sampled": n_sampled,
        "prefilter_uncertainty_kept": float(unsure[keep].mean()),
        "prefilter_uncertainty_all": float(unsure.mean()),
        "reward_mean": float(np.mean(scores)),
        "sampler_busy_s": sampled.timings["sampler_busy_s"],
        "num_samplers": pending.num_samplers,
    }


def _collect_labels(store, annotators: list, algo: OnlineDPOConfig, rnd: int, wanted: int | None = None) -> dict:
    """Simulated annotators label everything they are served; for people, wait for ``wanted``
    new labels (default ``min_labels_per_round``, else every new pair's; or ``label_timeout_s``)."""
    before = store.counts()["labels"]
    if annotators:
        for annotator in annotators:
            annotator.label(store)
    else:
        if wanted is None:
            wanted = algo.min_labels_per_round or algo.pairs_per_round * algo.labels_per_pair
        deadline = time.time() + algo.label_timeout_s
        last_note = 0.0
        while store.counts()["labels"] - before < wanted and time.time() < deadline:
            if time.time() - last_note > 60:
                print(
                    f"[armature] round {rnd}: {store.counts()['labels'] - before}/{wanted} new labels; "
                    f"label at `armature label serve --db {store.url}`",
                    flush=True,
                )
                last_note = time.time()
            time.sleep(2.0)
    return {"labels_new": store.counts()["labels"] - before}


def _label_datasets(export: Path, size: int, quarantine: str, data: DataConfig):
    """(training, held-out) Ray Datasets of the exported labels: validated, decoded, resized."""
    from armature.data.stream import prepare, read_dataset, split

    ds = prepare(
        read_dataset(str(export)),
        size,
        quarantine,
        keep_ties=data.keep_ties,
        heldout_fraction=data.heldout_fraction,
        batch_size=data.batch_size,
        num_cpus=data.decode_num_cpus,
    ).materialize()
    return split(ds)


def _collate():
    from armature.data.stream import collate

    return collate


def _print_round(rnd: int, total: int, m: dict) -> None:
    heldout = (
        f"  held-out acc {m['heldout_implicit_acc']:.3f} (by pair {m['heldout_pair_acc']:.3f})"
        if "heldout_implicit_acc" in m
        else ""
    )
    if "probe_implicit_acc" in m:
        heldout += (
            f", probe {m['probe_implicit_acc']:.3f} (by pair {m['probe_pair_acc']:.3f}, {m['probe_pairs']} pairs)"
        )
    agreement = m.get("annotators_agreement", float("nan"))
    print(
        f"[armature] round {rnd + 1}/{total}  pairs +{m.get('pairs_new', 0)}  labels +{m.get('labels_new', 0)} "
        f"(total {m.get('store_labels', 0)}, agreement {agreement:.2f})  loss {m.get('loss', float('nan')):.4f}"
        f"{heldout}  {m['round_time_s']:.1f}s",
        flush=True,
    )
