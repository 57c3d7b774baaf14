"""Image bytes: what the platform stores (PNG) from arrays, PIL images or bytes, and back.

The preference-pair format (:mod:`armature.data.pairs`), the gym's pairs and the skeleton
triples all store their images this way. Decoding is bounded, since stored images may come from
anyone: only :data:`IMAGE_FORMATS` are opened, and an image's size is checked from its header,
before decoding, against :data:`MAX_IMAGE_PIXELS` and :data:`MAX_ASPECT_RATIO`. numpy and PIL only.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["IMAGE_FORMATS", "MAX_ASPECT_RATIO", "MAX_IMAGE_PIXELS", "ImageSizeError", "decode_image", "encode_image"]

MAX_IMAGE_PIXELS = 40_000_000  # width x height, read from the header before decoding (an 8K frame fits)
MAX_ASPECT_RATIO = 8  # long side / short side: the center crop keeps at most this share of a strip
# the formats a stored image may have: PIL knows more, some of which run a program to decode (EPS: Ghostscript)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageSizeError(ValueError):
    """An image refused from its header (nothing decoded); ``code`` is its reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


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
    """``[H, W, 3]`` (mode RGB) or ``[H, W]`` (mode L) uint8; raises on a corrupt or truncated file
    or one not in :data:`IMAGE_FORMATS`, and :class:`ImageSizeError` (before decoding) on one
    over the pixel or aspect-ratio caps."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError as err:
        raise ImageSizeError("image_too_large", str(err).strip().split("\n")[0]) from None
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageSizeError(
                "image_too_large",
                f"{width}x{height} is {width * height:,} pixels, over the "
                f"{MAX_IMAGE_PIXELS:,} a stored image may have (read from its header)",
            )
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageSizeError(
                "image_aspect",
                f"{width}x{height}: the long side may be at most "
                f"{MAX_ASPECT_RATIO} times the short one (read from its header)",
            )
        image.load()  # decodes fully: a truncated file fails here, not later
        return np.array(image.convert(mode))
