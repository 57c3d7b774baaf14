"""Best-of-N: the mean reward of the kept sample vs N, and its cost in time per prompt.

For N = 1, 2, 4, 8, 16 a Best-of-N call (``armature.actors.best_of_n``) samples N candidates for
each of P prompts on the sampler actors, scores them on the reward actors and keeps the best
one; the table gives the kept mean (and its gain over the single-sample mean of the same call)
and the wall time per prompt. A last column estimates E[max of N] from the N = 16 pool exactly
(the expected maximum of a random N-subset of the 16 candidates), a lower-variance figure.

    python benchmarks/best_of_n.py [--reward compressibility] [--prompts 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's armature, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from armature.losses.evaluation import best_of_n_expectation  # noqa: E402

NS = (1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reward", default="compressibility")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import ray

    from armature.actors import start_reward_actors, start_samplers
    from armature.actors.best_of_n import best_of_n

    ray.init(num_cpus=4, log_to_driver=False)
    model = {"family": "tiny", "tiny": {"seed": 0, "image_size": 32}, "lora": {"enabled": False}}
    sampling = {"num_steps": args.steps, "guidance_scale": 1.0, "eta": 1.0}
    samplers = start_samplers(1, model, sampling, seed=0, num_cpus=1, num_gpus=0, max_restarts=0, threads=1)
    rewards = start_reward_actors(1, {args.reward: {}}, num_cpus=1, num_gpus=0, max_restarts=0)
    base = ["a cat", "a dog", "a horse", "a rabbit", "a person waving", "two hands", "a red car", "a tree"]
    prompts = [base[i % len(base)] for i in range(args.prompts)]
    best_of_n(samplers, rewards, prompts[:1], n=2, seed=99)  # warm-up

    rows, pool = [], None
    for n in NS:
        result = best_of_n(samplers, rewards, prompts, n=n, k=1, seed=1000 + n, batch_size=8)
        s = result.summary()
        rows.append(
            (n, s["kept_reward_mean"], s["kept_reward_mean"] - s["single_reward_mean"], s["seconds_per_prompt"])
        )
        pool = result.scores if n == NS[-1] else pool
    print(
        f"Best-of-N, reward {args.reward}, {len(prompts)} prompts, tiny model, {args.steps} steps, "
        "1 sampler + 1 reward actor"
    )
    print(
        f"{'N':>3} | {'kept mean':>10} | {'kept - single':>13} | {'E[max] (pool of 16)':>19} | {'s / prompt':>10} | cost vs N=1"
    )
    for n, kept, gain, seconds in rows:
        estimate = np.mean([best_of_n_expectation(p, p, n) for p in pool])
        print(
            f"{n:>3} | {kept:>+10.4f} | {gain:>+13.4f} | {estimate:>+19.4f} | {seconds:>10.3f} | {seconds / rows[0][3]:5.1f}x"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
