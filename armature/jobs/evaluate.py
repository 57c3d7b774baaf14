"""Anatomy evaluation: ``armature eval`` (= ``armature train algo=eval``), no training.

Every policy of ``algo.policies`` (a name -> a trained adapter folder, or null for the base
model) draws ``algo.samples_per_prompt`` images for every prompt of the suite, with the same
seeds for every policy, on the sampler actors; the reward actors score them with
``reward.components``. One component is the **judge** (``algo.judge``): an image passes when
its score is ``>= algo.threshold``. The others are general-quality rewards, reported as means
so that a regression in overall quality shows.

Reported per policy (ASAP, seed 001, eqs. 7-8; the math is ``armature/losses/evaluation.py``):

* ``AER``: the share of samples the judge fails, overall and per suite category;
* ``RSI`` against the first policy: pairwise decisions on the judge's score for the same prompt
  and seed (higher wins, ``algo.tie_tolerance``), ``(wins + ties) / (losses + ties)``;
* the mean of every reward component;
* ``severe_rate`` (with ``algo.severe_at``): the share of samples the judge scores at or below it;
* ``sample_s``: seconds of sampling and scoring per kept image.

Best-of-N (``algo.best_of: [1, 4, 8]``, ``algo.selector``): each policy draws
``samples_per_prompt * max(N)`` candidates per prompt once; for every N the row ``<policy>+bonN``
keeps, in each group of candidates, the best of its first N by the selector reward (which must
not be the judge), so N = 1 is the plain policy and larger N reuse the same draws. Each such row also carries the
pool estimate (``pool/severe_rate`` and ``pool/judge``, the judge's mean; with ``algo.severe_at``): the exact
expectation, over every N-subset of a prompt's whole pool of candidates, of the judge at the
selector's pick (``best_of_n_expectation``), averaged over prompts. It measures the same thing
as the row from every draw instead of one group's first N (for N = 1: the mean over all
``samples_per_prompt * max(N)`` draws), so it is far steadier than the fixed-seed row.

The suite (``algo.suite``): ``gym`` (the anatomy gym's pose prompts, a category per pose), or a
file: JSONL lines ``{"prompt": ..., "category": ...}``, or plain text, one prompt a line.
Logged to MLflow: metrics, ``eval.md`` / ``eval.json`` and a sample grid per policy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import DictConfig

from armature.losses.evaluation import (
    anatomical_error_rate,
    best_of_n_expectation,
    pairwise_decisions,
    relative_superiority_index,
)
from armature.platform.algorithms import Algorithm, register


# ============================================================================ config
@dataclass
class EvalConfig:
    """Anatomy evaluation (armature/jobs/evaluate.py): `armature eval`, AER and RSI per policy."""

    name: str = "eval"
    suite: str = "gym"  # `gym` (the anatomy gym's pose prompts) or a JSONL / text file of prompts
    samples_per_prompt: int = 4  # the same seeds for every policy
    judge: str = "gym_oracle"  # the reward component that judges; an image passes at score >= threshold
    threshold: float = 0.0  # gym_oracle scores -severity: 0 passes only defect-free figures
    tie_tolerance: float = 0.0  # judge scores this close are a tie (RSI)
    severe_at: Optional[float] = None  # a judge score <= this counts as severe (gym_oracle: -3)
    # name -> a trained adapter folder (or null: the base model); RSI is against the first
    policies: dict[str, Optional[str]] = field(default_factory=lambda: {"base": None})
    # Best-of-N rows: for each N > 1, every policy also keeps the best of N candidates by the
    # reward component `selector` (never the judge, or the selection would be the answer)
    best_of: list[int] = field(default_factory=lambda: [1])
    selector: Optional[str] = None


def check(cfg: DictConfig) -> list[str]:
    """Samples and policies to evaluate; a selector other than the judge for Best-of-N rows."""
    algo, errors = cfg.algo, []
    if algo.samples_per_prompt < 1 or not algo.policies:
        errors.append(
            f"algo.samples_per_prompt={algo.samples_per_prompt}, algo.policies={dict(algo.policies)}: "
            "need at least one sample per prompt and one policy (name: adapter folder or null)"
        )
    if not algo.best_of or min(algo.best_of) < 1:
        errors.append(f"algo.best_of={list(algo.best_of)}: a list of N >= 1, e.g. [1, 4, 8]")
    elif max(algo.best_of) > 1 and (not algo.selector or algo.selector == algo.judge):
        errors.append(
            f"algo.best_of={list(algo.best_of)} needs algo.selector: a reward component other than "
            f"the judge ({algo.judge}) to rank the candidates, e.g. algo.selector=learned"
        )
    return errors


def result(metrics: dict) -> str:
    """The CLI's closing words."""
    return f"AER {metrics.get('aer', float('nan')):.3f}"


def load_suite(suite: str) -> list[tuple[str, str]]:
    """``[(prompt, category), ...]`` of a suite name or file."""
    if suite == "gym":
        from armature.gym.figures import POSES

        return [(prompt, name) for name, (prompt, _, _) in POSES.items()]
    path = Path(suite)
    if not path.is_file():
        raise FileNotFoundError(f"algo.suite={suite!r}: not a file (use `gym` or a JSONL / text file of prompts)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
                rows.append((str(record["prompt"]), str(record.get("category", "all"))))
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(
                    f'algo.suite={suite}: line {n} is not {{"prompt": ..., "category": ...}}: {err}'
                ) from err
        else:
            rows.append((line, "all"))
    if not rows:
        raise ValueError(f"algo.suite={suite}: no prompts in the file")
    return rows


def select_best_of(components: dict[str, np.ndarray], selector: str, samples: int, n: int) -> dict[str, np.ndarray]:
    """Best-of-``n`` from a pool of ``samples * N`` candidates per prompt (``[P, samples * N]``,
    candidate ``s * N + i`` the i-th of group s): in each group, the one of the first ``n``
    that ``selector`` scores highest. Returns every component at the kept candidates, ``[P, samples]``."""
    pool = {k: v.reshape(v.shape[0], samples, -1) for k, v in components.items()}
    pick = pool[selector][:, :, :n].argmax(-1)[..., None]  # [P, samples, 1]
    return {k: np.take_along_axis(v, pick, axis=-1)[..., 0] for k, v in pool.items()}


def pool_expectation(selector: np.ndarray, judge: np.ndarray, n: int, severe_at: float) -> dict[str, float]:
    """Best-of-``n`` over each prompt's whole pool (``[P, M]`` selector and judge scores): the
    expected judge score and severe share (judge ``<= severe_at``) of the selector's pick, exact
    over all ``n``-subsets of the M candidates, averaged over prompts."""
    severe = [best_of_n_expectation(s, j <= severe_at, n) for s, j in zip(selector, judge)]
    score = [best_of_n_expectation(s, j, n) for s, j in zip(selector, judge)]
    return {"pool/severe_rate": float(np.mean(severe)), "pool/judge": float(np.mean(score))}


def summarize(
    judge_scores: dict[str, np.ndarray],
    categories: list[str],
    threshold: float,
    tie_tolerance: float,
    components: dict[str, dict[str, np.ndarray]],
    severe_at: float | None = None,
) -> list[dict]:
    """One row per policy (``judge_scores[policy]``: ``[P, n]``; the first policy is the baseline)."""
    names = list(judge_scores)
    baseline = judge_scores[names[0]]
    cats = np.asarray(categories)
    rows = []
    for name in names:
        scores = judge_scores[name]
        passed = scores >= threshold
        row = {"policy": name, "samples": int(scores.size), "aer": anatomical_error_rate(passed.ravel())}
        if severe_at is not None:
            row["severe_rate"] = float(np.mean(scores <= severe_at))
        for category in dict.fromkeys(categories):
            row[f"aer/{category}"] = anatomical_error_rate(passed[cats == category].ravel())
        if name != names[0]:
            rsi = relative_superiority_index(pairwise_decisions(scores.ravel(), baseline.ravel(), tie_tolerance))
            row.update({f"rsi_{k}" if k != "rsi" else "rsi": v for k, v in rsi.items()})
        for component, values in components[name].items():
            row[f"mean/{component}"] = float(np.mean(values))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig) -> dict:
    """Evaluate every configured policy; returns the last policy's row (metrics)."""
    import ray

    from armature.actors import start_reward_actors, start_samplers
    from armature.actors.best_of_n import best_of_n
    from armature.platform.launch import open_run
    from armature.platform.tracking import RunLogger

    cluster, reward = cfg.cluster, cfg.reward
    algo = cfg.algo
    if algo.judge not in reward.components:
        raise ValueError(
            f"algo.judge={algo.judge!r} is not one of reward.components "
            f"{sorted(reward.components)}; add it, e.g. reward=gym_oracle"
        )
    suite = load_suite(algo.suite)
    prompts = [p for p, _ in suite]
    categories = [c for _, c in suite]
    job = open_run(cfg, cluster.num_samplers * cluster.sampler_num_cpus + reward.num_actors * reward.num_cpus)
    c = job.cfg
    logger = RunLogger(job.tracking_uri, job.run_id)
    rewards, judge_scores, components, samplers, seconds, pooled = [], {}, {}, [], {}, {}
    try:
        rewards = start_reward_actors(
            reward.num_actors,
            c.reward.components,
            num_cpus=reward.num_cpus,
            num_gpus=reward.num_gpus,
            max_restarts=cluster.max_restarts,
            resources=c.reward.resources,
            scheduling=cluster.actor_scheduling,
        )
        for name, adapter in c.algo.policies.items():
            samplers = start_samplers(
                cluster.num_samplers,
                c.model,
                c.sampling,
                seed=c.trainer.seed,
                num_cpus=cluster.sampler_num_cpus,
                num_gpus=cluster.sampler_num_gpus,
                max_restarts=cluster.max_restarts,
                threads=job.threads,
                resources=c.cluster.sampler_resources,
                scheduling=cluster.actor_scheduling,
            )
            if adapter:
                ray.get([s.load_adapter.remote(str(adapter)) for s in samplers])
            n = algo.samples_per_prompt * max(algo.best_of)  # the candidate pool; N = 1 is each group's first
            start = time.perf_counter()
            result = best_of_n(samplers, rewards, prompts, n, n, seed=c.trainer.seed, batch_size=c.sampling.batch_size)
            pool = dict(result.components) or {algo.judge: result.scores}
            per_candidate_s = (time.perf_counter() - start) / n / len(prompts)
            for best in sorted(set(algo.best_of)):
                row_name = name if best == 1 else f"{name}+bon{best}"
                kept = select_best_of(pool, algo.selector or algo.judge, algo.samples_per_prompt, best)
                judge_scores[row_name], components[row_name] = kept[algo.judge], kept
                seconds[row_name] = per_candidate_s * best
                if algo.severe_at is not None:
                    pooled[row_name] = pool_expectation(
                        pool[algo.selector or algo.judge], pool[algo.judge], best, algo.severe_at
                    )
            logger.log_images(result.images[:, 0][: c.tracking.images_per_grid], f"samples/{name}.png")
            for actor in samplers:
                ray.kill(actor)
            samplers = []
        rows = summarize(judge_scores, categories, algo.threshold, algo.tie_tolerance, components, algo.severe_at)
        for row in rows:
            row["sample_s"] = seconds[row["policy"]]  # sampling (and scoring) seconds per kept image
            row.update(pooled.get(row["policy"], {}))
        for step, row in enumerate(rows):
            logger.log_metrics(
                {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(float(v))},
                step=step,
            )
        table = markdown(rows)
        logger.log_text(table, "eval.md")
        logger.log_text(json.dumps(rows, indent=1, default=str), "eval.json")
        logger.log_text(json.dumps(asdict(c), indent=2, default=str), "config.json")
        print(
            f"[armature] judge {algo.judge} (pass: score >= {algo.threshold}), suite {algo.suite}, "
            f"{len(prompts)} prompts x {algo.samples_per_prompt} samples\n{table}",
            flush=True,
        )
    except BaseException:
        logger.finish("FAILED")
        raise
    finally:
        for actor in samplers + rewards:
            ray.kill(actor)
    logger.finish("FINISHED")
    return {"epoch": 0, **{k: v for k, v in rows[-1].items() if isinstance(v, (int, float))}}


register(Algorithm("eval", EvalConfig, run, check, result))
