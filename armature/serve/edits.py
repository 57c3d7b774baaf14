"""Edits: a person rendered into a scene image from a prompt, planned as an explicit skeleton.

``POST /v1/images/edits`` takes a scene (a base64 PNG), a prompt, an optional person region (a
``box`` ``[x0, y0, x1, y1]`` or a ``mask`` PNG) and an optional ``pose`` (keypoint JSON,
``armature.skeleton``). ``check_edit`` decodes and checks them (a 400 names the field at fault,
down to the joint for a bad pose); ``run_edit`` runs a ``SkeleGuidePipeline``: it plans the pose
(or takes the one given), renders the person, and keeps every pixel outside the person region
as it was. The answer carries the image and the pose used, so a client can edit that pose and
send it back.

Nothing here touches Ray or HTTP.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np

from armature.serve.api_common import ApiError

__all__ = ["EditError", "check_edit", "run_edit", "decode_png", "encode_png", "pose_error_field"]


class EditError(ValueError):
    """A request the pipeline cannot take (e.g. an image size it cannot render): 400 on ``field``."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


_PATH = re.compile(r"^[A-Za-z_][\w.\[\]]*$")


def decode_png(text: str, field: str, lim: dict, mode: str = "RGB") -> np.ndarray:
    """A base64 PNG as ``[H, W, 3]`` uint8 (``mode="L"``: ``[H, W]``); 400 naming ``field`` when it is
    not one or its size is outside the limits."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, field, f"{field}: not base64 ({err})") from None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ApiError(400, field, f"{field}: not a PNG image (base64 of the file's bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # read from the header: check before decoding the pixels
        side = f"each side in [{lim['min_size']}, {lim['max_size']}], a multiple of {lim['size_multiple']}"
        for v in (width, height):
            if not lim["min_size"] <= v <= lim["max_size"] or v % lim["size_multiple"]:
                raise ApiError(400, field, f"{field}: {width}x{height} pixels; {side}")
        return np.asarray(image.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ApiError(400, field, f"{field}: the PNG does not decode ({err})") from None


def encode_png(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pose_error_field(message: str) -> str:
    """The request field a ``Skeleton.from_json`` error names: ``pose``, ``pose.width``,
    ``pose.people[0].keypoints.left_knee``, ..."""
    head = message.split(": ", 1)[0]
    if not _PATH.match(head) or head == "pose":
        return "pose"
    return f"pose.{head}"


def check_edit(body, lim: dict) -> dict:
    """The model's input from a validated ``EditRequest``: the scene ``[H, W, 3]``, the person
    region ``[H, W]`` bool (or None), the pose as a ``Skeleton`` (or None). Raises ``ApiError``
    (400) naming the field."""
    from armature.skeleton import Skeleton

    scene = decode_png(body.image, "image", lim)
    height, width = scene.shape[:2]
    region = None
    if body.box is not None:
        x0, y0, x1, y1 = body.box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ApiError(
                400,
                "box",
                f"box: {body.box} must satisfy 0 <= x0 < x1 <= {width} and "
                f"0 <= y0 < y1 <= {height} (pixels of the {width}x{height} image)",
            )
        region = np.zeros((height, width), dtype=bool)
        region[y0:y1, x0:x1] = True
    elif body.mask is not None:
        mask = decode_png(body.mask, "mask", lim, mode="L")
        if mask.shape != (height, width):
            raise ApiError(
                400,
                "mask",
                f"mask: {mask.shape[1]}x{mask.shape[0]} pixels, the image is "
                f"{width}x{height}: send a mask of the image's size",
            )
        region = mask > 0
        if not region.any():
            raise ApiError(400, "mask", "mask: no pixel is set; nonzero pixels mark where the person goes")
    pose = None
    if body.pose is not None:
        try:
            pose = Skeleton.from_json(body.pose)
        except (ValueError, TypeError, OverflowError) as err:  # e.g. "width": Infinity overflows int()
            message = str(err)
            raise ApiError(
                400, pose_error_field(message), message if message.startswith("pose") else f"pose.{message}"
            ) from None
        if (pose.width, pose.height) != (width, height):
            raise ApiError(
                400,
                "pose.width",
                f"pose.width, pose.height: the pose's canvas is {pose.width}x"
                f"{pose.height}, the image {width}x{height}; give the pose in the "
                "image's pixels",
            )
        if not pose.visible.any():
            raise ApiError(400, "pose.people", "pose.people: no joint is present (every visibility is 0)")
    return {"scene": scene, "region": region, "pose": pose}


def run_edit(
    pipeline, scene: np.ndarray, prompt: str, region: np.ndarray | None, pose, seed: int, num_steps: int
) -> dict:
    """One edit through a ``SkeleGuidePipeline``: ``{"image", "layout", "pose"}`` (uint8 arrays and
    the pose used as keypoint JSON). Outside ``region`` the image is the scene, pixel for pixel."""
    from armature.skeleton import Skeleton

    check_size = getattr(pipeline, "_check_size", None)
    if check_size is not None:
        try:
            check_size(*scene.shape[:2])
        except ValueError as err:
            raise EditError("image", f"image: {err}") from None
    out = pipeline(
        [scene],
        [prompt],
        person_mask=None if region is None else [region],
        poses=None if pose is None else [pose],
        seed=seed,
        num_steps=num_steps,
    )
    image = np.asarray(out.images[0], dtype=np.uint8)
    if image.shape != scene.shape:
        raise RuntimeError(f"the pipeline returned a {image.shape} image for a {scene.shape} scene")
    if region is not None:  # the background is the caller's: keep it exactly
        image = np.where(region[..., None], image, scene)
    used = pose if pose is not None else out.poses[0]  # a given pose is the one rendered from
    used = used.to_json() if isinstance(used, Skeleton) else dict(used)
    layout = None if out.layouts is None else np.asarray(out.layouts[0], dtype=np.uint8)
    return {"image": image, "layout": layout, "pose": used}
