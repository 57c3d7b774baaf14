"""Reward actors: reward models scoring batches of images in Ray actors.

The models are frozen while they score; the on-policy reward refresh (``refresh.*``) fine-tunes
one actor's trainable members (``fine_tune``) and loads the new weights into the others
(``load_trainable``). The math is :mod:`armature.rewards.fine_tune`."""

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

    def trainable_state(self) -> dict:
        """The weights of the reward's trainable members (``{}`` when it has none)."""
        from armature.rewards.fine_tune import trainable_scorers, trainable_state

        return trainable_state(trainable_scorers(self.reward))

    def load_trainable(self, state: dict) -> bool:
        """Score with these weights of the trainable members from now on."""
        from armature.rewards.fine_tune import load_trainable_state, trainable_scorers

        load_trainable_state(trainable_scorers(self.reward), state)
        return True

    def fine_tune(self, images_w, images_l, tie, steps: int, learning_rate: float, batch_size: int, seed: int):
        """Fine-tune the trainable members on preference pairs (uint8 ``[N, H, W, 3]``, ``tie``
        bool ``[N]``); returns ``(their new weights, the losses)``."""
        from armature.rewards.fine_tune import fine_tune, trainable_scorers, trainable_state

        scorers = trainable_scorers(self.reward)
        info = fine_tune(scorers, images_w, images_l, tie, steps, learning_rate, batch_size, seed)
        return trainable_state(scorers), info

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
