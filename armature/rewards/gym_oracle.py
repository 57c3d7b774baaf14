"""The anatomy gym's oracle as a reward: ``-severity`` of each image (0 best, -3 severe).

Images of another size are resized to the gym's 64×64 with nearest-neighbour sampling (the
oracle reads colours exactly, so no blending). As a judge (``armature eval``) it passes an image
when the score is ``>= -threshold_severity + 1``, i.e. with ``algo.judge.threshold=0`` only
defect-free figures pass; ``-2.5`` lets minor and moderate errors through (severe only fail).
"""

from __future__ import annotations

import numpy as np
import PIL.Image

from armature.gym.figures import SIZE
from armature.gym.oracle import AnatomyOracle

from .base import Reward
from .registry import register

SEVERE_SCORE = -3.0  # the oracle's score of a severe error (severity 3)


@register("gym_oracle")
class GymOracleReward(Reward):
    name = "gym_oracle"

    def __init__(self, colour_radius: float = 70.0, min_area: int = 4):
        self.oracle = AnatomyOracle(colour_radius=colour_radius, min_area=min_area)
        self.last_verdicts: list = []

    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        verdicts = []
        for image in images:
            image = image.convert("RGB")
            if image.size != (SIZE, SIZE):
                image = image.resize((SIZE, SIZE), PIL.Image.NEAREST)
            verdicts.append(self.oracle(np.asarray(image)))
        self.last_verdicts = verdicts
        return np.array([-v.severity for v in verdicts], dtype=np.float32)

    @classmethod
    def summary(cls, scores: np.ndarray) -> dict[str, float]:
        """The mean, and the share of images with a severe anatomical error (``severe_rate``)."""
        return {"mean": float(np.mean(scores)), "severe_rate": float(np.mean(np.asarray(scores) <= SEVERE_SCORE))}
