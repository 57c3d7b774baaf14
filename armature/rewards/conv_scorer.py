"""A small convolutional image scorer: the ``learned`` reward's ``kind: conv``.

``armature train algo=reward_model algo.backbone=conv`` trains it on preference pairs with the
same losses as the CLIP scorer. It reads the image alone, no prompt: an anatomy scorer asks
whether a figure is whole, not whether it matches the words. Convolutions see the small parts
(hands, feet, a gap at a joint) that a tiny ViT's 8-pixel patches average away; on the anatomy
gym's decoded samples the tiny CLIP scorer ranked no better than chance.

Folder layout (beside the CLIP scorer's)::

    scorer/
      conv.safetensors   the weights
      scorer.json        {"kind": "conv", "image_size": 64, "widths": [32, 64, 64, 128], ...}
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import DifferentiableReward

WEIGHTS_FILE = "conv.safetensors"
SCORER_FILE = "scorer.json"
DEFAULT_WIDTHS = (32, 64, 64, 128)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
    )


class ConvNet(nn.Module):
    """Blocks of two 3x3 convolutions, 2x max-pooling between them, global average, one linear."""

    def __init__(self, widths: Sequence[int] = DEFAULT_WIDTHS):
        super().__init__()
        if not widths or any(int(w) % 8 for w in widths):
            raise ValueError(
                f"algo.conv_widths={list(widths)}: give one or more channel counts, each a multiple of 8 "
                "(GroupNorm of 8 groups)"
            )
        self.widths = [int(w) for w in widths]
        layers, cin = [], 3
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers.append(_block(cin, int(w)))
            cin = int(w)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> ``[B]``."""
        return self.head(self.features(pixels).mean(dim=(2, 3))).squeeze(1)


class ConvScorer(DifferentiableReward):
    """Score images (any size, resized to ``image_size``) with a :class:`ConvNet`; prompts unused."""

    def __init__(self, net: ConvNet, image_size: int = 64, device: str = "cpu", name: str = "learned"):
        self.net, self.image_size, self.name = net, int(image_size), name
        self.device = torch.device(device)
        self.net.to(self.device).eval().requires_grad_(False)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> the network's input."""
        images = images.to(self.device, torch.float32)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        return images * 2.0 - 1.0

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_tensor(images, prompts)
        return self.net(self.pixels(images))

    def save(self, folder: str, **meta) -> None:
        """``conv.safetensors`` + ``scorer.json`` (kind, image size, widths and ``meta``)."""
        import json

        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, os.path.join(folder, WEIGHTS_FILE))
        with open(os.path.join(folder, SCORER_FILE), "w") as f:
            json.dump({"kind": "conv", "image_size": self.image_size, "widths": self.net.widths, **meta}, f, indent=2)

    @classmethod
    def load(cls, folder: str, meta: dict, device: str = "cpu", name: str = "learned") -> ConvScorer:
        from safetensors.torch import load_file

        weights = os.path.join(folder, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"learned reward: {folder!r} says kind 'conv' but has no {WEIGHTS_FILE}; "
                "give the scorer/ folder an `armature train algo=reward_model algo.backbone=conv` "
                "run wrote"
            )
        net = ConvNet(meta.get("widths", DEFAULT_WIDTHS))
        net.load_state_dict(load_file(weights))
        return cls(net, meta.get("image_size", 64), device=device, name=name)
