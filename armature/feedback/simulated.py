"""A simulated annotator: any reward standing in for a person, with configurable noise and ties.

It labels through the store exactly like a person on the labeling page: it asks for its next
pair (served in the store's random left/right order), looks at the two images as shown, and
clicks left, right or no preference. Its click:

* ``none`` (a tie) with probability ``tie_rate``;
* otherwise the image with the higher reward, except that with probability ``noise`` it clicks
  the other one (a flip: its labels agree with the reward's ranking on ``1 - noise`` of the
  decided pairs, and two such annotators agree with each other on ``(1 - noise)^2 + noise^2``
  of them).

No Ray here: the online loop runs it where it likes.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

from armature.feedback.store import PreferenceStore

__all__ = ["SimulatedAnnotator", "uncertainty"]


class SimulatedAnnotator:
    """``reward``: an ``armature.rewards.Reward`` (PIL images, prompts) -> scores."""

    def __init__(self, reward, name: str = "sim-0", noise: float = 0.0, tie_rate: float = 0.0, seed: int = 0):
        if not 0 <= noise <= 1 or not 0 <= tie_rate <= 1:
            raise ValueError(f"noise={noise}, tie_rate={tie_rate}: both must be in [0, 1]")
        self.reward, self.name, self.noise, self.tie_rate = reward, name, float(noise), float(tie_rate)
        self.rng = random.Random(f"{seed}:{name}")

    def choose(self, score_left: float, score_right: float) -> str:
        """``left``, ``right`` or ``none`` for a shown pair with these rewards."""
        if self.rng.random() < self.tie_rate:
            return "none"
        better = "left" if score_left >= score_right else "right"
        if self.rng.random() < self.noise:
            better = "right" if better == "left" else "left"
        return better

    def label(self, store: PreferenceStore, limit: int | None = None) -> int:
        """Label up to ``limit`` pairs (all it is served when None); returns how many."""
        if self.name not in store.annotators():
            store.add_annotator(self.name)
        done = 0
        while limit is None or done < limit:
            pair = store.next_pair(self.name, self.rng)
            if pair is None:
                break
            sides = ("a", "b") if pair["left"] == "a" else ("b", "a")
            images = [Image.open(io.BytesIO(store.image(pair["pair_id"], s))).convert("RGB") for s in sides]
            scores = np.asarray(self.reward(images, [pair["prompt"]] * 2), dtype=np.float64)
            store.submit(self.name, pair["pair_id"], self.choose(float(scores[0]), float(scores[1])))
            done += 1
        return done


def uncertainty(score_a: np.ndarray, score_b: np.ndarray) -> np.ndarray:
    """How unsure a reward is about each pair, in (0, 1]: ``1 / (1 + |r_a - r_b| / m)`` with
    ``m`` the median gap of the batch (1 for a tie, 1/2 at the median gap, towards 0 for a
    clear winner). Rank-like, so rewards of any scale compare."""
    gap = np.abs(np.asarray(score_a, np.float64) - np.asarray(score_b, np.float64))
    scale = float(np.median(gap)) or 1.0
    return 1.0 / (1.0 + gap / scale)


def select_pairs(unsure: np.ndarray, keep: int, order: str = "uncertain") -> np.ndarray:
    """Indices of the ``keep`` pairs to label, by :func:`uncertainty`: ``uncertain`` takes the
    pairs the reward is least sure of (active learning: human effort where the reward cannot
    decide), ``confident`` the clearest gaps (cleaner labels, fewer near-ties). Ties in
    uncertainty keep sampling order."""
    if order not in ("uncertain", "confident"):
        raise ValueError(f"algo.prefilter_order={order!r}: use uncertain or confident")
    unsure = np.asarray(unsure, np.float64)
    return np.argsort(-unsure if order == "uncertain" else unsure, kind="stable")[:keep]
