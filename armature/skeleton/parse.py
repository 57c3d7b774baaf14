"""Layout image -> keypoint JSON: the inverse of :func:`~armature.skeleton.render.render_layout`.

**Exact pass** (layouts the renderer drew). Joints are read in reverse drawing order (ankles
first). A joint's pixels are those of exactly its colour (and, when the ``scene`` is given,
different from the scene there); each 8-connected piece is one mark. Its centre is the pixel
``c`` for which the renderer's square at ``c``, clipped to the canvas, minus the marks already
read (they were drawn later, on top), is exactly that piece: unique unless most of the mark is
covered, in which case the candidate nearest the piece's middle is taken (counted as
``ambiguous``). A mark covered completely (a joint on the same pixel as a later one) leaves no
pixels: that joint comes back absent -- the one way the round trip loses information.

**Tolerant pass** (generated, noisy layouts; only pixels the exact pass did not explain and,
when the ``scene`` is given, that differ from it by more than ``scene_threshold``). Mixing a
colour with black or grey (blur, a VAE, JPEG) keeps its hue, so a pixel is read by hue: one of
chroma (max - min channel) >= ``JOINT_CHROMA`` = 192 -- above every limb colour's 153 -- whose hue
lies within ``hue_radius`` (10 degrees; joint hues are 21 apart) of joint ``j``'s hue votes for ``j``
with weight ``(1 - hue offset / hue_radius) * chroma / 255``. The votes of a joint, grown by a
pixel so that pieces split by noise rejoin, form candidate marks: position = weighted centroid,
visibility = ``min(1, total weight / (half the mark's area))``; marks below ``min_confidence``
are dropped. A joint with no mark gets ``[0, 0, 0]``.

**People.** Marks are grouped by the connected pieces of "ink" (pixels of any palette colour,
plus, for the tolerant pass, any pixel of chroma >= ``INK_CHROMA`` = 48, grown by a pixel: limbs
link a person's marks). There are at least as many people as the most marks of one joint,
``N``. Pieces are taken largest first; each joins the nearest person already formed that has none
of its joints, unless it lies farther than that person's size (the diagonal of its joints' box)
and fewer than ``N`` people exist, or no such person exists: then it starts a new person. So
with no joint drawn twice everything is one person, whatever falls apart. A person formed only
by tolerant marks with fewer than 3 joints is dropped when another person exists (noise). People
come back ordered left to right (mean x of their joints, see :func:`canonical`).

**Limits.** People must not touch (at least one pixel between their drawings); with several
people, a piece of one person that lies apart from it (e.g. a wrist whose elbow is absent) joins
the nearest person lacking that joint. A mark covered completely is lost (above). The tolerant
pass needs the colours at full resolution: JPEG's 4:2:0 chroma subsampling at 64x64 loses about
half the joints (PNG or 4:4:4 JPEG lose none).

numpy and scipy only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .keypoints import COCO17, Skeleton
from .render import JOINT_COLOURS, PALETTE, mark_radius

_EIGHT = np.ones((3, 3), dtype=bool)
JOINT_VALUE = 200  # tolerant pass: a joint's pixel is at least this bright (max channel; limbs: 153) ...
JOINT_CHROMA = 96  # ... and this saturated (max - min channel) ...
INK_CHROMA = 48  # ... and any drawn pixel at least this (the gym's scenes stay below 45)


def _hue(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` hue in degrees [0, 360) (HSV's; 0 for greys)."""
    rgb = image.astype(np.float64)
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = np.where(high > low, high - low, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(
        high == r, (g - b) / chroma % 6.0, np.where(high == g, (b - r) / chroma + 2.0, (r - g) / chroma + 4.0)
    )
    return np.where(high > low, 60.0 * hue, 0.0) % 360.0


def _codes(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` int: each pixel's colour as one number ``R * 65536 + G * 256 + B``."""
    image = image.astype(np.int64)
    return (image[..., 0] << 16) | (image[..., 1] << 8) | image[..., 2]


_PALETTE_CODES = _codes(PALETTE[None])[0]
_PALETTE_ORDER = np.argsort(_PALETTE_CODES)
_PALETTE_SORTED = _PALETTE_CODES[_PALETTE_ORDER]
_JOINT_CODES = _PALETTE_CODES[: len(COCO17)]
_JOINT_HUES = _hue(JOINT_COLOURS[None])[0]


def _as_image(image, what: str = "image") -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"{what}: expected an [H, W, 3] RGB image, got shape {array.shape}")
    return array[..., :3].astype(np.uint8)


def canonical(skeleton: Skeleton) -> Skeleton:
    """What :func:`parse_layout` returns for an exactly parsed layout of ``skeleton``: pixel
    coordinates, visibility 0/1, people with no joint dropped, people left to right."""
    q = skeleton.quantized()
    people = [p for p in q.array if p[:, 2].any()]
    people.sort(key=_order_key)
    return Skeleton(q.width, q.height, np.array(people).reshape(-1, len(COCO17), 3))


def _order_key(person: np.ndarray) -> tuple[float, float]:
    present = person[:, 2] > 0
    return float(person[present, 0].mean()), float(person[present, 1].mean())


def _solve_centre(piece: np.ndarray, covered: np.ndarray, dont_care: np.ndarray, r: int) -> list[tuple[int, int]]:
    """Pixels ``(x, y)`` whose clipped square of half-side ``r``, minus ``covered``, is exactly
    ``piece`` (ignoring ``dont_care``); best first."""
    height, width = piece.shape
    ys, xs = np.nonzero(piece)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    wy0, wy1, wx0, wx1 = max(y0 - 2 * r, 0), min(y1 + 2 * r + 1, height), max(x0 - 2 * r, 0), min(x1 + 2 * r + 1, width)
    want, free, care = piece[wy0:wy1, wx0:wx1], ~covered[wy0:wy1, wx0:wx1], ~dont_care[wy0:wy1, wx0:wx1]
    found = []
    for cy in range(y1 - r, y0 + r + 1):
        for cx in range(x1 - r, x0 + r + 1):
            if not (0 <= cx < width and 0 <= cy < height):
                continue
            square = np.zeros_like(want)
            square[max(cy - r - wy0, 0) : max(cy + r + 1 - wy0, 0), max(cx - r - wx0, 0) : max(cx + r + 1 - wx0, 0)] = (
                True
            )
            if not np.any(((square & free) != want) & care):
                found.append((cx, cy))
    middle = np.array([xs.mean(), ys.mean()])
    found.sort(key=lambda c: float(np.hypot(c[0] - middle[0], c[1] - middle[1])))
    return found


def parse_layout(
    image,
    scene=None,
    *,
    hue_radius: float = 10.0,
    scene_threshold: float = 24.0,
    min_confidence: float = 0.25,
    details: bool = False,
):
    """The :class:`Skeleton` drawn in a layout ``image`` (``[H, W, 3]`` array or PIL image).

    ``scene`` (optional, same size): the picture the layout was drawn over; pixels equal to it
    are not ink (exact pass), or within ``scene_threshold`` of it (tolerant pass). With
    ``details=True`` returns ``(skeleton, counts)``, counts of ``exact``, ``ambiguous`` and
    ``tolerant`` marks.
    """
    image = _as_image(image)
    height, width = image.shape[:2]
    r = mark_radius(width, height)
    pixels = image.astype(np.int16)
    if scene is not None:
        scene = _as_image(scene, "scene")
        if scene.shape != image.shape:
            raise ValueError(f"scene: shape {scene.shape} differs from the layout's {image.shape}")
        difference = np.abs(pixels - scene.astype(np.int16)).max(-1)
    else:
        difference = np.full((height, width), 255, dtype=np.int16)
    counts = {"exact": 0, "ambiguous": 0, "tolerant": 0}
    marks = []  # (joint, x, y, v, exact, representative pixel (y, x))
    covered = np.zeros((height, width), dtype=bool)  # marks of later joints
    explained = np.zeros((height, width), dtype=bool)
    ink = np.zeros((height, width), dtype=bool)

    # ---------------------------------------------------------------- exact pass
    codes = _codes(image)
    palette_index = np.searchsorted(_PALETTE_SORTED, codes).clip(0, len(PALETTE) - 1)
    exact_colour = np.where(_PALETTE_SORTED[palette_index] == codes, _PALETTE_ORDER[palette_index], -1)
    exact_colour[difference == 0] = -1  # the scene's own pixel
    ink |= exact_colour >= 0
    explained |= exact_colour >= len(COCO17)  # limb pixels
    for j in reversed(range(len(COCO17))):
        same = codes == _JOINT_CODES[j]
        dont_care = same & (difference == 0)
        pieces, n = ndimage.label(same & ~dont_care, _EIGHT)
        drawn = []
        for k in range(1, n + 1):
            piece = pieces == k
            centres = _solve_centre(piece, covered, dont_care, r)
            if not centres:
                continue  # not a mark the renderer drew: left to the tolerant pass
            cx, cy = centres[0]
            counts["exact"] += 1
            counts["ambiguous"] += len(centres) > 1
            ys, xs = np.nonzero(piece)
            marks.append((j, float(cx), float(cy), 1.0, True, (ys[0], xs[0])))
            explained |= piece
            drawn.append((cx, cy))
        for cx, cy in drawn:
            covered[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1] = True

    # ---------------------------------------------------------------- tolerant pass
    chroma = image.max(-1).astype(np.int16) - image.min(-1)
    candidate = ~explained & (chroma >= INK_CHROMA) & (difference > (scene_threshold if scene is not None else -1))
    if candidate.any():
        ink |= ndimage.binary_dilation(candidate, _EIGHT)  # bridges a blurred limb's gaps
        hue = _hue(image)
        offset = np.abs((hue[..., None] - _JOINT_HUES + 180.0) % 360.0 - 180.0)  # [H, W, 17] degrees
        nearest, nearest_offset = offset.argmin(-1), offset.min(-1)
        strong = candidate & (chroma >= JOINT_CHROMA) & (image.max(-1) >= JOINT_VALUE) & (nearest_offset < hue_radius)
        weight = np.where(strong, (1.0 - nearest_offset / hue_radius) * chroma / 255.0, 0.0)
        full = 0.5 * (2 * r + 1) ** 2
        for j in range(len(COCO17)):
            votes = strong & (nearest == j)
            if not votes.any():
                continue
            pieces, n = ndimage.label(ndimage.binary_dilation(votes, _EIGHT), _EIGHT)  # noise-split marks rejoin
            for k in range(1, n + 1):
                ys, xs = np.nonzero((pieces == k) & votes)
                w = weight[ys, xs]
                v = min(1.0, float(w.sum()) / full)
                if v < min_confidence:
                    continue
                x, y = float((xs * w).sum() / w.sum()), float((ys * w).sum() / w.sum())
                counts["tolerant"] += 1
                marks.append((j, x, y, v, False, (ys[0], xs[0])))

    people = _group(marks, ink)
    skeleton = Skeleton(width, height, np.array(people).reshape(-1, len(COCO17), 3))
    return (skeleton, counts) if details else skeleton


def _group(marks: list, ink: np.ndarray) -> list[np.ndarray]:
    """People ``[17, 3]`` from marks, grouped by connected ink (see the module docstring)."""
    if not marks:
        return []
    labels, _ = ndimage.label(ink, _EIGHT)
    pieces: dict[int, list] = {}
    for mark in marks:
        y, x = mark[5]
        label = int(labels[y, x]) or -(len(pieces) + 1)  # a mark off the ink (cannot happen) stays alone
        pieces.setdefault(label, []).append(mark)
    # within a piece one mark a joint (the most visible); the rest become pieces of their own
    groups = []
    for found in pieces.values():
        best: dict[int, tuple] = {}
        for mark in sorted(found, key=lambda m: -m[3]):
            if mark[0] in best:
                groups.append([mark])
            else:
                best[mark[0]] = mark
        groups.append(list(best.values()))
    groups.sort(key=lambda g: (-len(g), -sum(m[3] for m in g)))
    expected = max(np.bincount([m[0] for m in marks]))  # at least this many people
    people: list[dict[int, tuple]] = []
    for group in groups:
        joints = {m[0] for m in group}
        centre = np.mean([(m[1], m[2]) for m in group], axis=0)
        nearest, nearest_gap, near_enough = None, np.inf, False
        for person in people:
            if joints & set(person):
                continue
            xy = np.array([(m[1], m[2]) for m in person.values()])
            low, high = xy.min(0), xy.max(0)
            gap = float(np.hypot(*np.maximum(np.maximum(low - centre, centre - high), 0)))
            if gap < nearest_gap:
                nearest, nearest_gap = person, gap
                near_enough = gap <= max(float(np.hypot(*(high - low))), 4.0)
        if nearest is None or (not near_enough and len(people) < expected):
            people.append({m[0]: m for m in group})
        else:
            nearest.update({m[0]: m for m in group})
    if len(people) > 1:
        strong = [p for p in people if len(p) >= 3 or any(m[4] for m in p.values())]
        people = strong or people[:1]
    arrays = []
    for person in people:
        array = np.zeros((len(COCO17), 3))
        for j, mark in person.items():
            array[j] = (mark[1], mark[2], mark[3])
        arrays.append(array)
    arrays.sort(key=_order_key)
    return arrays
