"""Reward normalisation into advantages, as in DDPO: per-prompt running statistics."""

from __future__ import annotations

from collections import deque

import numpy as np

__all__ = ["PerPromptStatTracker", "normalize_rewards"]


def normalize_rewards(rewards: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(r - mean) / (std + eps) over the whole batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return ((rewards - rewards.mean()) / (rewards.std() + eps)).astype(np.float32)


class PerPromptStatTracker:
    """Normalises each reward by the recent rewards of the same prompt.

    Each prompt keeps its last ``buffer_size`` rewards. A prompt with fewer than ``min_count``
    rewards seen so far falls back to the statistics of the whole batch (the global fallback).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size={buffer_size} and min_count={min_count} must be >= 1")
        if buffer_size < min_count:
            raise ValueError(
                f"buffer_size={buffer_size} < min_count={min_count}: per-prompt statistics would "
                "never be used; make buffer_size >= min_count"
            )
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.history: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        prompts_arr = np.asarray(prompts, dtype=object)
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        for prompt in dict.fromkeys(prompts):
            mask = prompts_arr == prompt
            buffer = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[mask] = (rewards[mask] - mean) / (std + self.eps)
        return advantages.astype(np.float32)

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "eps": self.eps,
            "history": {p: list(b) for p, b in self.history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.eps = state.get("eps", self.eps)
        self.history = {p: deque(v, maxlen=self.buffer_size) for p, v in state["history"].items()}
