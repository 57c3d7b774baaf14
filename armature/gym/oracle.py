"""The anatomy oracle: reads a figure's anatomy back from its pixels.

1. **Segment** by colour: each pixel goes to the nearest part colour of
   :data:`~armature.gym.figures.PALETTE` if it is within ``colour_radius``, else to the background.
2. **Count** each part type's connected regions (8-connected, at least ``min_area`` pixels)
   against a body's: one head and torso, two of every limb part. Too few: ``missing``; too many:
   ``extra``.
3. **Attach**: every region must come within ``attach_gap`` pixels of a region of its parent type
   (hand → forearm → upper arm → torso, foot → shin → thigh → torso, head → torso); one that does
   not is ``detached``. The gap tolerance (:data:`~armature.gym.figures.ATTACH_GAP`, 2 px) is
   there for generated images: a decoder blurs the seam between two parts into a colour that is
   neither, which reads as background. The renderer draws joined parts touching, and the
   ``detached`` injector moves a part further than the gap from every part of its parent's type.
4. **Joints**, per side, where the limb's parts are all present once and attached: each bone's
   axis (principal component of its pixels), oriented from the parent's end; the elbow's bend is
   the upper arm's angle minus the forearm's, the knee's the shin's minus the thigh's (in the
   side's frame, as the renderer draws them). Below ``reversed_below``: the joint bends the wrong
   way (``reversed``); above ``overbent_above[joint]``: ``overbent``.
5. **Proportions**: a limb bone's visible length (its extent along the axis) against the same
   bone's on the other side, and the head's area against the torso's length squared (relative to
   a body's own ratio): a factor beyond ``proportion_factor`` either way is ``proportion``.

Severity (BACON's four levels): 3, severe, for a missing, extra or detached head, torso or limb
bone; 2, moderate, for a missing, extra or detached hand or foot and a reversed or over-bent
joint; 1, minor, for a wrong proportion; 0 when nothing is found. A figure's severity is its
worst defect's. numpy and scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from armature.gym.figures import ATTACH_GAP, EXPECTED_COUNT, PALETTE, PARENT, TYPES

MAJOR = ("head", "torso", "upper_arm", "forearm", "thigh", "shin")
SEVERITY_NAMES = ("none", "minor", "moderate", "severe")
LIMBS = {"elbow": ("upper_arm", "forearm"), "knee": ("thigh", "shin")}
# head area / torso length ** 2 of an intact figure as drawn (measured on rendered figures)
HEAD_RATIO = 0.262


def severity_of(kind: str, part: str) -> int:
    if kind == "proportion":
        return 1
    if kind in ("reversed", "overbent"):
        return 2
    return 3 if part in MAJOR else 2


@dataclass
class Verdict:
    defects: list[tuple[str, str]]  # sorted (kind, part or joint)
    severity: int  # 0-3
    measurements: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.defects


@dataclass
class Region:
    type: str
    mask: np.ndarray
    pixels: np.ndarray  # [N, 2] (x, y)

    @property
    def centroid(self) -> np.ndarray:
        return self.pixels.mean(0)

    def axis_ends(self) -> tuple[np.ndarray, np.ndarray, float]:
        """The two ends of the principal axis and the extent along it."""
        centred = self.pixels - self.centroid
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        axis = vt[0]
        proj = centred @ axis
        return self.centroid + proj.min() * axis, self.centroid + proj.max() * axis, float(proj.max() - proj.min() + 1)


class AnatomyOracle:
    def __init__(
        self,
        colour_radius: float = 70.0,
        min_area: int = 4,
        reversed_below: float = -25.0,
        overbent_above: dict | None = None,
        proportion_factor: float = 1.5,
        attach_gap: int = ATTACH_GAP,
    ):
        self.colour_radius = colour_radius
        self._near = np.ones((2 * attach_gap + 1,) * 2, bool)  # grows a mask by attach_gap pixels
        self.min_area = min_area
        self.reversed_below = reversed_below
        self.overbent_above = overbent_above or {"elbow": 122.0, "knee": 112.0}
        self.proportion_factor = proportion_factor
        self._palette = np.array([PALETTE[t] for t in TYPES], dtype=np.float32)

    # ------------------------------------------------------------------ segmentation
    def segment(self, image: np.ndarray) -> np.ndarray:
        """``[H, W]`` int: -1 background, else the index of the part type in ``TYPES``."""
        pixels = np.asarray(image, dtype=np.float32)[..., :3]
        distance = np.linalg.norm(pixels[:, :, None, :] - self._palette[None, None], axis=-1)
        nearest = distance.argmin(-1)
        return np.where(distance.min(-1) < self.colour_radius, nearest, -1)

    def regions(self, image: np.ndarray) -> dict[str, list[Region]]:
        classes = self.segment(image)
        out = {}
        for index, type_ in enumerate(TYPES):
            labelled, n = ndimage.label(classes == index, structure=np.ones((3, 3)))
            found = []
            for k in range(1, n + 1):
                mask = labelled == k
                if mask.sum() >= self.min_area:
                    ys, xs = np.nonzero(mask)
                    found.append(Region(type_, mask, np.stack([xs, ys], 1).astype(np.float64)))
            out[type_] = found
        return out

    # ------------------------------------------------------------------ the checks
    def __call__(self, image: np.ndarray) -> Verdict:
        regions = self.regions(image)
        defects: set[tuple[str, str]] = set()
        measurements: dict = {}
        for type_, expected in EXPECTED_COUNT.items():
            n = len(regions[type_])
            if n < expected:
                defects.add(("missing", type_))
            elif n > expected:
                defects.add(("extra", type_))
        attached = {}
        for type_, parent in PARENT.items():
            for region in regions[type_]:
                touches = bool(regions[parent]) and any(
                    (ndimage.binary_dilation(region.mask, self._near) & p.mask).any() for p in regions[parent]
                )
                attached[id(region)] = touches
                if not touches:
                    defects.add(("detached", type_))

        torso = regions["torso"][0] if len(regions["torso"]) == 1 else None
        if torso is not None:
            torso_len = torso.axis_ends()[2]
            measurements["torso"] = torso_len
            if len(regions["head"]) == 1:
                ratio = regions["head"][0].mask.sum() / torso_len**2 / HEAD_RATIO
                measurements["head"] = ratio
                if not 1 / self.proportion_factor <= ratio <= self.proportion_factor:
                    defects.add(("proportion", "head"))
            for joint, (upper, lower) in LIMBS.items():
                self._limb(joint, upper, lower, regions, torso, attached, defects, measurements)
        defects_sorted = sorted(defects)
        severity = max((severity_of(k, p) for k, p in defects_sorted), default=0)
        return Verdict(defects_sorted, severity, measurements)

    def _limb(self, joint, upper, lower, regions, torso, attached, defects, measurements):
        ups, lows = regions[upper], regions[lower]
        if len(ups) != 2 or len(lows) != 2 or not all(attached[id(r)] for r in ups + lows):
            return
        torso_pixels = torso.pixels
        lengths = {upper: [], lower: []}
        for up in ups:
            # the upper bone's end nearer the torso is its root
            a, b, up_len = up.axis_ends()
            root, end = (a, b) if _distance(a, torso_pixels) <= _distance(b, torso_pixels) else (b, a)
            low = next((r for r in lows if (ndimage.binary_dilation(r.mask, self._near) & up.mask).any()), None)
            if low is None:
                continue
            c, d, low_len = low.axis_ends()
            near, far = (c, d) if np.linalg.norm(c - end) <= np.linalg.norm(d - end) else (d, c)
            side = 1.0 if root[0] >= torso.centroid[0] else -1.0
            bend = _wrap(_angle(end - root, side) - _angle(far - near, side))
            if joint == "knee":
                bend = -bend
            measurements.setdefault(joint, []).append(bend)
            if bend < self.reversed_below:
                defects.add(("reversed", joint))
            elif bend > self.overbent_above[joint]:
                defects.add(("overbent", joint))
            lengths[upper].append(up_len)
            lengths[lower].append(low_len)
        for type_, found in lengths.items():
            if len(found) == 2:
                a, b = found
                measurements[type_] = max(a, b) / min(a, b)
                if max(a, b) > self.proportion_factor * min(a, b):
                    defects.add(("proportion", type_))


def _distance(point: np.ndarray, pixels: np.ndarray) -> float:
    return float(np.min(np.linalg.norm(pixels - point, axis=1)))


def _angle(vector: np.ndarray, side: float) -> float:
    """A limb direction's angle in its side's frame: 0 down, positive outward (degrees)."""
    return math.degrees(math.atan2(side * vector[0], vector[1]))


def _wrap(angle: float) -> float:
    return (angle + 180.0) % 360.0 - 180.0
