"""Rollout overhead: a sampler actor's rollout (with log-probs) vs a bare diffusers call.

Both run on the same tiny model, steps, guidance, eta and batch, each inside a Ray actor with
the same resources, measured alternately; the figure is the ratio of medians (target <= 1.05).
The in-process ratio (policy.rollout vs pipe()) is printed too, without Ray in between.

    python benchmarks/rollout.py [--steps 10] [--batch 8] [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args()

    import ray
    import torch

    from armature.actors.sampler import PolicySampler
    from armature.policies import build_policy

    model = {"family": "tiny", "lora": {"enabled": True}}
    sampling = {"num_steps": args.steps, "guidance_scale": args.guidance, "eta": 1.0}
    prompts = [f"a photo of animal {i}" for i in range(args.batch)]

    class BarePipeline:
        """The same pipeline (LoRA attached), called the plain diffusers way."""

        def __init__(self):
            torch.set_num_threads(args.threads)
            self.policy = build_policy(model, sampling)

        def generate(self, prompts, seed):
            start = time.perf_counter()
            self.policy.pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                eta=1.0,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
            )
            return time.perf_counter() - start

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sampler = ray.remote(PolicySampler).options(num_cpus=1).remote(model, sampling, 0, args.threads)
    bare = ray.remote(BarePipeline).options(num_cpus=1).remote()

    def timed_rollout(seed):
        start = time.perf_counter()
        traj, images = sampler.rollout.remote(prompts, seed)
        ray.get([traj, images])
        return time.perf_counter() - start

    for seed in range(3):  # warm up both
        timed_rollout(seed), ray.get(bare.generate.remote(prompts, seed))
    actor_times, bare_times = [], []
    for seed in range(args.repeats):
        actor_times.append(timed_rollout(seed))  # includes the Ray round trip
        bare_times.append(ray.get(bare.generate.remote(prompts, seed)))
    ray.shutdown()

    torch.set_num_threads(args.threads)
    policy = build_policy(model, sampling)
    local_rollout, local_bare = [], []
    for seed in range(args.repeats + 3):
        g = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        policy.rollout(prompts, g)
        t1 = time.perf_counter()
        policy.pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            eta=1.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        t2 = time.perf_counter()
        if seed >= 3:
            local_rollout.append(t1 - start)
            local_bare.append(t2 - t1)

    med = statistics.median
    print(f"tiny model, {args.steps} steps, batch {args.batch}, guidance {args.guidance}, {args.threads} threads")
    print(f"sampler actor rollout (Ray round trip, log-probs, latents): {med(actor_times) * 1e3:8.1f} ms")
    print(f"bare diffusers pipeline call in an actor:                   {med(bare_times) * 1e3:8.1f} ms")
    print(f"ratio actor / bare: {med(actor_times) / med(bare_times):.3f}   (target <= 1.05)")
    print(f"in-process ratio policy.rollout / pipe(): {med(local_rollout) / med(local_bare):.3f}")


if __name__ == "__main__":
    main()
