"""Sampler actors: each holds a copy of the policy and rolls out trajectories on request."""

from __future__ import annotations

import time

import ray
import torch

from armature.policies import ModelConfig, SamplingParams, build_policy

__all__ = ["PolicySampler", "start_samplers"]


class PolicySampler:
    """A policy copy in a Ray actor. Weights arrive through the object store, never files.

    ``rollout`` takes the learner's current weights as ``[ObjectRef]`` (wrapped in a list so
    Ray does not fetch them eagerly) with their version; the actor only fetches and loads them
    when its own version differs. A restarted actor therefore catches up by itself, and a
    rollout is never made with stale weights.
    """

    def __init__(
        self, model: ModelConfig | dict, sampling: SamplingParams | dict, seed: int = 0, threads: int | None = None
    ):
        if threads:
            torch.set_num_threads(threads)
        self.policy = build_policy(model, sampling, seed=seed)

    def ready(self) -> bool:
        return True

    def weights_version(self) -> int:
        return self.policy.weights_version

    def load_adapter(self, directory: str) -> bool:
        """Load a trained adapter (or fine-tuned weights) saved by the learners."""
        self.policy.load_adapter(directory)
        return True

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        self.policy.load_trainable_state_dict(state, version=version)
        return version

    @ray.method(num_returns=2)
    def rollout(
        self,
        prompts: list[str],
        seed: int | list[int],
        weights: list | None = None,
        version: int = 0,
        num_steps: int | None = None,
        sde_window: tuple[int, int] | None = None,
    ):
        """Sample one trajectory per prompt. Returns ``(trajectory, images)``.

        ``seed``: one seed for the batch, or a list of one seed per prompt (then each sample is
        the same whichever actor draws it, in whatever batch). ``num_steps`` and ``sde_window``
        go to ``DiffusionPolicy.rollout`` (denoising reduction, MixGRPO's window).
        The images come back as a second object so that a reward actor can take them
        without the trajectory passing through the caller.
        """
        if weights and version != self.policy.weights_version:
            self.set_weights(ray.get(weights[0]), version)
        start = time.perf_counter()
        device = self.policy.device
        if isinstance(seed, (list, tuple)):
            generator = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
        else:
            generator = torch.Generator(device=device).manual_seed(seed)
        traj = self.policy.rollout(
            prompts, generator, num_steps=num_steps, sde_window=None if sde_window is None else tuple(sde_window)
        )
        traj.images, images = None, traj.images
        traj.elapsed_s = time.perf_counter() - start
        return traj, images


def start_samplers(
    n: int,
    model: ModelConfig | dict,
    sampling: SamplingParams | dict,
    *,
    seed: int,
    num_cpus: float,
    num_gpus: float,
    max_restarts: int,
    threads: int | None = None,
    resources: dict | None = None,
    scheduling: str = "DEFAULT",
) -> list:
    """``n`` sampler actors; a crashed one restarts and its in-flight rollouts are retried."""
    actor = ray.remote(PolicySampler).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=dict(resources or {}),
        scheduling_strategy=scheduling,
        max_restarts=max_restarts,
        max_task_retries=max_restarts if max_restarts else 0,
    )
    samplers = [actor.remote(model, sampling, seed, threads) for _ in range(n)]
    ray.get([s.ready.remote() for s in samplers])
    return samplers
