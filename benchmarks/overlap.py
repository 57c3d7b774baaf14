"""Epoch sampling-and-scoring time with rewards overlapped with the rollouts vs in sequence.

    python benchmarks/overlap.py                         # tiny flow model, tiny random aesthetic scorer
    python benchmarks/overlap.py --reward compressibility --samplers 2

Same work both ways: the same batches (same prompts and per-sample seeds) on the same sampler
and reward actors. *Overlapped* is what the GRPO and NFT learners do
(``armature.platform.learner.sample_and_score``): every rollout is submitted at once and each
batch's images go straight from its sampler to a reward actor, which scores them while the
next batches are still being sampled. *In sequence* waits for every rollout, then scores.
Prints each mode's median time over the repeats and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_flow", choices=["tiny_flow", "tiny"])
    parser.add_argument("--reward", default="aesthetic")
    parser.add_argument("--samplers", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8, help="prompt slots per epoch")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    import ray

    from armature.actors import start_reward_actors, start_samplers
    from armature.platform.learner import epoch_plan, sample_and_score

    ray.init(num_cpus=max(4, args.samplers + 2), log_to_driver=False)
    model = {"family": args.model, "lora": {"enabled": False}}
    sampling = {"num_steps": args.steps, "guidance_scale": 1.0}
    samplers = start_samplers(args.samplers, model, sampling, seed=0, num_cpus=1, num_gpus=0, max_restarts=0, threads=1)
    options = {"weight": 1.0}
    if args.reward == "aesthetic":  # the tiny random aesthetic scorer (CLIP tower + MLP head), built here
        import tempfile

        from armature.rewards import build_tiny_aesthetic

        options["path"] = str(Path(tempfile.mkdtemp()) / "aesthetic")
        build_tiny_aesthetic(options["path"])
    rewards = start_reward_actors(1, {args.reward: options}, num_cpus=1, num_gpus=0, max_restarts=0)
    plan = epoch_plan(["a cat", "a dog", "a horse", "a rabbit"], 0, 0, args.prompts, args.group_size, 0, 1)

    def sequential():
        refs, image_refs = [], []
        for b, start in enumerate(range(0, len(plan.prompts), args.batch)):
            sl = slice(start, start + args.batch)
            traj_ref, images_ref = samplers[b % len(samplers)].rollout.remote(plan.prompts[sl], plan.seeds[sl])
            refs.append(traj_ref)
            image_refs.append(images_ref)
        ray.get(refs)
        ray.wait(image_refs, num_returns=len(image_refs))
        scores = ray.get(
            [
                rewards[0].score.remote(ref, plan.prompts[i * args.batch : (i + 1) * args.batch])
                for i, ref in enumerate(image_refs)
            ]
        )
        return np.concatenate([s["reward"] for s in scores])

    def overlapped():
        return sample_and_score(plan, samplers, rewards, args.batch, None, 0, 0, 1).rewards

    assert np.array_equal(sequential(), overlapped()), "the two modes scored different images"  # also warms up
    times = {"sequence": [], "overlapped": []}
    for _ in range(args.repeats):
        for name, fn in (("sequence", sequential), ("overlapped", overlapped)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    seq, ovl = statistics.median(times["sequence"]), statistics.median(times["overlapped"])
    print(
        f"model {args.model}, reward {args.reward}, {len(plan.prompts)} samples in batches of {args.batch}, "
        f"{args.steps} steps, {args.samplers} sampler actor(s), 1 reward actor, {args.repeats} repeats"
    )
    print(f"{'mode':<12}{'median s':>10}{'min s':>10}")
    for name in times:
        print(f"{name:<12}{statistics.median(times[name]):>10.3f}{min(times[name]):>10.3f}")
    print(f"in sequence / overlapped: {seq / ovl:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
