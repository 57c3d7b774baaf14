"""Skeletons from the anatomy gym's figures and from photographs.

* :func:`from_figure`: the exact skeleton of a gym :class:`~armature.gym.figures.Figure` from its
  parts (the renderer's own coordinates): shoulders, elbows, wrists, hips, knees, ankles are the
  bone strokes' end points; the face is placed on the head disc (centre ``c``, radius ``R``) in
  the head's frame (``up`` from the neck to ``c``, ``across`` toward the figure's left = the
  image's right): nose ``c - 0.15 R up``, eyes ``c + 0.4 R up +- 0.45 R across``, ears
  ``c +- 0.95 R across`` (:func:`face_points`; spread so that the 3x3 marks of a 64 px layout
  rarely hide one another).
* :func:`from_figure_image`: the same joints *estimated from the pixels* of a rendered figure,
  through the anatomy oracle's colour segmentation (:mod:`armature.gym.oracle`): each bone's
  region gives its principal axis and end points, oriented from the torso; a joint is the end
  point moved back along the axis by the stroke's round cap (the renderer's ``(width - 1) / 2``);
  a wrist is the hand disc's centre moved back by its radius + 0.5 (as drawn), an ankle the foot's
  root; the face comes from the head region's centroid and radius with :func:`face_points`.
  A part that is not found (or not found exactly once a side) leaves its joints absent.
* :func:`from_photo`: BlazePose (:class:`armature.rewards.pose.BlazePose`, the real model fetched
  by ``armature assets pose``, passed in by the caller: this package imports no reward): its 33
  landmarks mapped to COCO-17, visibility = the landmark's visibility; a landmark outside the
  picture is absent (v = 0, coordinates clipped). BlazePose finds one person.

Coordinates follow :mod:`~armature.skeleton.keypoints` (pixel ``i`` is ``x = i``).
"""

from __future__ import annotations

import numpy as np

from armature.gym.figures import SIZE
from armature.gym.oracle import AnatomyOracle

from .keypoints import COCO17, INDEX, Skeleton

# BlazePose landmark of each COCO-17 joint
BLAZEPOSE_TO_COCO = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
SIDES = {"left": 1, "right": -1}  # +1: toward the image's right (a figure faces us)


def face_points(centre, radius: float, up) -> dict[str, np.ndarray]:
    """Nose, eyes and ears on a head disc (see the module docstring)."""
    c, up = np.asarray(centre, dtype=np.float64), np.asarray(up, dtype=np.float64)
    up = up / max(np.linalg.norm(up), 1e-9)
    across = np.array([-up[1], up[0]])
    out = {"nose": c - 0.15 * radius * up}
    for side, s in SIDES.items():
        out[f"{side}_eye"] = c + 0.4 * radius * up + s * 0.45 * radius * across
        out[f"{side}_ear"] = c + s * 0.95 * radius * across
    return out


def _skeleton(points: dict[str, np.ndarray], width: int, height: int, visibility: dict | None = None) -> Skeleton:
    array = np.zeros((1, len(COCO17), 3))
    for name, xy in points.items():
        if xy is None:
            continue
        x, y = float(xy[0]), float(xy[1])
        v = 1.0 if visibility is None else float(visibility[name])
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            x, y, v = min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0), 0.0
        array[0, INDEX[name]] = (x, y, v)
    return Skeleton(width, height, array)


def from_figure(figure) -> Skeleton:
    """The skeleton a gym figure was drawn from (see the module docstring)."""

    def part(type_, side=None):
        return next((p for p in figure.parts if p.type == type_ and p.side == side and "extra" not in p.tag), None)

    points: dict[str, np.ndarray | None] = {}
    torso, head = part("torso"), part("head")
    if head is not None:
        neck = np.mean(torso.points[:2], axis=0) if torso is not None else np.array(head.points[0]) + [0, 1]
        points.update(face_points(head.points[0], head.radius, np.array(head.points[0]) - neck))
    for side in SIDES:
        upper, fore = part("upper_arm", side), part("forearm", side)
        thigh, shin = part("thigh", side), part("shin", side)
        points[f"{side}_shoulder"] = np.array(upper.points[0]) if upper else None
        points[f"{side}_elbow"] = np.array(upper.points[1]) if upper else (np.array(fore.points[0]) if fore else None)
        points[f"{side}_wrist"] = np.array(fore.points[1]) if fore else None
        points[f"{side}_hip"] = np.array(thigh.points[0]) if thigh else None
        points[f"{side}_knee"] = np.array(thigh.points[1]) if thigh else (np.array(shin.points[0]) if shin else None)
        points[f"{side}_ankle"] = np.array(shin.points[1]) if shin else None
    return _skeleton(points, SIZE, SIZE)


# ----------------------------------------------------------------------------- from pixels
CAP = {"upper_arm": 1.0, "forearm": 1.0, "thigh": 1.5, "shin": 1.5, "foot": 1.0}  # (stroke width - 1) / 2


def _ends(region, toward) -> tuple[np.ndarray, np.ndarray]:
    """A bone region's (near, far) axis ends, near = the end closer to ``toward`` (points [N, 2])."""
    a, b, _ = region.axis_ends()
    da = np.min(np.linalg.norm(toward - a, axis=1))
    db = np.min(np.linalg.norm(toward - b, axis=1))
    return (a, b) if da <= db else (b, a)


def _unit(v) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def from_figure_image(image, oracle=None) -> Skeleton:
    """Joints of the figure in a rendered gym image, estimated from its pixels (module docstring)."""
    image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)[..., :3]
    height, width = image.shape[:2]
    regions = (oracle or AnatomyOracle()).regions(image)
    points: dict[str, np.ndarray | None] = {}
    if len(regions["torso"]) != 1:
        return _skeleton({}, width, height)
    torso = regions["torso"][0]
    top, bottom = sorted(torso.axis_ends()[:2], key=lambda p: p[1])
    if len(regions["head"]) == 1:
        head = regions["head"][0]
        radius = float(np.sqrt(len(head.pixels) / np.pi))
        points.update(face_points(head.centroid, radius, head.centroid - top))

    def by_side(type_):
        found = regions[type_]
        if len(found) != 2:
            return {}
        right, left = sorted(found, key=lambda r: r.centroid[0])
        return {"left": left, "right": right}

    for upper, lower, end, (root_name, mid_name, end_name) in (
        ("upper_arm", "forearm", "hand", ("shoulder", "elbow", "wrist")),
        ("thigh", "shin", "foot", ("hip", "knee", "ankle")),
    ):
        ups, lows, ends = by_side(upper), by_side(lower), by_side(end)
        for side in SIDES:
            up, low = ups.get(side), lows.get(side)
            if up is None:
                continue
            root, tip = _ends(up, torso.pixels)
            axis = _unit(tip - root)
            points[f"{side}_{root_name}"] = root + CAP[upper] * axis
            if low is None:
                points[f"{side}_{mid_name}"] = tip
                continue
            near, far = _ends(low, tip[None])
            axis = _unit(far - near)
            points[f"{side}_{mid_name}"] = near + CAP[lower] * axis
            last = ends.get(side)
            if last is None:
                points[f"{side}_{end_name}"] = far - CAP[lower] * axis
            elif end == "hand":
                radius = float(np.sqrt(len(last.pixels) / np.pi))
                points[f"{side}_{end_name}"] = last.centroid - (radius + 0.5) * _unit(last.centroid - near)
            else:
                foot_near, foot_far = _ends(last, far[None])
                points[f"{side}_{end_name}"] = foot_near + CAP["foot"] * _unit(foot_far - foot_near)
    return _skeleton(points, width, height)


# ----------------------------------------------------------------------------- photos
def from_photo(image, estimator) -> Skeleton:
    """The person BlazePose finds in a photo (``[H, W, 3]`` uint8 or PIL image); no one found:
    a skeleton with no people. ``estimator``: a :class:`~armature.rewards.pose.BlazePose`
    (``BlazePose(min_detection_score=0.3)`` finds people in most photos)."""
    if estimator is None:
        raise ValueError(
            "from_photo: estimator=None; pass a pose model, e.g. "
            "armature.rewards.pose.BlazePose(min_detection_score=0.3)"
        )
    image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)[..., :3].astype(np.uint8)
    height, width = image.shape[:2]
    result = estimator(image)
    if not result.found:
        return Skeleton.empty(width, height, people=0)
    landmarks = np.asarray(result.landmarks)
    points, visibility = {}, {}
    for name, index in zip(COCO17, BLAZEPOSE_TO_COCO):
        x, y, v = landmarks[index, :3]
        points[name] = np.array([x - 0.5, y - 0.5])  # BlazePose: pixel i spans [i, i + 1)
        visibility[name] = float(np.clip(v, 0.0, 1.0))
    return _skeleton(points, width, height, visibility)
