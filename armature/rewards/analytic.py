"""Analytic differentiable rewards: closed-form functions of the pixels, no weights.

They are cheap stand-ins for learned scorers when testing reward-gradient learners
(AlignProp, DRaFT, ReFL) on the tiny model, and work as real objectives too:

* ``brightness``: mean luma, ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601) averaged over
  the image; in ``[0, 1]``.
* ``colorfulness``: Hasler & Suesstrunk (2003), eq. 3 of "Measuring colourfulness in natural
  images", on pixels in ``[0, 1]``::

      rg = R - G,   yb = (R + G) / 2 - B
      M  = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)

  (population std and mean over the pixels of each image). A small epsilon inside the square
  roots keeps the gradient finite on a grey image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import DifferentiableReward
from .registry import register

__all__ = ["Brightness", "Colorfulness", "LUMA_WEIGHTS"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
_EPS = 1e-8


@register("brightness")
class Brightness(DifferentiableReward):
    """Mean BT.601 luma of the image, in [0, 1]; differentiable, no weights."""

    name = "brightness"

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_tensor(images, prompts)
        weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1).mean(dim=(1, 2))


@register("colorfulness")
class Colorfulness(DifferentiableReward):
    """Hasler & Suesstrunk's colourfulness M (eq. 3) on [0, 1] pixels; differentiable."""

    name = "colorfulness"

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_tensor(images, prompts)
        r, g, b = images.unbind(dim=1)
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        spread = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + _EPS).sqrt()
        offset = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + _EPS).sqrt()
        return spread + 0.3 * offset
