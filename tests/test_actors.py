"""Sampler and reward actors on a real Ray cluster: rollouts, weight pushes, scoring."""

import numpy as np
import ray
import torch

from armature.actors import start_reward_actors, start_samplers
from armature.policies import build_policy
from armature.rewards import load

MODEL = {"family": "tiny", "lora": {"enabled": True, "rank": 2}}
SAMPLING = {"num_steps": 3, "guidance_scale": 2.0, "eta": 1.0}


def _samplers(n, max_restarts):
    # Same thread count as this process: float sums, hence latents, depend on it.
    return start_samplers(
        n, MODEL, SAMPLING, seed=0, num_cpus=0.5, num_gpus=0, max_restarts=max_restarts, threads=torch.get_num_threads()
    )


def test_sampler_rollout_weights_and_rewards(ray_cluster):
    samplers = _samplers(2, max_restarts=1)
    scorers = start_reward_actors(
        1,
        {"compressibility": {"weight": 2.0}, "incompressibility": {"weight": 0.5}},
        num_cpus=0.5,
        num_gpus=0,
        max_restarts=1,
    )
    prompts = ["a cat", "a dog"]

    # Two actors built from the same config sample the same trajectory for the same seed.
    (t0, i0), (t1, i1) = [s.rollout.remote(prompts, 7) for s in samplers]
    a, b = ray.get([t0, t1])
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert a.images is None and ray.get(i0).shape == (2, 32, 32, 3)

    # Weights pushed through the object store reach the actor (version-gated).
    learner = build_policy(MODEL, SAMPLING)
    with torch.no_grad():
        for p in learner.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = ray.put(learner.trainable_state_dict())
    traj, _ = samplers[0].rollout.remote(prompts, 7, [ref], 3)
    pushed = ray.get(traj)
    assert pushed.weights_version == 3 and ray.get(samplers[0].weights_version.remote()) == 3
    assert not torch.equal(pushed.latents, a.latents)
    local = learner.rollout(prompts, torch.Generator().manual_seed(7))
    torch.testing.assert_close(pushed.latents, local.latents, rtol=0, atol=1e-5)

    # The reward actor takes the images object directly and returns total and components.
    scores = ray.get(scorers[0].score.remote(i0, prompts))
    images = ray.get(i0)
    from PIL import Image

    pil = [Image.fromarray(x) for x in images]
    comp = load("compressibility")(pil, prompts)
    np.testing.assert_allclose(scores["compressibility"], comp, rtol=1e-6)
    np.testing.assert_allclose(scores["reward"], 2.0 * comp + 0.5 * -comp, rtol=1e-5)
    for actor in samplers + scorers:
        ray.kill(actor)


def test_killed_sampler_restarts_and_catches_up(ray_cluster):
    (sampler,) = _samplers(1, max_restarts=2)
    learner = build_policy(MODEL, SAMPLING)
    with torch.no_grad():
        for p in learner.trainable_parameters():
            p.add_(0.05)
    ref = ray.put(learner.trainable_state_dict())
    ray.get(sampler.rollout.remote(["a cat"], 1, [ref], 5)[0])
    pid = ray.get(sampler.__ray_call__.remote(lambda self: __import__("os").getpid()))
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    # The restarted actor lost its weights; the next rollout carries them and it reloads.
    traj = ray.get(sampler.rollout.remote(["a cat"], 1, [ref], 5)[0])
    assert traj.weights_version == 5
    local = learner.rollout(["a cat"], torch.Generator().manual_seed(1))
    torch.testing.assert_close(traj.latents, local.latents, rtol=0, atol=1e-5)
    ray.kill(sampler)
