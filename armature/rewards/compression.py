"""JPEG (in)compressibility rewards from DDPO (Black et al., 2023).

The score is the size of the image saved as JPEG, in kilobytes (1 kB = 1000 bytes):
``compressibility`` rewards small files (score = -size), ``incompressibility`` rewards
large ones (score = +size).
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image

from .base import Reward
from .registry import register


def jpeg_size_kb(image: PIL.Image.Image, quality: int = 95) -> float:
    """Size in kB of ``image`` (converted to RGB) encoded as JPEG at ``quality``."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegSize(Reward):
    """``sign * jpeg_size_kb(image, quality)``; not differentiable."""

    def __init__(self, quality: int = 95, sign: float = -1.0, name: str = "compressibility"):
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = int(quality)
        self.sign = float(sign)
        self.name = name

    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        return np.array([self.sign * jpeg_size_kb(image, self.quality) for image in images])


@register("compressibility")
def jpeg_compressibility(quality: int = 95) -> JpegSize:
    """Minus the JPEG size in kB: smaller files score higher."""
    return JpegSize(quality=quality, sign=-1.0, name="compressibility")


@register("incompressibility")
def jpeg_incompressibility(quality: int = 95) -> JpegSize:
    """The JPEG size in kB: larger files score higher."""
    return JpegSize(quality=quality, sign=1.0, name="incompressibility")
