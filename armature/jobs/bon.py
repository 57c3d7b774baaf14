"""Best-of-N as a job: ``armature train algo=bon`` (no training: an inference-time selection run).

For every prompt (``prompts.*``, each ``algo.repeats`` times) the sampler actors draw
``algo.n`` candidates and the reward actors score them with ``reward.components`` (one reward or
a weighted sum); the best ``algo.k`` are kept (``armature/actors/best_of_n.py`` has the library
call). Logged to MLflow:

* metrics: the reward distribution of the kept samples vs single samples (every candidate is
  a single sample): mean, std, median, 90th percentile, and the gain of the best over the mean;
* ``candidates.json``: every candidate's prompt, seed, reward (and components), rank and whether
  it was kept;
* ``candidates/prompt_NNN_kept.png`` and ``_rejected.png``: the chosen and rejected candidates of
  the first ``algo.log_prompts`` prompts, best first (their scores are in ``candidates.json``).

With ``algo.pairs_path`` set, each prompt's (best, worst) candidates are written as preference
pairs in the pair format (``armature/data/pairs.py``): ``armature train algo=dpo
data.pairs=<that file>`` trains on them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from omegaconf import DictConfig

from armature.platform.algorithms import Algorithm, register


# ============================================================================ config
@dataclass
class BestOfNConfig:
    """Best-of-N selection job (armature/jobs/bon.py): `armature train algo=bon`."""

    name: str = "bon"
    n: int = 8  # candidates per prompt
    k: int = 1  # kept per prompt
    repeats: int = 1  # each prompt of prompts.* this many times
    log_prompts: int = 4  # prompts whose kept and rejected candidates are logged as images
    pairs_path: Optional[str] = None  # write each prompt's (best, worst) as preference pairs (Parquet)


def check(cfg: DictConfig) -> list[str]:
    algo = cfg.algo
    if algo.n < 1 or not 1 <= algo.k <= algo.n or algo.repeats < 1:
        return [
            (f"algo.n={algo.n}, algo.k={algo.k}, algo.repeats={algo.repeats}: need n >= 1, 1 <= k <= n, repeats >= 1")
        ]
    return []


def run(cfg: DictConfig) -> dict:
    """Run a Best-of-N job as configured; returns the kept-vs-single reward summary."""
    from armature.actors.best_of_n import best_of_n
    from armature.platform.launch import open_run
    from armature.platform.learner import prompt_list, start_actors, stop_actors
    from armature.platform.tracking import RunLogger

    cluster, reward = cfg.cluster, cfg.reward
    job = open_run(cfg, cluster.num_samplers * cluster.sampler_num_cpus + reward.num_actors * reward.num_cpus)
    c, algo = job.cfg, job.cfg.algo
    logger = RunLogger(job.tracking_uri, job.run_id)
    samplers = rewards = []
    try:
        samplers, rewards = start_actors(job)
        prompts = prompt_list(c.prompts) * algo.repeats
        result = best_of_n(
            samplers,
            rewards,
            prompts,
            algo.n,
            algo.k,
            seed=c.trainer.seed,
            batch_size=c.sampling.batch_size,
        )
        metrics = {"epoch": 0, "n": algo.n, "k": algo.k, **result.summary()}
        metrics["reward_mean"] = metrics["kept_reward_mean"]

        if algo.pairs_path:
            from armature.data.pairs import write_pairs

            metrics["pairs_written"] = write_pairs(result.preference_pairs(f"best_of_{algo.n}"), algo.pairs_path)
            print(
                f"[armature] {int(metrics['pairs_written'])} (best, worst) pairs written to {algo.pairs_path}",
                flush=True,
            )
        logger.log_metrics(metrics, step=0)
        logger.log_text(json.dumps(_candidate_table(result), indent=1), "candidates.json")
        for i in range(min(algo.log_prompts, len(prompts))):
            order = result.order[i]
            logger.log_images(result.images[i, order[: algo.k]], f"candidates/prompt_{i:03d}_kept.png")
            if algo.k < algo.n:
                logger.log_images(result.images[i, order[algo.k :]], f"candidates/prompt_{i:03d}_rejected.png")
        logger.log_text(json.dumps(asdict(c), indent=2, default=str), "config.json")
        _print_summary(metrics)
    except BaseException:
        logger.finish("FAILED")
        raise
    finally:
        stop_actors(samplers + rewards)
    logger.finish("FINISHED")
    return metrics


register(Algorithm("bon", BestOfNConfig, run, check))


def _candidate_table(result) -> list[dict]:
    rank = np.argsort(result.order, axis=1)  # rank[i, j]: position of candidate j, 0 = best
    rows = []
    for i, prompt in enumerate(result.prompts):
        for j in range(result.n):
            rows.append(
                {
                    "prompt_index": i,
                    "prompt": prompt,
                    "candidate": j,
                    "seed": int(result.seeds[i, j]),
                    "reward": float(result.scores[i, j]),
                    "rank": int(rank[i, j]),
                    "kept": bool(rank[i, j] < result.k),
                    **{f"reward_{name}": float(v[i, j]) for name, v in result.components.items()},
                }
            )
    return rows


def _print_summary(m: dict) -> None:
    print(
        f"[armature] best-of-{int(m['n'])} (keep {int(m['k'])}), {int(m['candidates'])} candidates, "
        f"{m['seconds_per_prompt']:.2f} s per prompt",
        flush=True,
    )
    print("[armature]            mean      std   median      p90", flush=True)
    for name in ("single", "kept"):
        print(
            f"[armature] {name:>7} {m[name + '_reward_mean']:+8.4f} {m[name + '_reward_std']:8.4f} "
            f"{m[name + '_reward_p50']:+8.4f} {m[name + '_reward_p90']:+8.4f}",
            flush=True,
        )
