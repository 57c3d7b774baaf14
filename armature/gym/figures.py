"""Articulated 2-D human figures drawn from joint angles, with their ground truth.

A figure is 14 parts: head, torso, and per side an upper arm, forearm, hand, thigh, shin and
foot. Every part *type* has its own colour, a corner of the RGB cube (:data:`PALETTE`; left and
right share it), backgrounds are muted mid-tones, so a figure's anatomy can be read back from the
pixels exactly (:mod:`armature.gym.oracle`).

Angles, in degrees, are measured per limb in its side's frame: 0 points straight down the
body, positive turns outward (away from the midline). A limb's first bone has an absolute
angle (``shoulder``, ``hip``); the joint below it bends by ``elbow`` (the forearm turns
*inward*: ``forearm = shoulder - elbow``) or ``knee`` (the shin turns *outward*:
``shin = hip + knee``). Anatomical limits (:data:`LIMITS`) bound what an intact figure may do;
the oracle's thresholds sit well outside them and the defect injectors well beyond those.

Only numpy and PIL; no Ray, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIZE = 64

# part type -> RGB: the corners of the colour cube, so every pair is >= 255 apart and a part drawn
# faintly (blended toward a grey background) stays nearest its own colour; every background colour
# >= 100 away from each
PALETTE: dict[str, tuple[int, int, int]] = {
    "head": (255, 255, 0),
    "torso": (255, 0, 0),
    "upper_arm": (0, 255, 0),
    "forearm": (0, 0, 255),
    "hand": (255, 0, 255),
    "thigh": (0, 255, 255),
    "shin": (255, 255, 255),
    "foot": (0, 0, 0),
}
TYPES = list(PALETTE)
PARENT = {
    "head": "torso",
    "upper_arm": "torso",
    "forearm": "upper_arm",
    "hand": "forearm",
    "thigh": "torso",
    "shin": "thigh",
    "foot": "shin",
}
EXPECTED_COUNT = {t: (1 if t in ("head", "torso") else 2) for t in TYPES}
# parts this close (px, chessboard distance) count as joined: the oracle's tolerance for the blurred
# seam a generated image draws between two parts (ATTACH_GAP - 1 pixels of neither colour)
ATTACH_GAP = 2
# stroke widths (px): 4 everywhere; 3 px arms and feet were drawn broken or missing by the
# base policy (32x32 latents: 1.5 latent pixels across)
WIDTH = {"upper_arm": 4, "forearm": 4, "thigh": 4, "shin": 4, "foot": 4}

# intact ranges, degrees (see the module docstring for the conventions)
LIMITS = {"shoulder": (10.0, 165.0), "elbow": (0.0, 100.0), "hip": (3.0, 60.0), "knee": (0.0, 90.0)}

# bone lengths at scale 1 (px); an intact figure jitters each by at most 4 %, both sides alike
BONES = {
    "torso": 16.0,
    "head_radius": 4.5,
    "upper_arm": 9.0,
    "forearm": 8.0,
    "hand_radius": 2.0,
    "thigh": 11.0,
    "shin": 10.0,
    "foot": 4.0,
    "shoulder_half": 5.0,
    "hip_half": 3.5,
}

# pose classes: (prompt, {angle: (low, high)}) per side; unlisted angles: STANDING's
STANDING = {"shoulder": (18, 35), "elbow": (0, 15), "hip": (3, 12), "knee": (0, 10)}
POSES: dict[str, tuple[str, dict, dict]] = {
    "standing": (
        "a person standing",
        {"shoulder": (18, 35), "elbow": (0, 15), "hip": (3, 12), "knee": (0, 10)},
        {"shoulder": (18, 35), "elbow": (0, 15), "hip": (3, 12), "knee": (0, 10)},
    ),
    "arms_up": (
        "a person raising both arms",
        {"shoulder": (125, 150), "elbow": (0, 40)},
        {"shoulder": (125, 150), "elbow": (0, 40)},
    ),
    "left_arm_up": (
        "a person raising the left arm",
        {"shoulder": (125, 155), "elbow": (0, 40)},
        {"shoulder": (18, 35), "elbow": (0, 15)},
    ),
    "right_arm_up": (
        "a person raising the right arm",
        {"shoulder": (18, 35), "elbow": (0, 15)},
        {"shoulder": (125, 155), "elbow": (0, 40)},
    ),
    "arms_out": (
        "a person with arms stretched out",
        {"shoulder": (75, 100), "elbow": (10, 35)},
        {"shoulder": (75, 100), "elbow": (10, 35)},
    ),
    "waving": (
        "a person waving",
        {"shoulder": (70, 110), "elbow": (60, 100)},
        {"shoulder": (18, 35), "elbow": (0, 15)},
    ),
    "striding": (
        "a person striding",
        {"shoulder": (35, 60), "elbow": (0, 20), "hip": (25, 45), "knee": (20, 50)},
        {"shoulder": (35, 60), "elbow": (0, 20), "hip": (25, 45), "knee": (20, 50)},
    ),
    "kneeling": (
        "a person kneeling",
        {"shoulder": (60, 90), "elbow": (0, 30), "hip": (35, 60), "knee": (60, 90)},
        {"shoulder": (60, 90), "elbow": (0, 30), "hip": (35, 60), "knee": (60, 90)},
    ),
    "jumping": (
        "a person jumping",
        {"shoulder": (120, 160), "hip": (20, 45), "knee": (40, 80)},
        {"shoulder": (120, 160), "hip": (20, 45), "knee": (40, 80)},
    ),
}
SIDES = {"left": 1, "right": -1}  # the figure's left is the image's right (it faces us)


@dataclass
class Pose:
    """Everything the renderer needs: the class, per-side angles, bone lengths and placement."""

    name: str
    prompt: str
    angles: dict[str, dict[str, float]]  # side -> {shoulder, elbow, hip, knee}
    bones: dict[str, float]
    center: tuple[float, float]  # the pelvis, px
    lean: float = 0.0  # torso tilt, degrees
    bone_scale: dict[str, float] = field(default_factory=dict)  # "left.forearm" / "head_radius" -> factor


@dataclass
class Part:
    """One drawn part: a disc (head, hand), a stroke (bones, foot) or the torso polygon."""

    type: str
    side: str | None  # "left" / "right" for limbs; None for head, torso
    points: list[tuple[float, float]]  # stroke end points, disc [center], or polygon corners
    radius: float = 0.0  # discs
    width: int = 0  # strokes
    tag: str = ""  # "extra" for injected parts


@dataclass
class Figure:
    """A drawn figure and its ground truth: ``defects`` as ``(kind, part type)``."""

    pose: Pose
    parts: list[Part]
    background: np.ndarray  # [SIZE, SIZE, 3] uint8
    defects: list[tuple[str, str]] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return self.pose.prompt


def _direction(angle: float, side: int) -> np.ndarray:
    """Unit vector (image coordinates, y down) of a limb angle in its side's frame."""
    a = math.radians(angle)
    return np.array([side * math.sin(a), math.cos(a)])


def sample_pose(rng: np.random.Generator, name: str | None = None) -> Pose:
    """A random intact pose of class ``name`` (random class when None)."""
    name = name or list(POSES)[rng.integers(len(POSES))]
    prompt, left, right = POSES[name]
    angles = {}
    for side, ranges in (("left", left), ("right", right)):
        angles[side] = {joint: float(rng.uniform(*ranges.get(joint, STANDING[joint]))) for joint in LIMITS}
    scale = rng.uniform(0.9, 1.08)
    bones = {k: v * scale * rng.uniform(0.96, 1.04) for k, v in BONES.items()}
    legs = bones["thigh"] + bones["shin"]
    center = (SIZE / 2 + rng.uniform(-5, 5), SIZE - 6 - legs * rng.uniform(0.93, 1.0))
    if name == "kneeling":
        center = (center[0], center[1] + 4)
    return Pose(name, prompt, angles, bones, center, float(rng.uniform(-8, 8)))


def build_parts(pose: Pose) -> list[Part]:
    """The parts of an intact figure in ``pose``, in drawing order (later parts on top)."""
    b = pose.bones

    def bone(side: str, name: str) -> float:
        return b[name] * pose.bone_scale.get(f"{side}.{name}", 1.0)

    pelvis = np.array(pose.center)
    up = np.array([math.sin(math.radians(pose.lean)), -math.cos(math.radians(pose.lean))])
    across = np.array([-up[1], up[0]])  # toward the image's right: the figure's left side
    neck = pelvis + b["torso"] * up
    head_radius = b["head_radius"] * pose.bone_scale.get("head_radius", 1.0)
    head = neck + (head_radius + 0.5) * up
    parts = [
        Part(
            "torso",
            None,
            [
                tuple(neck + b["shoulder_half"] * across),
                tuple(neck - b["shoulder_half"] * across),
                tuple(pelvis - b["hip_half"] * across),
                tuple(pelvis + b["hip_half"] * across),
            ],
        ),
        Part("head", None, [tuple(head)], radius=head_radius),
    ]
    tilt = pose.lean
    for side, s in SIDES.items():
        ang = pose.angles[side]
        hip = pelvis + s * b["hip_half"] * across
        thigh_dir = _direction(ang["hip"] - s * tilt, s)
        knee = hip + bone(side, "thigh") * thigh_dir
        shin_dir = _direction(ang["hip"] + ang["knee"] - s * tilt, s)
        ankle = knee + bone(side, "shin") * shin_dir
        foot_dir = _direction(ang["hip"] + ang["knee"] + 80 - s * tilt, s)
        parts += [
            Part("thigh", side, [tuple(hip), tuple(knee)], width=WIDTH["thigh"]),
            Part("shin", side, [tuple(knee), tuple(ankle)], width=WIDTH["shin"]),
            Part("foot", side, [tuple(ankle), tuple(ankle + b["foot"] * foot_dir)], width=WIDTH["foot"]),
        ]
    for side, s in SIDES.items():
        ang = pose.angles[side]
        shoulder = neck + s * (b["shoulder_half"] + 0.5) * across - 1.5 * up
        elbow = shoulder + bone(side, "upper_arm") * _direction(ang["shoulder"] - s * tilt, s)
        fore_dir = _direction(ang["shoulder"] - ang["elbow"] - s * tilt, s)
        wrist = elbow + bone(side, "forearm") * fore_dir
        parts += [
            Part("upper_arm", side, [tuple(shoulder), tuple(elbow)], width=WIDTH["upper_arm"]),
            Part("forearm", side, [tuple(elbow), tuple(wrist)], width=WIDTH["forearm"]),
            Part("hand", side, [tuple(wrist + (b["hand_radius"] + 0.5) * fore_dir)], radius=b["hand_radius"]),
        ]
    return parts


def sample_background(rng: np.random.Generator) -> np.ndarray:
    """A muted scene: a tinted vertical gradient, a floor band and a few soft blocks, all of
    low saturation (so no background pixel is mistaken for a part)."""

    def muted() -> np.ndarray:
        while True:
            grey = rng.uniform(70, 235)
            colour = np.clip(grey + rng.uniform(-22, 22, 3), 0, 255)
            if min(np.linalg.norm(colour - np.array(p)) for p in PALETTE.values()) >= 100:
                return colour

    top, bottom = muted(), muted()
    t = np.linspace(0, 1, SIZE)[:, None, None]
    image = (1 - t) * top + t * bottom + np.zeros((SIZE, SIZE, 3))
    floor = int(rng.integers(SIZE * 2 // 3, SIZE - 4))
    image[floor:] = muted()
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.integers(0, SIZE - 8, 2)
        w, h = rng.integers(6, 24, 2)
        image[y0 : y0 + h, x0 : x0 + w] = muted()
    return image.astype(np.uint8)


def draw_part(draw: ImageDraw.ImageDraw, part: Part, fill) -> None:
    if part.type == "torso":
        draw.polygon(part.points, fill=fill)
    elif part.radius:
        (x, y), r = part.points[0], part.radius
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    else:
        (x0, y0), (x1, y1) = part.points
        draw.line([(x0, y0), (x1, y1)], fill=fill, width=part.width)
        r = (part.width - 1) / 2  # round caps
        for x, y in ((x0, y0), (x1, y1)):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def label_map(parts: list[Part]) -> np.ndarray:
    """``[SIZE, SIZE]`` int: 0 background, ``i + 1`` where part ``i`` is the visible one."""
    canvas = Image.new("I", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for i, part in enumerate(parts):
        draw_part(draw, part, i + 1)
    return np.asarray(canvas, dtype=np.int32)


def part_mask(part: Part) -> np.ndarray:
    canvas = Image.new("1", (SIZE, SIZE), 0)
    draw_part(ImageDraw.Draw(canvas), part, 1)
    return np.asarray(canvas, dtype=bool)


def render(figure: Figure) -> np.ndarray:
    """The figure as ``[SIZE, SIZE, 3]`` uint8: every part in its type's colour, no smoothing."""
    labels = label_map(figure.parts)
    colours = np.array([(0, 0, 0)] + [PALETTE[p.type] for p in figure.parts], dtype=np.uint8)
    return np.where(labels[..., None] > 0, colours[labels], figure.background)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


def is_clean(parts: list[Part]) -> bool:
    """True when the drawing is unambiguous: every part inside the canvas, mostly visible and in
    one piece, and no two parts that are not joined (parent and child) touch, so that each part is its
    own connected region of its colour and attachments are exactly the skeleton's."""
    for part in parts:
        xs = [x for x, _ in part.points]
        ys = [y for _, y in part.points]
        reach = part.radius or part.width / 2
        if min(xs) - reach < 1 or min(ys) - reach < 1 or max(xs) + reach > SIZE - 2 or max(ys) + reach > SIZE - 2:
            return False
    masks = np.stack([part_mask(p) for p in parts])
    labels = label_map(parts)
    for i, mask in enumerate(masks):
        visible = labels == i + 1
        if not mask.any() or visible.sum() < 0.6 * mask.sum() or ndimage.label(visible, np.ones((3, 3)))[1] != 1:
            return False
    flat = masks.reshape(len(parts), -1).astype(np.float32)
    grown = np.stack([_dilate(m) for m in masks]).reshape(len(parts), -1).astype(np.float32)
    touching = (grown @ flat.T) > 0  # [i, j]: part i, grown by a pixel, meets part j
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            if touching[i, j] and not _joined(parts[i], parts[j]):
                return False
    return True


def is_attached(parts: list[Part]) -> bool:
    """True when every part that is not tagged ``detached`` touches a part of its parent's type
    on its side (the torso for the head and the limbs' roots)."""
    masks = [part_mask(p) for p in parts]
    for part, mask in zip(parts, masks):
        parent = PARENT.get(part.type)
        if parent is None or "detached" in part.tag:
            continue
        grown = _dilate(mask)
        if not any(
            q.type == parent and (q.side is None or q.side == part.side) and (grown & m).any()
            for q, m in zip(parts, masks)
        ):
            return False
    return True


def is_apart(parts: list[Part], gap: int = ATTACH_GAP) -> bool:
    """True when every part tagged ``detached`` is more than ``gap`` pixels from every part of its
    parent's type, so the oracle, which forgives a gap that small, still sees it detached."""
    masks = [part_mask(p) for p in parts]
    for part, mask in zip(parts, masks):
        if "detached" not in part.tag:
            continue
        grown = ndimage.binary_dilation(mask, np.ones((2 * gap + 1,) * 2, bool))
        if any(q.type == PARENT[part.type] and (grown & m).any() for q, m in zip(parts, masks)):
            return False
    return True


def _joined(a: Part, b: Part) -> bool:
    """Parent and child on the same side (the head and the limbs hang off the torso)."""
    for x, y in ((a, b), (b, a)):
        if PARENT.get(y.type) == x.type and (x.side is None or x.side == y.side) and "detached" not in y.tag:
            return True
    return False


def sample_figure(rng: np.random.Generator, name: str | None = None, max_tries: int = 200) -> Figure:
    """A random intact, unambiguous figure on a random background."""
    for _ in range(max_tries):
        pose = sample_pose(rng, name)
        parts = build_parts(pose)
        if is_clean(parts):
            return Figure(pose, parts, sample_background(rng))
    raise RuntimeError(f"no clean figure of pose {name!r} in {max_tries} tries")


def with_parts(figure: Figure, parts: list[Part], defects: list[tuple[str, str]]) -> Figure:
    return replace(figure, parts=parts, defects=list(defects))
