"""Aesthetic scorer in the style of the LAION aesthetic predictor.

score = MLP(normalize(CLIP_image_embedding(preprocess(image))))

Folder layout read by :class:`AestheticScorer` (and written by :func:`build_tiny_aesthetic`)::

    path/
      clip/                 CLIPVisionModelWithProjection.save_pretrained(...) output
        preprocessor_config.json   CLIP image size, crop size, mean and std
      head.safetensors      AestheticHead state dict (keys layers.0.weight, ...)
      head.json             {"in_features": d, "hidden_sizes": [...], "dropout": p}

With the default hidden sizes the head's keys match LAION's released MLP, so its
weights can be converted into ``head.safetensors`` unchanged.

Preprocessing (resize with bicubic interpolation, center crop, normalise) is done in
torch, so :meth:`AestheticScorer.score_tensor` is differentiable w.r.t. the pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .base import TINY_TOWER, DifferentiableReward
from .registry import register

# transformers is imported inside the functions that need it: importing it costs
# seconds, and processes that only use the cheap rewards should not pay for it.

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LAION_HIDDEN_SIZES = (1024, 128, 64, 16)

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
CLIP_SUBFOLDER = "clip"
PREPROCESSOR_CONFIG = "preprocessor_config.json"

_LAYOUT = (
    f"expected {CLIP_SUBFOLDER}/ (a CLIPVisionModelWithProjection saved with save_pretrained, "
    f"with {PREPROCESSOR_CONFIG}), {HEAD_WEIGHTS} and {HEAD_CONFIG}; "
    "build_tiny_aesthetic(path) writes a small random one"
)


class AestheticHead(nn.Module):
    """LAION-style MLP: Linear(d, h0)-Dropout-...-Linear(h[-2], h[-1])-Linear(h[-1], 1).

    Like LAION's predictor it has no activations, so it is an affine map of the embedding.
    """

    def __init__(self, in_features: int = 768, hidden_sizes: Sequence[int] = LAION_HIDDEN_SIZES, dropout: float = 0.2):
        super().__init__()
        self.config = {
            "in_features": int(in_features),
            "hidden_sizes": [int(h) for h in hidden_sizes],
            "dropout": float(dropout),
        }
        layers: list[nn.Module] = []
        width = in_features
        for i, hidden in enumerate(hidden_sizes):
            layers.append(nn.Linear(width, hidden))
            if i < len(hidden_sizes) - 1:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def _size_pair(value) -> tuple[int, int]:
    if isinstance(value, dict):
        return int(value["height"]), int(value["width"])
    return int(value), int(value)


def clip_preprocess(
    images: torch.Tensor,
    size: int | tuple[int, int],
    crop_size: tuple[int, int] | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Differentiable CLIP preprocessing of float images ``[B, 3, H, W]`` in ``[0, 1]``.

    ``size`` is an int (resize the shortest edge to it, keeping the aspect ratio) or an
    exact ``(height, width)``; then center crop to ``crop_size`` (if given) and normalise.
    """
    height, width = images.shape[-2:]
    if isinstance(size, int):
        short, long = min(height, width), max(height, width)
        new_long = int(size * long / short)
        target = (size, new_long) if height <= width else (new_long, size)
    else:
        target = tuple(size)
    if target != (height, width):
        images = F.interpolate(images, size=target, mode="bicubic", align_corners=False, antialias=True)
    if crop_size is not None:
        crop_h, crop_w = crop_size
        height, width = images.shape[-2:]
        if crop_h > height or crop_w > width:
            raise ValueError(f"crop {crop_size} is larger than the resized image {(height, width)}")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        images = images[..., top : top + crop_h, left : left + crop_w]
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


@register("aesthetic")
class AestheticScorer(DifferentiableReward):
    """LAION-style aesthetic score of images; differentiable.

    Args:
        path: folder holding ``head.safetensors``, ``head.json`` and (unless ``clip`` is
            given) the CLIP vision model in ``clip/``.
        device: where the models run.
        clip: optional local folder or hub id of the CLIP vision model, used instead of
            ``path/clip`` (e.g. ``"openai/clip-vit-large-patch14"`` for LAION's head).
    """

    name = "aesthetic"

    def __init__(self, path: str, device: str | torch.device = "cpu", clip: str | None = None):
        from transformers import CLIPVisionModelWithProjection

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"aesthetic scorer folder {path!r} does not exist; {_LAYOUT}")
        for filename in (HEAD_WEIGHTS, HEAD_CONFIG):
            if not os.path.isfile(os.path.join(path, filename)):
                raise FileNotFoundError(f"{filename} is missing from aesthetic scorer folder {path!r}; {_LAYOUT}")
        if clip is None:
            clip = os.path.join(path, CLIP_SUBFOLDER)
            if not os.path.isdir(clip):
                raise FileNotFoundError(
                    f"{CLIP_SUBFOLDER}/ is missing from aesthetic scorer folder {path!r}; {_LAYOUT}"
                )

        self.path = path
        self.device = torch.device(device)

        self.clip = CLIPVisionModelWithProjection.from_pretrained(clip)
        self.clip.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)

        with open(os.path.join(path, HEAD_CONFIG)) as f:
            head_config = json.load(f)
        self.head = AestheticHead(**head_config)
        self.head.load_state_dict(load_file(os.path.join(path, HEAD_WEIGHTS)))
        self.head.to(self.device).eval().requires_grad_(False)
        if self.head.config["in_features"] != self.clip.config.projection_dim:
            raise ValueError(
                f"head expects {self.head.config['in_features']}-dim embeddings but the CLIP model "
                f"projects to {self.clip.config.projection_dim}"
            )

        self.size, self.crop_size, self.mean, self.std = _read_preprocessing(clip, self.clip.config.image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> CLIP ``pixel_values`` (differentiable)."""
        return clip_preprocess(images, self.size, self.crop_size, self.mean, self.std)

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_tensor(images, prompts)
        pixel_values = self.preprocess(images.to(self.device, torch.float32))
        embeds = self.clip(pixel_values=pixel_values).image_embeds
        embeds = F.normalize(embeds, dim=-1)
        return self.head(embeds).squeeze(-1)


def _read_preprocessing(clip: str, image_size: int):
    """(size, crop_size, mean, std) from the CLIP folder's preprocessor config.

    Falls back to OpenAI CLIP's constants at the model's image size if there is no config.
    """
    config_file = None
    if os.path.isdir(clip):
        candidate = os.path.join(clip, PREPROCESSOR_CONFIG)
        config_file = candidate if os.path.isfile(candidate) else None
    else:  # hub id: honours HF_HUB_OFFLINE and the local cache
        from transformers.utils import cached_file

        try:
            config_file = cached_file(clip, PREPROCESSOR_CONFIG)
        except OSError:
            config_file = None
    if config_file is None:
        return image_size, (image_size, image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    with open(config_file) as f:
        config = json.load(f)
    size = config.get("size", image_size)
    if isinstance(size, dict):
        size = size["shortest_edge"] if "shortest_edge" in size else _size_pair(size)
    crop_size = _size_pair(config.get("crop_size", image_size)) if config.get("do_center_crop", True) else None
    mean = tuple(config.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(config.get("image_std", OPENAI_CLIP_STD))
    return size, crop_size, mean, std


def _calibration_images(seed: int, n: int = 32, size: int = 32) -> torch.Tensor:
    """Deterministic varied images: noise, smooth blobs, flat colours and gradients."""
    g = torch.Generator().manual_seed(seed)
    k = n // 4
    noise = torch.rand(k, 3, size, size, generator=g)
    blobs = F.interpolate(torch.rand(k, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    flat = torch.rand(k, 3, 1, 1, generator=g).expand(k, 3, size, size)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    start, end = torch.rand(k, 3, 1, 1, generator=g), torch.rand(k, 3, 1, 1, generator=g)
    gradients = (start + (end - start) * ramp).expand(k, 3, size, size)
    return torch.cat([noise, blobs, flat, gradients]).contiguous()


def build_tiny_aesthetic(
    path: str,
    seed: int = 0,
    hidden_sizes: Sequence[int] = (64, 32, 16, 8),
    target_mean: float = 5.0,
    target_std: float = 1.0,
) -> str:
    """Write a tiny random aesthetic scorer to ``path`` (deterministic for ``seed``).

    The CLIP vision tower is tiny (image 32, patch 8, hidden 32, 2 layers, 2 heads,
    projection 32) and randomly initialised. A random head would give nearly constant
    scores, so its last layer is rescaled such that scores on a fixed set of varied
    calibration images have mean ``target_mean`` and std ``target_std`` (LAION-like
    scale). Returns ``path``.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = os.fspath(path)
    clip_dir = os.path.join(path, CLIP_SUBFOLDER)
    os.makedirs(clip_dir, exist_ok=True)
    config = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        **TINY_TOWER,
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPVisionModelWithProjection(config)
        head = AestheticHead(config.projection_dim, hidden_sizes)
    clip.save_pretrained(clip_dir)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": config.image_size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": config.image_size, "width": config.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }
    with open(os.path.join(clip_dir, PREPROCESSOR_CONFIG), "w") as f:
        json.dump(preprocessor, f, indent=2)
    _save_head(head, path)

    # Calibrate: affinely rescale the last layer so scores have the target mean and std.
    scorer = AestheticScorer(path)
    images = _calibration_images(seed)
    with torch.no_grad():
        raw = scorer.score_tensor(images, [""] * len(images))
        mean, std = raw.mean(), raw.std()
        last = scorer.head.layers[-1]
        last.weight.mul_(target_std / std)
        last.bias.sub_(mean).mul_(target_std / std).add_(target_mean)
    _save_head(scorer.head, path)
    return path


def _save_head(head: AestheticHead, path: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, os.path.join(path, HEAD_WEIGHTS))
    with open(os.path.join(path, HEAD_CONFIG), "w") as f:
        json.dump(head.config, f, indent=2)
