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

import numpy as np
from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict:
    """Run a Best-of-N job as configured; returns the kept-vs-single reward summary."""
    import ray

    from armature.actors import start_reward_actors, start_samplers
    from armature.actors.best_of_n import best_of_n
    from armature.jobs.ddpo import _prompt_list
    from armature.platform.launch import open_run
    from armature.platform.tracking import RunLogger

    cluster, reward = cfg.cluster, cfg.reward
    job = open_run(cfg, cluster.num_samplers * cluster.sampler_num_cpus + reward.num_actors * reward.num_cpus)
    c, algo = job.cfg, job.cfg["algo"]
    logger = RunLogger(job.tracking_uri, job.run_id)
    samplers = rewards = []
    try:
        samplers = start_samplers(
            cluster.num_samplers, c["model"], c["sampling"], seed=c["trainer"]["seed"],
            num_cpus=cluster.sampler_num_cpus, num_gpus=cluster.sampler_num_gpus, max_restarts=cluster.max_restarts,
            threads=job.threads, resources=c["cluster"]["sampler_resources"], scheduling=cluster.actor_scheduling,
        )
        rewards = start_reward_actors(
            reward.num_actors, c["reward"]["components"], num_cpus=reward.num_cpus, num_gpus=reward.num_gpus,
            max_restarts=cluster.max_restarts, resources=c["reward"]["resources"], scheduling=cluster.actor_scheduling,
        )
        prompts = _prompt_list(c["prompts"]) * algo["repeats"]
        result = best_of_n(samplers, rewards, prompts, algo["n"], algo["k"], seed=c["trainer"]["seed"],
                           batch_size=c["sampling"]["batch_size"])
        metrics = {"epoch": 0, "n": algo["n"], "k": algo["k"], **result.summary()}
        metrics["reward_mean"] = metrics["kept_reward_mean"]

        if algo["pairs_path"]:
            from armature.data.pairs import write_pairs

            metrics["pairs_written"] = write_pairs(result.preference_pairs(f"best_of_{algo['n']}"), algo["pairs_path"])
            print(f"[armature] {int(metrics['pairs_written'])} (best, worst) pairs written to {algo['pairs_path']}",
                  flush=True)
        logger.log_metrics(metrics, step=0)
        logger.log_text(json.dumps(_candidate_table(result), indent=1), "candidates.json")
        for i in range(min(algo["log_prompts"], len(prompts))):
            order = result.order[i]
            logger.log_images(result.images[i, order[: algo["k"]]], f"candidates/prompt_{i:03d}_kept.png")
            if algo["k"] < algo["n"]:
                logger.log_images(result.images[i, order[algo["k"]:]], f"candidates/prompt_{i:03d}_rejected.png")
        logger.log_text(json.dumps(c, indent=2, default=str), "config.json")
        _print_summary(metrics)
    except BaseException:
        logger.finish("FAILED")
        raise
    finally:
        for actor in samplers + rewards:
            ray.kill(actor)
    logger.finish("FINISHED")
    return metrics


def _candidate_table(result) -> list[dict]:
    rank = np.argsort(result.order, axis=1)  # rank[i, j]: position of candidate j, 0 = best
    rows = []
    for i, prompt in enumerate(result.prompts):
        for j in range(result.n):
            rows.append({
                "prompt_index": i, "prompt": prompt, "candidate": j, "seed": int(result.seeds[i, j]),
                "reward": float(result.scores[i, j]), "rank": int(rank[i, j]), "kept": bool(rank[i, j] < result.k),
                **{f"reward_{name}": float(v[i, j]) for name, v in result.components.items()},
            })
    return rows


def _print_summary(m: dict) -> None:
    print(f"[armature] best-of-{int(m['n'])} (keep {int(m['k'])}), {int(m['candidates'])} candidates, "
          f"{m['seconds_per_prompt']:.2f} s per prompt", flush=True)
    print("[armature]            mean      std   median      p90", flush=True)
    for name in ("single", "kept"):
        print(f"[armature] {name:>7} {m[name + '_reward_mean']:+8.4f} {m[name + '_reward_std']:8.4f} "
              f"{m[name + '_reward_p50']:+8.4f} {m[name + '_reward_p90']:+8.4f}", flush=True)
