"""Skeleton layouts: colour-coded limbs and joints on a black canvas or over a scene (the
paper's "scene-aware layout").

The encoding, chosen so that :func:`~armature.skeleton.parse.parse_layout` can read it back
exactly:

* **Colours.** Joint ``j`` (COCO order) is the fully saturated, full-value hue ``j * 360 / 17``
  (:data:`JOINT_COLOURS`); limb ``k`` of :data:`~armature.skeleton.keypoints.EDGES` is the
  saturated hue ``(k + 0.5) * 360 / 19`` at value 0.6 (:data:`LIMB_COLOURS`). All 36 are
  distinct RGB triples; joint colours are at least 63 (RGB distance) apart, 102 from every limb
  colour and 255 from black; limb colours 33 apart and 153 from black. Every colour's channel
  spread is >= 153, so no muted scene pixel (the gym's backgrounds: grey +- 22 a channel) ever
  equals one.
* **Geometry.** A joint is drawn on its pixel ``round(x), round(y)`` (half up) as a filled
  square of side ``2r + 1``, ``r = mark_radius(W, H) = max(1, round(min(W, H) / 64))``
  (3x3 at 64x64); a limb is a straight line of width ``r`` between its two joints' pixels,
  drawn only when both are present (v > 0). Joints with v = 0 are not drawn.
* **Order.** All limbs first (so limbs never cover a mark), then the marks joint by joint in COCO
  order, each joint for every person in turn. A mark is therefore covered only by the marks of
  later joints, which the parser reads first; it recovers the centre exactly unless the whole
  mark is covered (two joints on the same pixel, or a joint boxed in by later ones).

Visibility is drawn as present/absent only: the parser gives v = 1 for a present joint.
numpy and PIL only.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from .keypoints import COCO17, EDGES, Skeleton


def _hue(h: float, value: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, 1.0, value))


JOINT_COLOURS = np.array([_hue(j / len(COCO17), 1.0) for j in range(len(COCO17))], dtype=np.uint8)
LIMB_COLOURS = np.array([_hue((k + 0.5) / len(EDGES), 0.6) for k in range(len(EDGES))], dtype=np.uint8)
PALETTE = np.concatenate([JOINT_COLOURS, LIMB_COLOURS])  # [36, 3]: joints, then limbs
assert len({tuple(c) for c in PALETTE}) == len(PALETTE)


def mark_radius(width: int, height: int) -> int:
    """Half-side of a joint's square mark (1 at 64x64, 8 at 512x512)."""
    return max(1, int(round(min(width, height) / 64)))


def mark_box(x: int, y: int, r: int, width: int, height: int) -> tuple[slice, slice]:
    """``(rows, cols)`` slices of the square mark centred on pixel ``(x, y)``, clipped to the canvas."""
    return slice(max(y - r, 0), max(min(y + r + 1, height), 0)), slice(max(x - r, 0), max(min(x + r + 1, width), 0))


def render_layout(skeleton: Skeleton, scene: np.ndarray | None = None) -> np.ndarray:
    """The layout of ``skeleton`` as ``[H, W, 3]`` uint8: on black, or drawn over ``scene``
    (``[H, W, 3]`` uint8 of the skeleton's canvas size)."""
    width, height = skeleton.width, skeleton.height
    if scene is None:
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
    else:
        scene = np.asarray(scene)
        if scene.shape != (height, width, 3):
            raise ValueError(
                f"scene: shape {scene.shape} does not match the skeleton's {width}x{height} canvas; "
                f"expected ({height}, {width}, 3) (resize the scene or Skeleton.resized())"
            )
        canvas = scene.astype(np.uint8, copy=True)
    r = mark_radius(width, height)
    pixels, visible = skeleton.pixels(), skeleton.visible
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for person in range(skeleton.num_people):
        for k, (a, b) in enumerate(EDGES):
            if visible[person, a] and visible[person, b]:
                (xa, ya), (xb, yb) = pixels[person, a], pixels[person, b]
                draw.line(
                    [(int(xa), int(ya)), (int(xb), int(yb))], fill=tuple(int(c) for c in LIMB_COLOURS[k]), width=r
                )
    canvas = np.array(image)
    for j in range(len(COCO17)):
        for person in range(skeleton.num_people):
            if visible[person, j]:
                rows, cols = mark_box(*pixels[person, j], r, width, height)
                canvas[rows, cols] = JOINT_COLOURS[j]
    return canvas
