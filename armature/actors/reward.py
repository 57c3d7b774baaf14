"""Reward actors: frozen reward models scoring batches of images in Ray actors."""

from __future__ import annotations

import numpy as np
import ray
from PIL import Image

from armature.rewards import WeightedSum, load_weighted

__all__ = ["RewardScorer", "start_reward_actors"]


class RewardScorer:
    """A (weighted sum of) reward model(s), frozen, scoring uint8 image batches."""

    def __init__(self, components: dict):
        self.reward = load_weighted(components)

    def ready(self) -> bool:
        return True

    def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
        """``{"reward": [B], "<component>": [B], ...}`` for images ``[B, H, W, 3]`` uint8."""
        pil = [Image.fromarray(np.asarray(a)) for a in images]
        if not isinstance(self.reward, WeightedSum):  # one component: its own summary too (e.g. a severe rate)
            scores = self.reward(pil, prompts)
            return {"reward": scores, self.reward.name: scores}
        # each component scores once; the total is their weighted sum (as WeightedSum computes it)
        components = self.reward.components(pil, prompts)
        total = np.zeros(len(pil), dtype=np.float64)
        for name, values in components.items():
            total += self.reward.weights[name] * values.astype(np.float64)
        return {"reward": total.astype(np.float32), **components}

    def stats(self) -> dict[str, int]:
        """Counters the rewards keep (e.g. the MLLM judge's ``<attribute>/failed`` answers), by component."""
        rewards = self.reward.rewards if isinstance(self.reward, WeightedSum) else {self.reward.name: self.reward}
        return {
            f"{name}/{key}": int(value)
            for name, reward in rewards.items()
            for key, value in dict(getattr(reward, "stats", None) or {}).items()
        }


def start_reward_actors(
    n: int,
    components: dict,
    *,
    num_cpus: float,
    num_gpus: float,
    max_restarts: int,
    resources: dict | None = None,
    scheduling: str = "DEFAULT",
) -> list:
    """``n`` scorers; a crashed one restarts and its in-flight scoring calls are retried."""
    actor = ray.remote(RewardScorer).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=dict(resources or {}),
        scheduling_strategy=scheduling,
        max_restarts=max_restarts,
        max_task_retries=max_restarts if max_restarts else 0,
    )
    actors = [actor.remote(components) for _ in range(n)]
    ray.get([a.ready.remote() for a in actors])
    return actors
