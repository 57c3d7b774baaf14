"""Image bytes: what the platform stores (PNG) from arrays, PIL images or bytes, and back.

The preference-pair format (:mod:`armature.data.pairs`), the gym's pairs and the skeleton
triples all store their images this way. numpy and PIL only.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["decode_image", "encode_image"]


def encode_image(image: Any, format: str = "PNG") -> bytes:
    """Bytes of an image given as encoded bytes (kept as they are), a PIL image or a uint8 array
    (``[H, W, 3]``, or ``[H, W]`` for masks; a bool or float mask in [0, 1] becomes 0..255)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        if image.dtype == bool or image.dtype.kind == "f":
            image = (np.clip(image.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def decode_image(data: bytes, mode: str = "RGB") -> np.ndarray:
    """``[H, W, 3]`` (mode RGB) or ``[H, W]`` (mode L) uint8; raises on a corrupt or truncated file."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes fully: a truncated file fails here, not later
        return np.array(image.convert(mode))
