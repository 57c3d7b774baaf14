"""The pose reward on real photographs vs locally degraded copies of them.

Photos: the scikit-image pictures with a person in them (``astronaut``, ``camera``). For
each, BlazePose finds the person; a body region (the box around some of its landmarks,
padded) is broken by each degradation of :mod:`armature.data.synthetic` (duplicate, warp,
remove, mirror, shift). A pair counts as won when the intact photo scores higher.

Region sets, reported separately:

* ``limbs``: whole arms and legs, pad 0.05, seeds 0, 1 (the set the term weights were first
  chosen on; a tuning set);
* ``dev``: a development set defined before any of the scorer's second round of changes
  (hands, elbows, knees, feet, the shoulder and hip girdles, the flanks; pads 0.04 and 0.07,
  seeds 3, 4); changes are chosen on ``limbs`` and ``dev`` only;
* ``held-out``: forearm + hand, upper arm, shin + foot, thigh, head; pad 0.03, seed 2 (the
  original 70-pair held-out set);
* ``held-out-wide``: the same held-out regions at pads 0.03 and 0.06, seeds 2, 6, 7;
* ``background`` (a control, not a target): the same degradations on 8 square boxes per photo
  (50 to 110 pixels, seed 123) that stay 40 pixels clear of every landmark of the person. A
  scorer that measures the body should be near 50 % here (nothing about the person changed);
  a rate far above 50 % means the intact photo merely sits high in the estimator's noise
  (any change to the image lowers its score), which inflates the body rates as well.

In ``dev`` and ``held-out-wide`` a degraded image identical to one already in the set (e.g.
``remove`` does not depend on the seed) is counted once. The regions come from the landmarks
of a plain :class:`BlazePose` (threshold 0.3, refine 0), so the pairs do not depend on the scorer's
settings. Needs ``armature assets pose``.

    python benchmarks/pose_pairs.py [--sets limbs,dev,background,held-out,held-out-wide] [--per-term]
"""

from __future__ import annotations

import argparse
import hashlib

import numpy as np

from armature.data.synthetic import DEGRADATIONS, box_mask, degrade, keypoint_box

LIMB_REGIONS = {
    "left_arm": [11, 13, 15, 17, 19, 21],
    "right_arm": [12, 14, 16, 18, 20, 22],
    "left_leg": [23, 25, 27, 29, 31],
    "right_leg": [24, 26, 28, 30, 32],
}
HELD_OUT_REGIONS = {
    "left_forearm": [13, 15, 17, 19, 21],
    "right_forearm": [14, 16, 18, 20, 22],
    "left_upper_arm": [11, 13],
    "right_upper_arm": [12, 14],
    "left_shin": [25, 27, 29, 31],
    "right_shin": [26, 28, 30, 32],
    "left_thigh": [23, 25],
    "right_thigh": [24, 26],
    "head": list(range(11)),
}
DEV_REGIONS = {
    "left_hand": [15, 17, 19, 21],
    "right_hand": [16, 18, 20, 22],
    "left_elbow": [13],
    "right_elbow": [14],
    "left_knee": [25],
    "right_knee": [26],
    "left_foot": [27, 29, 31],
    "right_foot": [28, 30, 32],
    "shoulders": [11, 12],
    "hips": [23, 24],
    "left_flank": [11, 23],
    "right_flank": [12, 24],
}
# name -> (regions, paddings, seeds, count identical degraded images once)
REGION_SETS = {
    "limbs": (LIMB_REGIONS, (0.05,), (0, 1), False),
    "dev": (DEV_REGIONS, (0.04, 0.07), (3, 4), True),
    "held-out": (HELD_OUT_REGIONS, (0.03,), (2,), False),
    "held-out-wide": (HELD_OUT_REGIONS, (0.03, 0.06), (2, 6, 7), True),
    "background": ("background", (), (0,), False),
}


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in ("astronaut", "camera"):
        image = getattr(data, name)()
        out[name] = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
    return out


def degraded_pairs(
    images: dict, landmarks: dict, regions: dict, pads, seeds, dedupe: bool = False, min_visibility: float = 0.5
):
    """Yield ``(photo, region, pad, kind, seed, degraded image)`` for every region with landmarks that
    are visible and inside the photo (BlazePose also places the body parts a photo cuts off, e.g. the
    astronaut's legs below its lower edge: a box around those would break something else)."""
    pads = (pads,) if isinstance(pads, (int, float)) else tuple(pads)
    for name, image in images.items():
        h, w = image.shape[:2]
        seen = set()
        for region, indices in regions.items():
            points = landmarks[name][indices][:, :3]  # x, y, visibility
            inside = (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)
            points = points[inside]
            for pad in pads:
                try:
                    box = keypoint_box(points, image.shape[:2], pad=pad, min_confidence=min_visibility)
                except ValueError:  # no landmark of the region is visible: nothing to break
                    continue
                mask = box_mask(image.shape[:2], box)
                for kind in DEGRADATIONS:
                    for seed in seeds:
                        degraded = degrade(image, mask, kind, np.random.default_rng(seed))
                        if np.array_equal(degraded, image):
                            continue
                        if dedupe:
                            key = hashlib.sha1(degraded.tobytes()).hexdigest()
                            if key in seen:
                                continue
                            seen.add(key)
                        yield name, region, pad, kind, seed, degraded


def background_pairs(
    images: dict, landmarks: dict, boxes: int = 8, seed: int = 123, margin: float = 40.0, min_visibility: float = 0.3
):
    """Yield ``(photo, "bg<i>", 0, kind, i, degraded image)``: each degradation on ``boxes`` square boxes
    per photo (50 to 110 pixels) clear of the person (the box around its landmarks inside the photo
    with visibility >= ``min_visibility``, grown by ``margin`` pixels)."""
    rng = np.random.default_rng(seed)
    for name, image in images.items():
        h, w = image.shape[:2]
        p = landmarks[name][:33]
        p = p[(p[:, 2] > min_visibility) & (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)]
        (x0, y0), (x1, y1) = p[:, :2].min(0) - margin, p[:, :2].max(0) + margin
        found = []
        while len(found) < boxes:
            side = int(rng.integers(50, 110))
            bx, by = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            if bx + side < x0 or bx > x1 or by + side < y0 or by > y1:
                found.append((bx, by, bx + side, by + side))
        for i, box in enumerate(found):
            mask = box_mask(image.shape[:2], box)
            for kind in DEGRADATIONS:
                degraded = degrade(image, mask, kind, np.random.default_rng(i))
                if not np.array_equal(degraded, image):
                    yield name, f"bg{i}", 0.0, kind, i, degraded


def region_landmarks(images: dict, cache_dir=None) -> dict:
    """The landmarks the regions are cut around: a plain BlazePose's (independent of the scorer's settings)."""
    from armature.rewards.pose import BlazePose

    estimator = BlazePose(cache_dir, min_detection_score=0.3)  # the reward's default threshold
    return {name: estimator(image).landmarks for name, image in images.items()}


def evaluate(reward, region_set: str = "limbs", max_pairs: int | None = None) -> list[dict]:
    """One record per pair: the intact and degraded rewards and every term of both."""
    from PIL import Image

    images = photos()
    intact = {name: reward.details([Image.fromarray(image)])[0] for name, image in images.items()}
    landmarks = region_landmarks(images, getattr(reward, "cache_dir", None))
    regions, pads, seeds, dedupe = REGION_SETS[region_set]
    records = []
    pairs = (
        background_pairs(images, landmarks)
        if regions == "background"
        else degraded_pairs(images, landmarks, regions, pads, seeds, dedupe)
    )
    for name, region, pad, kind, seed, degraded in pairs:
        terms = reward.details([Image.fromarray(degraded)])[0]
        records.append(
            {
                "photo": name,
                "region": region,
                "pad": pad,
                "kind": kind,
                "seed": seed,
                "intact": intact[name],
                "degraded": terms,
            }
        )
        if max_pairs and len(records) >= max_pairs:
            break
    return records


def win_rate(records: list[dict], term: str = "reward") -> float:
    return float(np.mean([r["intact"][term] > r["degraded"][term] for r in records]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-term", action="store_true", help="also the win rate of each term alone")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument(
        "--sets", default="limbs,dev,background", help=f"comma-separated region sets of {sorted(REGION_SETS)}"
    )
    args = parser.parse_args()
    from armature.rewards import load

    reward = load("pose", cache_dir=args.cache_dir)
    for name, image in photos().items():
        result = reward.estimator(image)
        print(
            f"{name}: person found={result.found} detection={result.detection_score:.3f} "
            f"presence={result.presence:.3f} reward={reward.details([__import__('PIL.Image').Image.fromarray(image)])[0]['reward']:.3f}"
        )
    print("| region set | pairs | intact photo scores higher |")
    print("| --- | --- | --- |")
    all_records = {}
    for region_set in args.sets.split(","):
        records = all_records[region_set] = evaluate(reward, region_set)
        print(f"| {region_set} | {len(records)} | {win_rate(records):.1%} |", flush=True)
    if args.per_term:
        terms = [k for k in next(iter(all_records.values()))[0]["intact"] if k != "reward"]
        print("| term | " + " | ".join(all_records) + " |")
        print("| --- |" + " --- |" * len(all_records))
        for term in terms:
            print(f"| {term} | " + " | ".join(f"{win_rate(r, term):.1%}" for r in all_records.values()) + " |")
        for region_set, records in all_records.items():
            for r in records:
                if r["intact"]["reward"] <= r["degraded"]["reward"]:
                    print(
                        f"lost ({region_set}): {r['photo']} {r['region']} pad {r['pad']} {r['kind']} seed {r['seed']}: "
                        f"{r['intact']['reward']:.4f} <= {r['degraded']['reward']:.4f}"
                    )


if __name__ == "__main__":
    main()
