"""Online Diffusion-DPO from human feedback (D3PO-style): the policy samples pairs, people (or a
simulated annotator) label them through the preference store, the learner trains on the labels
so far, and the samplers get the new weights. ``armature train algo=online_dpo``.

Read top to bottom. The driver (``run``) opens the MLflow run, starts the sampler actors and the
reward actors (``reward.*``: the pre-filter's reward), and hands ``TorchTrainer`` the learner
loop. Each round (``train_loop``; the store work happens on rank 0):

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
     against the annotators' labels (the DPO job's ``_evaluate``): on every held-out pair so
     far (``heldout_*``) and on a fixed probe (``probe_*``: with ``probe_pairs`` > 0, that many
     base-policy pairs labeled before round 1 and never trained on; else round 1's held-out
     pairs); checkpoint (a rerun resumes
     at the next round; the store keeps every pair and label).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from armature.data.stream import PROBE_PREFIX
from armature.jobs.dpo import _evaluate, _native_size, _quarantine_metrics, pair_errors
from armature.jobs.online import (
    _all_reduce_mean,
    _prompt_list,
    epoch_plan,
    restore_checkpoint,
    sample_and_score,
    save_checkpoint,
    save_final,
)
from armature.losses import diffusion_dpo_loss, margin_bounded_loss
from armature.platform.engine import deepspeed_engine


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Run the online feedback loop as configured; returns the last round's metrics."""
    import ray
    from ray.train.torch import TorchTrainer

    from armature.actors import start_reward_actors, start_samplers
    from armature.platform.launch import fit, open_run, trainer_kwargs

    t, cl, rw, data = cfg.trainer, cfg.cluster, cfg.reward, cfg.data
    job = open_run(cfg, t.num_workers * t.cpus_per_worker + cl.num_samplers * cl.sampler_num_cpus
                   + rw.num_actors * rw.num_cpus + data.decode_num_cpus)
    c = job.cfg
    store_url = c["algo"]["store"] or f"{_local_dir(job.run_dir)}/feedback.db"
    print(f"[armature] preference store {store_url}", flush=True)
    samplers = start_samplers(
        cl.num_samplers, c["model"], c["sampling"], seed=t.seed, num_cpus=cl.sampler_num_cpus,
        num_gpus=cl.sampler_num_gpus, max_restarts=cl.max_restarts, threads=job.threads,
        resources=c["cluster"]["sampler_resources"], scheduling=cl.actor_scheduling)
    rewards = start_reward_actors(
        rw.num_actors, c["reward"]["components"], num_cpus=rw.num_cpus, num_gpus=rw.num_gpus,
        max_restarts=cl.max_restarts, resources=c["reward"]["resources"], scheduling=cl.actor_scheduling)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": c, "samplers": samplers, "rewards": rewards, "run_id": job.run_id,
                           "tracking_uri": job.tracking_uri, "threads": job.threads, "store": store_url,
                           "work_dir": _local_dir(job.run_dir)},
        **trainer_kwargs(job),
    )
    try:
        return fit(trainer, job)
    finally:
        for actor in samplers + rewards:
            ray.kill(actor)


def _local_dir(run_dir: str) -> str:
    if "://" in run_dir:
        from armature.platform.config import ConfigError

        raise ConfigError(f"trainer.storage_path={run_dir}: algo=online_dpo keeps its label exports in the "
                          "run folder, so it needs a local trainer.storage_path (the store may still be a "
                          "database URL: algo.store)")
    return run_dir


# ============================================================================ learner
def train_loop(config: dict) -> None:
    import ray
    import ray.train
    import torch.distributed as dist

    from armature.feedback.store import PreferenceStore
    from armature.platform.tracking import RunLogger
    from armature.policies import build_policy

    c = config["cfg"]
    algo, data, trainer_cfg = c["algo"], c["data"], c["trainer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = trainer_cfg["seed"]
    torch.manual_seed(seed + rank)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])

    import ray.data

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    data_context.execution_options.preserve_order = True  # a seeded run is repeatable

    policy = build_policy(c["model"], c["sampling"], seed=seed)
    frozen = None if policy.lora is not None else copy.deepcopy(policy.unet).requires_grad_(False)
    prediction_type = algo["prediction_type"] or policy.scheduler.config.prediction_type
    engine, optimizer, _ = deepspeed_engine(policy, algo, trainer_cfg, algo["gradient_accumulation_batches"])

    def errors(batch, generator=None, train=True):
        return pair_errors(policy, engine if train else engine.module, batch, algo["alpha"], prediction_type,
                           frozen, generator, train)

    def loss_fn(errs, tie):
        if algo["tau"] is not None:
            return margin_bounded_loss(*errs, tau=algo["tau"], tie=tie)
        return diffusion_dpo_loss(*errs, beta=algo["beta"], tie=tie)

    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    start_round, _, _ = restore_checkpoint(engine, logger)
    store = PreferenceStore(config["store"], labels_per_pair=algo["labels_per_pair"]) if rank == 0 else None
    annotators = _simulated_annotators(algo, seed) if rank == 0 and algo["annotator"] == "simulated" else []
    work = Path(config["work_dir"])
    quarantine = data["quarantine_path"] or str(work / "quarantine")
    prompts = _prompt_list(c["prompts"])
    size = data["image_size"] or _native_size(c["model"])  # the size the samplers draw at
    if rank == 0 and algo["probe_pairs"] and start_round == 0:
        # ---- 0. the fixed probe: base-policy pairs, labeled first, held out for good ------------
        t_probe = time.perf_counter()
        engine.module.eval()
        probe_info = _sample_into_store(store, -1, prompts, config["samplers"], config["rewards"],
                                        [ray.put(policy.trainable_state_dict())], c, seed, probe=True)
        probe_info.update(_collect_labels(store, annotators, algo, -1,
                                          wanted=probe_info["pairs_new"] * algo["labels_per_pair"]))
        print(f"[armature] probe: {probe_info['pairs_new']} base-policy pairs, {probe_info['labels_new']} labels, "
              f"{time.perf_counter() - t_probe:.1f}s", flush=True)
    for rnd in range(start_round, algo["num_rounds"]):
        t_round = time.perf_counter()
        engine.module.eval()
        metrics: dict = {"epoch": rnd, "round": rnd, "policy_version": rnd + 1}
        if rank == 0:
            # ---- 1-2. sample pairs with the current weights; pre-filter; into the store -----
            weights = [ray.put(policy.trainable_state_dict())]
            metrics.update(_sample_into_store(store, rnd, prompts, config["samplers"], config["rewards"],
                                              weights, c, seed))
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
        for epoch in range(algo["epochs_per_round"]):
            batches = list(train_ds.iter_torch_batches(
                batch_size=algo["train_batch_size"], drop_last=True, collate_fn=_collate(),
                local_shuffle_buffer_size=4 * algo["train_batch_size"],
                local_shuffle_seed=seed * 10_000 + rnd * 100 + epoch))
            usable = len(batches) // world * world  # every rank takes as many steps
            for batch in batches[rank:usable:world]:
                errs = errors(batch)
                loss, info = loss_fn(errs, batch["tie"].to(policy.device))
                engine.backward(loss)
                engine.step()
                stats.append({"loss": loss.item(), **{k: v.item() for k, v in info.items() if k != "num_pairs"}})
        policy.weights_version = rnd + 1
        if stats:
            metrics.update(_all_reduce_mean({k: float(np.mean([s[k] for s in stats])) for k in stats[0]}))
        metrics["train_batches"] = len(stats)
        metrics["train_time_s"] = time.perf_counter() - t_train

        # ---- 6. held-out implicit accuracy against the annotators; log; checkpoint -----------
        if rank == 0:
            probe_prefix = PROBE_PREFIX if algo["probe_pairs"] else "r0000-"
            rounds_ds = (heldout_ds.filter(lambda row: not str(row["pair_id"]).startswith(PROBE_PREFIX))
                         if algo["probe_pairs"] else heldout_ds)
            metrics.update(_evaluate(rounds_ds, errors, loss_fn, engine, algo, seed))
            # The held-out set grows each round with pairs from the moving policy; the probe
            # stays fixed and compares round with round: algo.probe_pairs pairs of the base
            # policy, labeled before round 1, or else the first round's held-out pairs.
            probe = heldout_ds.filter(lambda row: str(row["pair_id"]).startswith(probe_prefix))
            metrics.update({k.replace("heldout_", "probe_"): v
                            for k, v in _evaluate(probe, errors, loss_fn, engine, algo, seed).items()})
            metrics["probe_pairs"] = probe.count()
            metrics["train_pairs"], metrics["heldout_pairs"] = train_ds.count(), rounds_ds.count()
            from armature.data.stream import quarantine_summary

            metrics.update(_quarantine_metrics(quarantine_summary(quarantine)))
        metrics["learning_rate"] = optimizer.param_groups[0]["lr"]
        metrics["round_time_s"] = time.perf_counter() - t_round
        if logger is not None:
            _print_round(rnd, algo["num_rounds"], metrics)
        save_checkpoint(engine, {}, rnd, [(rnd, metrics)], rank)
        ray.train.get_all_reported_checkpoints()
        if logger is not None:
            logger.log_metrics(metrics, step=rnd)
    save_final(policy, logger, c)


# ============================================================================ helpers
def _simulated_annotators(algo: dict, seed: int) -> list:
    from armature.feedback.simulated import SimulatedAnnotator
    from armature.rewards import load_weighted

    reward = load_weighted(algo["annotator_reward"])
    return [SimulatedAnnotator(reward, name=f"sim-{i}", noise=algo["annotator_noise"],
                               tie_rate=algo["annotator_tie_rate"], seed=seed) for i in range(algo["num_annotators"])]


def _sample_into_store(store, rnd: int, prompts: list[str], samplers: list, rewards: list, weights, c: dict,
                       seed: int, probe: bool = False) -> dict:
    """Sample the round's pairs and store ``prefilter_keep`` of them, the most uncertain first
    (``prefilter_order=confident``: the clearest first). A
    resumed round whose pairs are already stored samples nothing.

    ``probe``: instead, the fixed probe: ``algo.probe_pairs`` pairs from the base policy (every
    one kept), stored as round -1 with ids ``probe-NNNNN``, which the pair stream always holds out."""
    import ray

    from armature.feedback.simulated import select_pairs, uncertainty

    algo = c["algo"]
    stored = store.counts_by_round().get(rnd, 0)
    if stored:
        return {"pairs_new": 0, "pairs_sampled": 0}
    wanted = algo["probe_pairs"] if probe else algo["pairs_per_round"]
    n_sampled = wanted if probe else int(np.ceil(wanted / algo["prefilter_keep"]))
    # 2 images per prompt slot; the probe draws its slots and seeds apart from every round's
    plan = epoch_plan(prompts, seed + 104_729 if probe else seed, max(rnd, 0), n_sampled, 2, rank=0, world=1)
    _, scores, _, image_refs, timings = sample_and_score(plan, samplers, rewards, c["sampling"]["batch_size"],
                                                         weights, rnd + 1, 0, 1)
    images = np.concatenate([ray.get(ref) for ref in image_refs])
    unsure = uncertainty(scores[0::2], scores[1::2])
    keep = select_pairs(unsure, wanted, "uncertain" if probe else algo["prefilter_order"])
    prefix = PROBE_PREFIX if probe else f"r{rnd:04d}-"
    store.add_pairs({"pair_id": f"{prefix}{k:05d}", "prompt": plan.prompts[2 * k],
                     "image_a": images[2 * k], "image_b": images[2 * k + 1], "policy_version": rnd + 1,
                     "round": rnd, "priority": float(unsure[k]), "source": f"online:v{rnd + 1}"}
                    for k in sorted(keep.tolist()))
    return {"pairs_new": len(keep), "pairs_sampled": n_sampled, "prefilter_uncertainty_kept": float(unsure[keep].mean()),
            "prefilter_uncertainty_all": float(unsure.mean()), "reward_mean": float(np.mean(scores)),
            "sampler_busy_s": timings["sampler_busy_s"]}


def _collect_labels(store, annotators: list, algo: dict, rnd: int, wanted: int | None = None) -> dict:
    """Simulated annotators label everything they are served; for people, wait for ``wanted``
    new labels (default ``min_labels_per_round``, else every new pair's; or ``label_timeout_s``)."""
    before = store.counts()["labels"]
    if annotators:
        for annotator in annotators:
            annotator.label(store)
    else:
        if wanted is None:
            wanted = algo["min_labels_per_round"] or algo["pairs_per_round"] * algo["labels_per_pair"]
        deadline = time.time() + algo["label_timeout_s"]
        last_note = 0.0
        while store.counts()["labels"] - before < wanted and time.time() < deadline:
            if time.time() - last_note > 60:
                print(f"[armature] round {rnd}: {store.counts()['labels'] - before}/{wanted} new labels; "
                      f"label at `armature label serve --db {store.url}`", flush=True)
                last_note = time.time()
            time.sleep(2.0)
    return {"labels_new": store.counts()["labels"] - before}


def _label_datasets(export: Path, size: int, quarantine: str, data: dict):
    """(training, held-out) Ray Datasets of the exported labels: validated, decoded, resized."""
    from armature.data.stream import prepare, read_dataset, split

    ds = prepare(read_dataset(str(export)), size, quarantine, keep_ties=data["keep_ties"],
                 heldout_fraction=data["heldout_fraction"], batch_size=data["batch_size"],
                 num_cpus=data["decode_num_cpus"]).materialize()
    return split(ds)


def _collate():
    from armature.data.stream import collate

    return collate


def _print_round(rnd: int, total: int, m: dict) -> None:
    heldout = (f"  held-out acc {m['heldout_implicit_acc']:.3f} (by pair {m['heldout_pair_acc']:.3f})"
               if "heldout_implicit_acc" in m else "")
    if "probe_implicit_acc" in m:
        heldout += f", probe {m['probe_implicit_acc']:.3f} (by pair {m['probe_pair_acc']:.3f}, {m['probe_pairs']} pairs)"
    agreement = m.get("annotators_agreement", float("nan"))
    print(f"[armature] round {rnd + 1}/{total}  pairs +{m.get('pairs_new', 0)}  labels +{m.get('labels_new', 0)} "
          f"(total {m.get('store_labels', 0)}, agreement {agreement:.2f})  loss {m.get('loss', float('nan')):.4f}"
          f"{heldout}  {m['round_time_s']:.1f}s", flush=True)
