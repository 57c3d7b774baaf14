"""Defect injectors: an intact figure made wrong in one place (ASAP-style localized degradation).

Each injector takes an intact :class:`~armature.gym.figures.Figure` and returns the same figure
(same pose, same background) with one anatomical error, and its ground truth as
``(kind, part)`` defects in the oracle's vocabulary:

==============  ==================================================================
``extra``       an extra hand on a forearm, or a whole extra arm or leg off the torso
``missing``     a hand, a foot, the head, a whole arm or leg, or a limb cut off at the elbow
                or knee (forearm and hand, or shin and foot, gone: the gym policy's commonest
                severe error)
``reversed``    an elbow or a knee bent the wrong way
``overbent``    an elbow or a knee bent past its limit
``proportion``  one limb bone far too long, or the head far too big or too small
``detached``    a head, hand, foot, forearm or shin drawn away from its joint, by a gap from
                just over the oracle's 2 px tolerance up to 8 px
==============  ==================================================================

An injection that would draw ambiguously (parts of one colour touching, a part off the canvas)
is redrawn with other random choices. :func:`make_pair` turns an intact figure and its broken
copy into a record of the preference-pair format (the intact image preferred) whose mask covers
exactly where the two images differ; :func:`pairs` can also set a milder defect against a severe
one on the same figure (graded pairs), so that a scorer learns the severity scale, not only
intact against broken.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np

from armature.gym.figures import (
    PARENT,
    SIZE,
    Figure,
    Part,
    build_parts,
    is_apart,
    is_attached,
    is_clean,
    render,
    sample_figure,
    with_parts,
)
from armature.gym.oracle import AnatomyOracle, severity_of
from armature.images import encode_image

KINDS = ("extra", "missing", "reversed", "overbent", "proportion", "detached")
CHAINS = {"arm": ("upper_arm", "forearm", "hand"), "leg": ("thigh", "shin", "foot")}
CUT_AT = {"forearm": ("forearm", "hand"), "shin": ("shin", "foot")}  # a limb cut off at the elbow / knee
JOINT_OF = {"elbow": "arm", "knee": "leg"}
REVERSED = (-75.0, -45.0)
OVERBENT = {"elbow": (137.0, 150.0), "knee": (127.0, 140.0)}


def _side(rng) -> str:
    return ("left", "right")[rng.integers(2)]


def extra(figure: Figure, rng) -> tuple[list[Part], list]:
    side, parts = _side(rng), copy.deepcopy(figure.parts)
    if rng.random() < 0.4:  # a second hand halfway along a forearm
        fore = next(p for p in parts if p.type == "forearm" and p.side == side)
        hand = next(p for p in parts if p.type == "hand" and p.side == side)
        (x0, y0), (x1, y1) = np.array(fore.points[0]), np.array(fore.points[1])
        along = np.array([x1 - x0, y1 - y0]) / max(np.hypot(x1 - x0, y1 - y0), 1e-6)
        normal = np.array([-along[1], along[0]]) * rng.choice([-1, 1])
        at = np.array([x0, y0]) + rng.uniform(0.45, 0.6) * np.array([x1 - x0, y1 - y0])
        centre = at + normal * (fore.width / 2 + hand.radius)
        parts.append(Part("hand", f"{side}+extra", [tuple(centre)], radius=hand.radius, tag="extra"))
        return parts, [("extra", "hand")]
    chain = ("arm", "leg")[rng.integers(2)]
    # the same limb drawn again from another point of the torso, at another angle
    pose = copy.deepcopy(figure.pose)
    angles = pose.angles[side]
    if chain == "arm":
        angles["shoulder"] = float(rng.uniform(40, 110))
        angles["elbow"] = float(rng.uniform(0, 40))
    else:
        angles["hip"] = float(rng.uniform(30, 60))
        angles["knee"] = float(rng.uniform(0, 30))
    grown = [p for p in build_parts(pose) if p.side == side and p.type in CHAINS[chain]]
    shift = np.array([0.0, rng.uniform(5, 8) * (1 if chain == "arm" else -1)])
    for p in grown:
        p.points = [tuple(np.array(q) + shift) for q in p.points]
        p.side, p.tag = f"{side}+extra", "extra"
    return parts + grown, [("extra", t) for t in CHAINS[chain]]


def missing(figure: Figure, rng) -> tuple[list[Part], list]:
    side, what = _side(rng), ("arm", "leg", "hand", "foot", "head", "forearm", "shin")[rng.integers(7)]
    types = CHAINS.get(what) or CUT_AT.get(what) or (what,)
    parts = [p for p in figure.parts if not (p.type in types and (p.side in (side, None)))]
    return parts, [("missing", t) for t in types]


def _bent(figure: Figure, rng, ranges: dict, kind: str) -> tuple[list[Part], list]:
    joint, side = ("elbow", "knee")[rng.integers(2)], _side(rng)
    pose = copy.deepcopy(figure.pose)
    pose.angles[side][joint] = float(rng.uniform(*ranges[joint]))
    return build_parts(pose), [(kind, joint)]


def reversed_joint(figure: Figure, rng):
    return _bent(figure, rng, {"elbow": REVERSED, "knee": REVERSED}, "reversed")


def overbent(figure: Figure, rng):
    return _bent(figure, rng, OVERBENT, "overbent")


def proportion(figure: Figure, rng) -> tuple[list[Part], list]:
    bone = ("upper_arm", "forearm", "thigh", "shin", "head_radius")[rng.integers(5)]
    long = rng.random() < 0.5
    pose = copy.deepcopy(figure.pose)
    if bone == "head_radius":
        pose.bone_scale["head_radius"] = float(rng.uniform(1.6, 1.8) if long else rng.uniform(0.5, 0.58))
    else:
        # only too long: a bone shrunk to a stub has no direction to read, and reads as missing
        pose.bone_scale[f"{_side(rng)}.{bone}"] = float(rng.uniform(1.9, 2.3))
    return build_parts(pose), [("proportion", "head" if bone == "head_radius" else bone)]


def detached(figure: Figure, rng) -> tuple[list[Part], list]:
    side, parts = _side(rng), copy.deepcopy(figure.parts)
    root = ("head", "hand", "foot", "forearm", "shin")[rng.integers(5)]
    moved = {root, *{"forearm": ("hand",), "shin": ("foot",)}.get(root, ())}
    chosen = [p for p in parts if p.type in moved and p.side in (side, None)]
    anchor = next(p for p in chosen if p.type == root)
    parent = next(p for p in parts if p.type == PARENT[root] and p.side in (side, None))
    # away from the parent's centre; a step that leaves the gap within the oracle's tolerance is
    # redrawn (is_apart), so the narrow end is the faint gap at a joint the policy draws
    centre = np.mean(anchor.points, 0)
    away = centre - np.mean(parent.points, 0)
    away = away / max(np.linalg.norm(away), 1e-6)
    step = away * rng.uniform(3, 8)
    for p in chosen:
        p.points = [tuple(np.array(q) + step) for q in p.points]
    anchor.tag = "detached"
    return parts, [("detached", root)]


INJECTORS = {
    "extra": extra,
    "missing": missing,
    "reversed": reversed_joint,
    "overbent": overbent,
    "proportion": proportion,
    "detached": detached,
}


def inject(figure: Figure, kind: str, rng: np.random.Generator, max_tries: int = 50) -> Figure:
    """``figure`` with one defect of ``kind``; the ground truth in the result's ``defects``."""
    if kind not in INJECTORS:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {', '.join(KINDS)}")
    for _ in range(max_tries):
        parts, defects = INJECTORS[kind](figure, rng)
        if is_clean(parts) and is_attached(parts) and is_apart(parts):
            return with_parts(figure, parts, defects)
    raise RuntimeError(f"could not inject {kind!r} cleanly in {max_tries} tries")


def severity(defects) -> int:
    return max((severity_of(k, p) for k, p in defects), default=0)


def sample_defective(
    rng: np.random.Generator, kind: str | None = None, pose: str | None = None, max_tries: int = 20
) -> tuple[Figure, Figure]:
    """An intact figure and a broken copy of it (``kind`` random when None)."""
    for _ in range(max_tries):
        intact = sample_figure(rng, pose)
        try:
            return intact, inject(intact, kind or KINDS[rng.integers(len(KINDS))], rng)
        except RuntimeError:
            continue
    raise RuntimeError(f"no figure took a {kind!r} defect in {max_tries} tries")


def milder(figure: Figure, rng: np.random.Generator, below: int, max_tries: int = 50) -> Figure | None:
    """``figure`` (intact) with one defect of severity 1 to ``below - 1`` (ground truth, not the
    oracle's reading), or None when no injection lands in that range in ``max_tries``."""
    for _ in range(max_tries):
        try:
            broken = inject(figure, KINDS[rng.integers(len(KINDS))], rng)
        except RuntimeError:
            continue
        if 1 <= severity(broken.defects) < below:
            return broken
    return None


def difference_mask(a: np.ndarray, b: np.ndarray, grow: int = 2) -> np.ndarray:
    """Where two images differ, grown by ``grow`` pixels: ``[H, W]`` uint8 0/255."""
    from scipy import ndimage

    changed = np.any(a != b, axis=-1)
    if grow:
        changed = ndimage.binary_dilation(changed, np.ones((3, 3)), iterations=grow)
    return changed.astype(np.uint8) * 255


def make_pair(
    intact: Figure, broken: Figure, pair_id: str | None = None, images: tuple[np.ndarray, np.ndarray] | None = None
) -> dict:
    """A preference-pair record (``armature.data.pairs`` format): the first figure preferred
    (intact, or in a graded pair a milder defect), the region mask where the two drawings differ,
    the severities of both. ``images`` replaces the drawings stored (e.g. the same two after a
    generator's decoder); the mask stays the drawings' difference."""
    good, bad = render(intact), render(broken)
    stored = images if images is not None else (good, bad)
    kinds = sorted({k for k, _ in broken.defects})
    return {
        "pair_id": pair_id or hashlib.sha1(good.tobytes() + bad.tobytes()).hexdigest()[:16],
        "prompt": intact.prompt,
        "image_w": encode_image(stored[0]),
        "image_l": encode_image(stored[1]),
        "label": "w",
        "mask": encode_image(difference_mask(good, bad)),
        "severity_w": severity(intact.defects),
        "severity_l": severity(broken.defects),
        "source": "gym:"
        + "+".join(kinds)
        + (" over " + "+".join(sorted({k for k, _ in intact.defects})) if intact.defects else ""),
    }


def _intact_of(broken: Figure) -> Figure:
    """The intact figure a broken one was made from (same pose and background)."""
    return with_parts(broken, build_parts(broken.pose), [])


def agreement(n_intact: int, n_per_kind: int, seed: int = 0, oracle=None, transform=None) -> dict:
    """Render ``n_intact`` intact figures and ``n_per_kind`` broken ones of every kind; the share
    on which the oracle's defects (kind and part) and severity equal the ground truth.
    ``transform`` (``[N, H, W, 3]`` uint8 -> same) alters the drawings first, e.g. an autoencoder's
    round trip, to see how the oracle reads images that went through a generator's decoder."""
    oracle = oracle or AnatomyOracle()
    rng = np.random.default_rng(seed)
    cases = [None] * n_intact + [k for k in KINDS for _ in range(n_per_kind)]
    figures = [sample_defective(rng, kind)[1] if kind else sample_figure(rng) for kind in cases]
    images = np.stack([render(f) for f in figures]) if figures else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    if transform is not None and len(images):
        images = transform(images)
    right, by_kind, mistakes = 0, {}, []
    for kind, broken, image in zip(cases, figures, images):
        verdict = oracle(image)
        truth = sorted(set(broken.defects))
        ok = verdict.defects == truth and verdict.severity == severity(truth)
        right += ok
        name = kind or "intact"
        hits, total = by_kind.get(name, (0, 0))
        by_kind[name] = (hits + ok, total + 1)
        if not ok:
            mistakes.append({"truth": truth, "found": verdict.defects})
    return {
        "figures": len(cases),
        "agreement": right / max(len(cases), 1),
        "by_kind": {k: h / t for k, (h, t) in by_kind.items()},
        "mistakes": mistakes,
    }


def pairs(n: int, seed: int = 0, transform=None, crossed: float = 0.0, graded: float = 0.0) -> list[dict]:
    """``n`` preference pairs (intact preferred over one injected defect, kinds in turn).

    ``transform`` (``[N, H, W, 3]`` uint8 -> same), e.g. a round trip through the policy's VAE,
    puts both images of every pair in the domain of a generator's decoded samples. A share
    ``crossed`` of the pairs sets an intact figure against another figure's broken copy: pairs of
    one figure teach a scorer what a defect changes, crossed ones to rank different figures, as
    Best-of-N and RL ask of it. A share ``graded`` of the pairs whose broken figure is severe
    (severity 3) prefers, instead of an intact drawing, the same figure with a milder defect
    (severity 1 or 2): most of a policy's samples carry some defect, and Best-of-N must still
    rank a missing hand above a missing forearm."""
    for name, share in (("crossed", crossed), ("graded", graded)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name}={share}: a share of the pairs, between 0 and 1 (0: none)")
    rng = np.random.default_rng(seed)
    figures = [sample_defective(rng, KINDS[i % len(KINDS)]) for i in range(n)]
    cross = rng.random(n) < crossed
    figures = [(figures[(i + 1) % n][0] if cross[i] else intact, broken) for i, (intact, broken) in enumerate(figures)]
    if graded > 0:  # drawn after the crossing, so graded=0 leaves a seed's pairs as they were
        grade = rng.random(n) < graded
        for i, (intact, broken) in enumerate(figures):
            if grade[i] and severity(broken.defects) == 3:
                mild = milder(_intact_of(broken), rng, below=3)
                figures[i] = (mild, broken) if mild is not None else (intact, broken)
    images = [None] * n
    if transform is not None and n:
        good = transform(np.stack([render(intact) for intact, _ in figures]))
        bad = transform(np.stack([render(broken) for _, broken in figures]))
        images = list(zip(good, bad))
    return [
        make_pair(intact, broken, pair_id=f"gym-{seed}-{i}", images=images[i])
        for i, (intact, broken) in enumerate(figures)
    ]
