"""Fine-tuning a trained reward's scorers on new preference labels: the math of the on-policy
reward refresh (``refresh.*``, :mod:`armature.feedback.refresh` runs the loop, the reward actors
wrap this).

The trainable members of a reward are its convolutional scorers (:class:`ConvScorer`): the
``learned`` / ``gym_anatomy`` reward is one, or the mean of several (:class:`MeanOfScorers`); in a
weighted sum, the components the learner is trained on (weight != 0). Each member is fine-tuned on
its own, as each was trained: AdamW on the Bradley-Terry loss of its score difference
(``armature.losses.bradley_terry_loss``, a tie is a 50/50 target), for ``steps`` steps of
``batch_size`` pairs drawn with replacement by a seeded generator.

Weights travel as flat tensor dicts ``{"<component>.<member>.<parameter>": tensor}``
(:func:`trainable_state`, :func:`load_trainable_state`): what the checkpoint stores as
safetensors and the reward actors exchange.
"""

from __future__ import annotations

import numpy as np
import torch

from armature.losses.reward_model import bradley_terry_loss

from .base import Reward, WeightedSum, pil_to_tensor
from .conv_scorer import ConvScorer
from .learned import MeanOfScorers

__all__ = [
    "TRAINABLE_REWARDS",
    "trainable_scorers",
    "trainable_state",
    "load_trainable_state",
    "bradley_terry_step",
    "fine_tune",
]

# registered rewards that can hold convolutional scorers (the config check reads this list)
TRAINABLE_REWARDS = ("learned", "gym_anatomy")


def trainable_scorers(reward: Reward, name: str | None = None) -> dict[str, ConvScorer]:
    """``{"<component>.<member>": ConvScorer}`` of ``reward``: its conv scorers, and in a weighted
    sum those of the components with a nonzero weight (a monitor at weight 0 is never trained)."""
    if isinstance(reward, WeightedSum):
        out = {}
        for component, member in reward.rewards.items():
            if reward.weights[component] != 0:
                out.update(trainable_scorers(member, component))
        return out
    name = name or reward.name
    if isinstance(reward, ConvScorer):
        return {f"{name}.0": reward}
    if isinstance(reward, MeanOfScorers):
        return {f"{name}.{i}": m for i, m in enumerate(reward.members) if isinstance(m, ConvScorer)}
    return {}


def trainable_state(scorers: dict[str, ConvScorer]) -> dict[str, torch.Tensor]:
    """Every scorer's weights in one flat dict (CPU copies)."""
    return {
        f"{key}.{param}": value.detach().cpu().clone()
        for key, scorer in scorers.items()
        for param, value in scorer.net.state_dict().items()
    }


def load_trainable_state(scorers: dict[str, ConvScorer], state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`trainable_state` into the scorers; a scorer missing from it is an error."""
    for key, scorer in scorers.items():
        own = {p[len(key) + 1 :]: v for p, v in state.items() if p.startswith(key + ".")}
        if not own:
            raise KeyError(f"reward refresh: no weights for scorer {key!r} (have {sorted({*state})[:4]}...)")
        scorer.net.load_state_dict(own)


def bradley_terry_step(
    scorer: ConvScorer, optimizer: torch.optim.Optimizer, pixels_w: torch.Tensor, pixels_l: torch.Tensor, tie
) -> float:
    """One optimizer step of the Bradley-Terry loss on a batch: ``pixels_*`` float ``[B, 3, H, W]``
    in ``[0, 1]``, ``tie`` bool ``[B]``. Returns the loss before the step."""
    optimizer.zero_grad()
    tie = torch.as_tensor(np.asarray(tie, bool))
    prompts = [""] * len(pixels_w)  # a conv scorer reads the image alone
    loss = bradley_terry_loss(scorer.score_tensor(pixels_w, prompts), scorer.score_tensor(pixels_l, prompts), tie)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def to_pixels(images) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` (or a list of PIL images) -> float ``[N, 3, H, W]`` in ``[0, 1]``."""
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return torch.stack([pil_to_tensor(image) for image in images])


def fine_tune(
    scorers: dict[str, ConvScorer],
    images_w,
    images_l,
    tie,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """Fine-tune every scorer on the pairs (``images_w`` preferred to ``images_l`` unless ``tie``):
    ``steps`` AdamW steps (no weight decay) of ``batch_size`` pairs each. The scorers are left
    frozen and in eval mode again. Returns the mean loss of the first and of the last step."""
    if not scorers:
        raise ValueError("reward refresh: the trained reward has no trainable member (a conv scorer)")
    pixels_w, pixels_l = to_pixels(images_w), to_pixels(images_l)
    tie = torch.as_tensor(np.asarray(tie, bool))
    n = len(pixels_w)
    if n == 0 or len(pixels_l) != n or len(tie) != n:
        raise ValueError(f"reward refresh: {n} preferred, {len(pixels_l)} rejected images, {len(tie)} tie flags")
    first, last = [], []
    for i, key in enumerate(sorted(scorers)):
        scorer = scorers[key]
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        net = scorer.net.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=0.0)
        try:
            for step in range(steps):
                idx = torch.randint(n, (min(batch_size, n),), generator=generator)
                loss = bradley_terry_step(scorer, optimizer, pixels_w[idx], pixels_l[idx], tie[idx])
                if step == 0:
                    first.append(loss)
                if step == steps - 1:
                    last.append(loss)
        finally:
            net.eval().requires_grad_(False)
    return {"loss_first": float(np.mean(first)), "loss_last": float(np.mean(last))}
