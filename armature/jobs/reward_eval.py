"""Reward evaluation on a pair dataset: ``armature train algo=reward_eval``.

Every reward of ``algo.rewards`` (label -> a reward spec as in ``reward.components``) scores
both images of every pair in its own Ray reward actors (``reward.num_cpus|num_gpus`` each,
``algo.num_actors`` per reward); the driver streams the pairs (``data.pairs``, or the reward
model job's synthetic pairs) through the same validation as the learners. Per reward:

* ``acc``: pairwise accuracy with ties excluded (``s_w > s_l``);
* ``acc_ties``: accuracy with ties included -- a pair is predicted a tie when
  ``|s_w - s_l| <= eps``, ``eps`` tie-calibrated on the data (``eps`` is reported);
* ``spearman_severity``: Spearman's rho between the score and minus the severity label of
  each image (BACON's 0-3; images without one are left out): higher = fewer errors scored higher;
* agreement between each two rewards: the share of pairs they order the same way.

The table goes to MLflow as ``reward_eval.md`` and ``reward_eval.json`` artifacts, the numbers as
metrics ``<label>/<metric>``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig

from armature.losses.reward_model import agreement, pairwise_accuracy, spearman, tie_calibrated_accuracy
from armature.platform.algorithms import Algorithm, register


# ============================================================================ config
@dataclass
class RewardEvalConfig:
    """Reward evaluation (armature/jobs/reward_eval.py) on a pair dataset."""

    name: str = "reward_eval"
    # label -> reward spec ({registered name: {weight, **options}}), each scored in its own actors
    rewards: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16  # pairs per scoring call
    num_actors: int = 1  # per reward


def run(cfg: DictConfig) -> dict:
    import ray
    import ray.data

    from armature.actors import start_reward_actors
    from armature.data.stream import read_dataset
    from armature.jobs.reward_model import RewardModelConfig, prepare_with_severity, synthetic_pairs
    from armature.platform.launch import open_run
    from armature.platform.tracking import RunLogger

    algo = cfg.algo
    if not algo.rewards:
        raise ValueError(
            "algo.rewards is empty: name at least one reward, e.g. 'algo.rewards={jpeg: {compressibility: {}}}'"
        )
    job = open_run(cfg, len(algo.rewards) * algo.num_actors * cfg.reward.num_cpus + 1, job="reward_eval")
    c = job.cfg
    algo, data, reward_cfg = c.algo, c.data, c.reward
    ray.data.DataContext.get_current().enable_progress_bars = False
    size = data.image_size or 32
    synthetic = RewardModelConfig(synthetic_choices=3, synthetic_tie_fraction=0.1)  # the drawings' choice sets
    pairs = data.pairs or synthetic_pairs(f"{job.run_dir}/synthetic_pairs", data, synthetic, size, c.trainer.seed)
    ds = (
        read_dataset(pairs, allow_outside_root=data.allow_outside_root)
        .map_batches(
            prepare_with_severity,
            batch_format="pyarrow",
            batch_size=data.batch_size,
            fn_kwargs={
                "size": size,
                "quarantine_dir": data.quarantine_path or f"{job.run_dir}/quarantine",
                "keep_ties": True,
                "heldout_fraction": 0.0,
            },
        )
        .materialize()
    )

    actors = {
        label: start_reward_actors(
            algo.num_actors,
            dict(spec),
            num_cpus=reward_cfg.num_cpus,
            num_gpus=reward_cfg.num_gpus,
            max_restarts=0,
            resources=reward_cfg.resources,
        )
        for label, spec in algo.rewards.items()
    }
    scores = {label: {"w": [], "l": []} for label in actors}
    tie, severity_w, severity_l = [], [], []
    for i, batch in enumerate(ds.iter_batches(batch_size=algo.batch_size, batch_format="numpy")):
        prompts = [str(p) for p in batch["prompt"]]
        futures = {
            label: (
                pool[i % len(pool)].score.remote(batch["pixels_w"], prompts),
                pool[i % len(pool)].score.remote(batch["pixels_l"], prompts),
            )
            for label, pool in actors.items()
        }
        for label, (fw, fl) in futures.items():
            scores[label]["w"].append(ray.get(fw)["reward"])
            scores[label]["l"].append(ray.get(fl)["reward"])
        tie.append(batch["tie"]), severity_w.append(batch["severity_w"]), severity_l.append(batch["severity_l"])
    for pool in actors.values():
        for actor in pool:
            ray.kill(actor)

    tie = np.concatenate(tie)
    severity = np.concatenate([np.concatenate(severity_w), np.concatenate(severity_l)])
    rows, metrics = [], {}
    for label, s in scores.items():
        s_w, s_l = np.concatenate(s["w"]), np.concatenate(s["l"])
        both = np.concatenate([s_w, s_l])
        known = severity >= 0
        acc_ties, eps = tie_calibrated_accuracy(s_w, s_l, tie) if tie.any() else (float("nan"), float("nan"))
        row = {
            "reward": label,
            "pairs": int(len(s_w)),
            "ties": int(tie.sum()),
            "acc": pairwise_accuracy(s_w, s_l, tie),
            "acc_ties": acc_ties,
            "tie_eps": eps,
            "spearman_severity": spearman(both[known], -severity[known]) if known.sum() > 2 else float("nan"),
        }
        rows.append(row)
        metrics.update({f"{label}/{k}": float(v) for k, v in row.items() if k != "reward"})
    agree = {}
    for a, b in itertools.combinations(scores, 2):
        d_a = np.concatenate(scores[a]["w"]) - np.concatenate(scores[a]["l"])
        d_b = np.concatenate(scores[b]["w"]) - np.concatenate(scores[b]["l"])
        agree[f"{a}:{b}"] = agreement(d_a, d_b)
        metrics[f"agreement/{a}:{b}"] = agree[f"{a}:{b}"]

    table = report_table(rows, agree)
    print(table, flush=True)
    logger = RunLogger(job.tracking_uri, job.run_id)
    logger.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=0)
    logger.log_text(table, "reward_eval.md")
    logger.log_text(json.dumps({"rows": rows, "agreement": agree}, indent=2), "reward_eval.json")
    logger.finish("FINISHED")
    return metrics


register(Algorithm("reward_eval", RewardEvalConfig, run))


def report_table(rows: list[dict], agree: dict[str, float]) -> str:
    """A Markdown table of the per-reward figures, then the pairwise agreements."""
    lines = [
        "| reward | pairs | ties | acc (ties excl.) | acc (ties incl.) | tie eps | Spearman vs -severity |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['reward']} | {r['pairs']} | {r['ties']} | {r['acc']:.3f} | {r['acc_ties']:.3f} | "
            f"{r['tie_eps']:.3g} | {r['spearman_severity']:.3f} |"
        )
    if agree:
        lines += ["", "| rewards (a:b) | agreement on pair order |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3f} |" for k, v in agree.items()]
    return "\n".join(lines)
