"""Reward interface shared by every scorer.

A reward maps a batch of generated images and the prompts that produced them to one
float per image, higher is better. Rewards know nothing about Ray or training: actors
elsewhere wrap these plain objects.

Differentiable rewards additionally expose :meth:`DifferentiableReward.score_tensor`,
which takes a float image tensor and returns scores with gradients flowing back to the
pixels (used for direct reward back-propagation).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np
import PIL.Image
import torch


class Reward(ABC):
    """Base class of all rewards.

    Subclasses implement :meth:`_score`; :meth:`__call__` validates the inputs and the
    shape and dtype of the result, so every reward returns ``float32`` of shape ``[B]``.
    """

    name: str = "reward"
    differentiable: bool = False

    def __call__(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> np.ndarray:
        images, prompts = self._validate(images, prompts)
        scores = np.asarray(self._score(images, prompts), dtype=np.float32)
        if scores.shape != (len(images),):
            raise RuntimeError(
                f"reward {self.name!r} returned scores of shape {scores.shape}, expected ({len(images)},)"
            )
        return scores

    @abstractmethod
    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        """Score already validated inputs; return one float per image."""

    @classmethod
    def summary(cls, scores: np.ndarray) -> dict[str, float]:
        """The metrics a learner logs for a set of this reward's scores (``reward_<name>_<key>``).
        A reward with more to say than the mean (e.g. a rate of failures) overrides this."""
        return {"mean": float(np.mean(scores))}

    @staticmethod
    def _validate(images, prompts) -> tuple[list[PIL.Image.Image], list[str]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        if isinstance(images, PIL.Image.Image):
            raise TypeError("images must be a list of PIL images, got a single image")
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; they must have the same length")
        for i, image in enumerate(images):
            if not isinstance(image, PIL.Image.Image):
                raise TypeError(f"images[{i}] is a {type(image).__name__}, expected a PIL.Image.Image")
        return images, prompts

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# the transformer towers of the tiny random reward models the tests and the default job build
# (CLIP, BLIP, the aesthetic CLIP): 2 layers of width 32
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """Convert a PIL image to a float tensor ``[3, H, W]`` in ``[0, 1]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DifferentiableReward(Reward):
    """A reward computed by a torch function of the pixels.

    Subclasses implement :meth:`score_tensor`; their weights must be frozen
    (``requires_grad=False``, eval mode) so only the images receive gradients.
    """

    differentiable = True
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score ``images`` (float ``[B, 3, H, W]`` in ``[0, 1]``); returns ``[B]``, differentiable."""

    @staticmethod
    def _check_tensor(images: torch.Tensor, prompts: Sequence[str]) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor of shape [B, 3, H, W], got {shape}")
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            n = "a single str" if isinstance(prompts, str) else len(prompts)
            raise ValueError(f"got {images.shape[0]} images but {n} prompts; they must have the same length")

    @torch.no_grad()
    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        if not images:
            return np.zeros(0, dtype=np.float32)
        tensors = [pil_to_tensor(image) for image in images]
        if len({t.shape for t in tensors}) == 1:
            batches = [(torch.stack(tensors), prompts)]
        else:  # mixed sizes cannot be stacked: score one by one
            batches = [(t[None], [p]) for t, p in zip(tensors, prompts)]
        scores = [self.score_tensor(x.to(self.device), p).float().cpu() for x, p in batches]
        return torch.cat(scores).numpy()


def require_differentiable(reward: Reward, key: str = "reward.components", algo: str = "this learner") -> Reward:
    """Return ``reward`` if gradients can flow through it, else raise a ValueError naming ``key``.

    Reward-gradient learners (AlignProp, DRaFT, ReFL) backpropagate the reward into the policy,
    so the reward must expose :meth:`DifferentiableReward.score_tensor`.
    """
    if not getattr(reward, "differentiable", False) or not hasattr(reward, "score_tensor"):
        if isinstance(reward, WeightedSum):
            fixed = [n for n, r in reward.rewards.items() if not r.differentiable]
            what = f"the components {fixed} are"
        else:
            what = f"{reward.name!r} is"
        raise ValueError(
            f"{key}: {algo} backpropagates through the reward, but {what} not differentiable "
            "(e.g. JPEG size). Use a differentiable reward: reward=brightness, reward=colorfulness "
            "or reward=aesthetic (every component of a weighted sum must be differentiable)."
        )
    return reward


def check_weight(name: str, weight) -> float:
    """Return ``weight`` as a float, or raise ValueError if it is not a finite real number."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"weight of reward component {name!r} must be a finite number, got {weight!r}")
    return float(weight)


class WeightedSum(Reward):
    """``sum_i weight_i * reward_i``.

    Args:
        components: mapping ``name -> (reward, weight)``.
    """

    name = "weighted_sum"

    def __init__(self, components: Mapping[str, tuple[Reward, float]]):
        if not components:
            raise ValueError("WeightedSum needs at least one component")
        self.rewards: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        for name, (reward, weight) in components.items():
            if not isinstance(reward, Reward):
                raise TypeError(f"component {name!r} is a {type(reward).__name__}, expected a Reward")
            self.rewards[name] = reward
            self.weights[name] = check_weight(name, weight)
        self.differentiable = all(r.differentiable for r in self.rewards.values())

    def components(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Each component's raw (unweighted) scores, for logging."""
        images, prompts = self._validate(images, prompts)
        return {name: reward(images, prompts) for name, reward in self.rewards.items()}

    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        raw = self.components(images, prompts)
        total = np.zeros(len(images), dtype=np.float64)
        for name, scores in raw.items():
            total += self.weights[name] * scores.astype(np.float64)
        return total

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Differentiable weighted sum; only available when every component is differentiable."""
        if not self.differentiable:
            fixed = [n for n, r in self.rewards.items() if not r.differentiable]
            raise TypeError(f"WeightedSum is not differentiable: components {fixed} are not")
        return sum(self.weights[n] * r.score_tensor(images, prompts) for n, r in self.rewards.items())

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={w:g}" for n, w in self.weights.items())
        return f"WeightedSum({parts})"
