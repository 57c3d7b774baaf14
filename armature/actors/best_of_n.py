"""Best-of-N: generate N candidates per prompt on the sampler actors, score them on the reward
actors, keep the best k.

Best-of-N is the simplest inference-time use of a reward model (BACON keeps the best of 10
samples by pose and neural scores): with candidates ``x_1..x_N ~ p(x | c)`` and reward ``r``,
the kept sample ``argmax_i r(x_i, c)`` has the distribution of the maximum of N draws of
``r(x, c)``, whose mean grows with N (about ``sigma * sqrt(2 log N)`` above the single-sample
mean for a Gaussian reward) at N times the sampling cost.

:func:`best_of_n` spreads the ``P * N`` candidates over the samplers in batches, hands each
finished batch of images straight to a reward actor (the images never pass through the
caller before they are scored) and ranks each prompt's candidates with
:func:`armature.rewards.selection.best_of` (the rule the serving generator uses too).
The result can be written as (best, worst) preference pairs for the DPO learners.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import ray

from armature.rewards.selection import rank_candidates

__all__ = ["BestOfN", "best_of_n"]


@dataclass
class BestOfN:
    """N scored candidates for each of P prompts; candidate ``j`` of prompt ``i`` is ``[i, j]``."""

    prompts: list[str]  # [P]
    images: np.ndarray  # [P, N, H, W, 3] uint8
    scores: np.ndarray  # [P, N] the (weighted) reward
    components: dict[str, np.ndarray] = field(default_factory=dict)  # each [P, N], unweighted
    seeds: np.ndarray | None = None  # [P, N] each candidate's seed
    k: int = 1
    elapsed_s: float = 0.0
    latents: np.ndarray | None = None  # [P, N, C, h, w] each candidate's final latent x_0 (keep_latents=True)

    @property
    def n(self) -> int:
        return self.scores.shape[1]

    @property
    def order(self) -> np.ndarray:
        """``[P, N]``: each prompt's candidates, best first."""
        return rank_candidates(self.scores)

    @property
    def kept(self) -> np.ndarray:
        """``[P, k]``: the indices of the kept candidates, best first."""
        return self.order[:, : self.k]

    @property
    def kept_scores(self) -> np.ndarray:
        return np.take_along_axis(self.scores, self.kept, axis=1)

    @property
    def kept_images(self) -> np.ndarray:
        """``[P, k, H, W, 3]``."""
        return np.stack([self.images[i, idx] for i, idx in enumerate(self.kept)])

    def summary(self) -> dict[str, float]:
        """The reward distribution of the kept samples vs single samples (every candidate is one)."""
        single, kept = self.scores.reshape(-1), self.kept_scores.reshape(-1)
        best = self.scores.max(axis=1)
        return {
            "single_reward_mean": float(np.mean(single)),
            "single_reward_std": float(np.std(single)),
            "single_reward_p50": float(np.median(single)),
            "single_reward_p90": float(np.quantile(single, 0.9)),
            "kept_reward_mean": float(np.mean(kept)),
            "kept_reward_std": float(np.std(kept)),
            "kept_reward_p50": float(np.median(kept)),
            "kept_reward_p90": float(np.quantile(kept, 0.9)),
            "best_reward_mean": float(np.mean(best)),
            "best_minus_single": float(np.mean(best) - np.mean(single)),
            "candidates": float(single.size),
            "seconds_per_prompt": self.elapsed_s / max(1, len(self.prompts)),
        }

    def preference_pairs(self, source: str = "best_of_n") -> list[dict]:
        """One (best, worst) pair per prompt in the pair format (``armature/data/pairs.py``);
        prompts whose best and worst candidates score the same give no pair."""
        records = []
        for i, order in enumerate(self.order):
            best, worst = order[0], order[-1]
            if not self.scores[i, best] > self.scores[i, worst]:
                continue
            records.append(
                {
                    "pair_id": f"{source}-{i:06d}",
                    "prompt": self.prompts[i],
                    "image_w": self.images[i, best],
                    "image_l": self.images[i, worst],
                    "label": "w",
                    "source": f"{source}:{self.scores[i, best]:.6g}>{self.scores[i, worst]:.6g}",
                }
            )
        return records


def best_of_n(
    samplers: list,
    rewards: list,
    prompts: list[str],
    n: int,
    k: int = 1,
    *,
    seed: int = 0,
    batch_size: int = 8,
    weights: list | None = None,
    version: int = 0,
    keep_latents: bool = False,
) -> BestOfN:
    """Sample ``n`` candidates for every prompt, score them and keep the best ``k`` of each.

    Args:
        samplers: ``PolicySampler`` actor handles (``armature.actors.start_samplers``).
        rewards: ``RewardScorer`` actor handles (``armature.actors.start_reward_actors``); their
            (weighted) ``reward`` ranks the candidates.
        prompts: P prompts.
        n: candidates per prompt (N >= 1); ``k``: how many to keep (1 <= k <= n).
        seed: the batches' seeds derive from it: the same call gives the same candidates.
        batch_size: candidates per sampler call.
        weights, version: optional policy weights (``[ray.put(state)]``) for the samplers, as
            the learners send them.
        keep_latents: also fetch each candidate's final latent (to train on it without a VAE
            round trip, as the preference-prefix job does).
    """
    import time

    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"best-of-n needs n >= 1 and 1 <= k <= n, got n={n}, k={k}")
    if not prompts:
        raise ValueError("best-of-n needs at least one prompt")
    if not samplers or not rewards:
        raise ValueError("best-of-n needs at least one sampler actor and one reward actor")
    start = time.perf_counter()
    flat = [p for p in prompts for _ in range(n)]  # candidate j of prompt i at i * n + j
    # One seed per candidate: a candidate is the same whichever actor draws it, in whatever batch.
    seeds = np.random.default_rng(seed).integers(2**31, size=len(flat))
    calls, trajectories = [], []
    for b, lo in enumerate(range(0, len(flat), batch_size)):
        batch = flat[lo : lo + batch_size]
        batch_seeds = [int(s) for s in seeds[lo : lo + batch_size]]
        traj_ref, images_ref = samplers[b % len(samplers)].rollout.remote(batch, batch_seeds, weights, version)
        calls.append((images_ref, rewards[b % len(rewards)].score.remote(images_ref, batch)))
        trajectories.append(traj_ref)
    images = np.concatenate(ray.get([ref for ref, _ in calls]))
    scored = ray.get([ref for _, ref in calls])
    shape = (len(prompts), n)
    scores = np.concatenate([s["reward"] for s in scored]).astype(np.float64).reshape(shape)
    components = {key: np.concatenate([s[key] for s in scored]).reshape(shape) for key in scored[0] if key != "reward"}
    latents = None
    if keep_latents:
        latents = np.concatenate([t.latents[:, -1].numpy() for t in ray.get(trajectories)])
        latents = latents.reshape(shape + latents.shape[1:])
    del trajectories
    return BestOfN(
        prompts=list(prompts),
        images=images.reshape(shape + images.shape[1:]),
        scores=scores,
        components=components,
        seeds=seeds.reshape(shape),
        k=k,
        elapsed_s=time.perf_counter() - start,
        latents=latents,
    )
