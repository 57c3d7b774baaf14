"""Rewards on the planned skeleton (SkeleGuide's stage 1) and on the person rendered from it.

``skeleton`` -- plausibility of a skeleton, exact and cheap
-----------------------------------------------------------
The reward scores *layout images* (parsed with the tolerant
:func:`~armature.skeleton.parse.parse_layout`); :func:`skeleton_terms` / :func:`skeleton_score`
score a :class:`~armature.skeleton.keypoints.Skeleton` directly (a learner can score its plan
without drawing it). Four terms, each in [0, 1], per person:

* ``angles``: elbow and knee bends in the image plane, in the anatomy gym's convention (0 =
  straight; the forearm turns toward the midline, the shin away from it; a bend below 0 is
  reversed). The person's facing is read from the shoulders (hips if absent): a left shoulder on
  the image's left means we see the back, and the sides swap. A bend ``b`` inside
  ``angle_limits`` (default :data:`ANGLE_LIMITS`: elbow [-10, 120], knee [-10, 110] degrees,
  just inside the gym oracle's "overbent" thresholds of 122 and 112; a real elbow folds to
  about 145, so widen them for photos) scores 1, else ``max(0, 1 - d / angle_margin)``, ``d`` the
  degrees outside, ``angle_margin`` = 30.
* ``proportions``: per side, forearm / upper arm (0.85), shin / thigh (0.95), upper arm / torso
  (0.63), thigh / torso (0.80) (:data:`PROPORTIONS`: adult anthropometry, which the gym's
  figures follow; torso = mid-shoulders to mid-hips). A ratio ``r`` against its typical ``r0``
  scores ``max(0, 1 - max(0, |ln(r / r0)| - ln(1 + t)) / ln 2)`` with ``t =
  proportion_tolerance`` = 0.3: 1 within a factor 1.3 either way, 0 a further factor 2 out.
* ``symmetry``: each of the four limb bones left against right, the same formula with ``r0 = 1``
  and ``t = symmetry_tolerance`` = 0.15 (a 64 px layout rounds joints to pixels: an 8 px
  forearm's length moves by up to a pixel).
* ``completeness``: the mean visibility of the 17 joints (a missing joint costs 1/17 of it).

An angle, ratio or pair is counted only when its joints are present (weight: the smallest
visibility among them); a term with nothing to count scores 0. A person's score is
``sum_k w_k term_k / sum_k w_k`` (``weights``, all 1 by default); a skeleton's is the mean over
its people, 0 when it has none. 2-D limits cannot see depth: a forearm pointing at the camera
looks short. The tolerances are meant for front or back views such as the gym's.

``pose_adherence`` -- does the rendered person follow the plan
---------------------------------------------------------------
PCK: the fraction of the planned person's present joints whose estimated position on the
rendered image lies within ``alpha * size`` of the plan, ``size`` = the larger side of the
box of the planned joints (``reference="bbox"``, default ``alpha`` = 0.1) or the torso length
(``reference="torso"``). Several planned people: each is matched to its best estimated person,
and the reward is their mean. The pose is estimated

* ``method="gym"``: from the anatomy oracle's colour segmentation
  (:func:`~armature.skeleton.extract.from_figure_image`; images resized to 64x64 nearest);
* ``method="blazepose"``: by BlazePose on photos (:func:`~armature.skeleton.extract.from_photo`;
  a joint counts as found when its visibility is at least ``min_visibility``);
* ``method="auto"``: gym for 64x64 images, BlazePose otherwise.

**How the plan reaches it.** :class:`Reward` takes images and prompts only, so the plan comes
alongside, by one of (first that applies):

1. ``reward(images, prompts, plans=[...])``: one plan per image;
2. ``reward.set_plans([...])`` before a plain ``reward(images, prompts)``: a list, used by the
   next call only;
3. ``reward.set_plans({prompt: plan})`` or the config's ``plans`` (a JSON file holding such an
   object): a plan per prompt, kept; how a learner that only passes prompts uses it.

A plan is a :class:`Skeleton`, its JSON (dict or text) or a layout image (array or PIL image,
parsed exactly). An image with no plan raises ValueError saying so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import PIL.Image

from armature.gym.figures import SIZE
from armature.skeleton.extract import from_figure_image, from_photo
from armature.skeleton.keypoints import INDEX, Skeleton
from armature.skeleton.parse import parse_layout

from .base import Reward
from .pose import BlazePose
from .registry import register

ANGLE_LIMITS = {"elbow": (-10.0, 120.0), "knee": (-10.0, 110.0)}
BONES = {
    "upper_arm": ("shoulder", "elbow"),
    "forearm": ("elbow", "wrist"),
    "thigh": ("hip", "knee"),
    "shin": ("knee", "ankle"),
}
PROPORTIONS = (
    ("forearm", "upper_arm", 0.85),
    ("shin", "thigh", 0.95),
    ("upper_arm", "torso", 0.63),
    ("thigh", "torso", 0.80),
)
TERMS = ("angles", "proportions", "symmetry", "completeness")
DEFAULT_WEIGHTS = dict.fromkeys(TERMS, 1.0)


def _check_weights(weights, defaults, what: str) -> dict[str, float]:
    out = dict(defaults)
    for key, value in dict(weights or {}).items():
        if key not in defaults:
            raise ValueError(f"{what}: unknown weights.{key}; expected keys {sorted(defaults)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{what}: weights.{key} must be a finite number >= 0, got {value!r}")
        out[key] = float(value)
    if sum(out.values()) <= 0:
        raise ValueError(f"{what}: every weight is 0; give at least one positive weights.<term>")
    return out


def _angle(vector: np.ndarray, side: float) -> float:
    return math.degrees(math.atan2(side * vector[0], vector[1]))


def _wrap(angle: float) -> float:
    return (angle + 180.0) % 360.0 - 180.0


def _ratio_score(ratio: float, typical: float, tolerance: float) -> float:
    excess = abs(math.log(max(ratio, 1e-9) / typical)) - math.log(1.0 + tolerance)
    return max(0.0, 1.0 - max(0.0, excess) / math.log(2.0))


def _mean(items: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in items)
    return sum(s * w for s, w in items) / total if total > 0 else 0.0


def joint_bends(person: np.ndarray) -> dict[str, float]:
    """``{"left_elbow": degrees, ...}`` for the elbows and knees whose three joints are present."""
    xy, present = person[:, :2], person[:, 2] > 0
    facing = 1.0
    for a, b in (("left_shoulder", "right_shoulder"), ("left_hip", "right_hip")):
        if present[INDEX[a]] and present[INDEX[b]] and xy[INDEX[a], 0] != xy[INDEX[b], 0]:
            facing = 1.0 if xy[INDEX[a], 0] > xy[INDEX[b], 0] else -1.0
            break
    out = {}
    for side, s in (("left", facing), ("right", -facing)):
        for joint, (root, middle, end) in (
            ("elbow", ("shoulder", "elbow", "wrist")),
            ("knee", ("hip", "knee", "ankle")),
        ):
            i, j, k = (INDEX[f"{side}_{n}"] for n in (root, middle, end))
            if not (present[i] and present[j] and present[k]):
                continue
            upper, lower = _angle(xy[j] - xy[i], s), _angle(xy[k] - xy[j], s)
            out[f"{side}_{joint}"] = _wrap(upper - lower) if joint == "elbow" else _wrap(lower - upper)
    return out


def skeleton_terms(
    skeleton: Skeleton,
    person: int = 0,
    weights: Mapping[str, float] | None = None,
    angle_margin: float = 30.0,
    proportion_tolerance: float = 0.3,
    symmetry_tolerance: float = 0.15,
    angle_limits: Mapping | None = None,
) -> dict[str, float]:
    """The four terms and ``score`` of one person (see the module docstring)."""
    weights = _check_weights(weights, DEFAULT_WEIGHTS, "skeleton reward")
    p = skeleton.array[person]
    xy, v = p[:, :2], np.clip(p[:, 2], 0.0, 1.0)

    def vis(*names):
        return min(v[INDEX[n]] for n in names)

    angles = []
    for name, bend in joint_bends(p).items():
        side, joint = name.split("_")
        low, high = (angle_limits or ANGLE_LIMITS)[joint]
        outside = max(low - bend, bend - high, 0.0)
        root, end = ("shoulder", "wrist") if joint == "elbow" else ("hip", "ankle")
        angles.append((max(0.0, 1.0 - outside / angle_margin), vis(f"{side}_{root}", name, f"{side}_{end}")))

    lengths, confidence = {}, {}
    for side in ("left", "right"):
        for bone, (a, b) in BONES.items():
            ja, jb = f"{side}_{a}", f"{side}_{b}"
            if v[INDEX[ja]] > 0 and v[INDEX[jb]] > 0:
                lengths[side, bone] = float(np.linalg.norm(xy[INDEX[ja]] - xy[INDEX[jb]]))
                confidence[side, bone] = vis(ja, jb)
    girdle = ("left_shoulder", "right_shoulder", "left_hip", "right_hip")
    if all(v[INDEX[n]] > 0 for n in girdle):
        shoulders = (xy[INDEX["left_shoulder"]] + xy[INDEX["right_shoulder"]]) / 2
        hips = (xy[INDEX["left_hip"]] + xy[INDEX["right_hip"]]) / 2
        for side in ("left", "right"):
            lengths[side, "torso"] = float(np.linalg.norm(shoulders - hips))
            confidence[side, "torso"] = vis(*girdle)
    proportions = []
    for side in ("left", "right"):
        for numerator, denominator, typical in PROPORTIONS:
            if (side, numerator) in lengths and (side, denominator) in lengths:
                ratio = lengths[side, numerator] / max(lengths[side, denominator], 1e-9)
                proportions.append(
                    (
                        _ratio_score(ratio, typical, proportion_tolerance),
                        min(confidence[side, numerator], confidence[side, denominator]),
                    )
                )
    symmetry = []
    for bone in BONES:
        if ("left", bone) in lengths and ("right", bone) in lengths:
            ratio = lengths["left", bone] / max(lengths["right", bone], 1e-9)
            symmetry.append(
                (_ratio_score(ratio, 1.0, symmetry_tolerance), min(confidence["left", bone], confidence["right", bone]))
            )
    terms = {
        "angles": _mean(angles),
        "proportions": _mean(proportions),
        "symmetry": _mean(symmetry),
        "completeness": float(v.mean()),
    }
    terms["score"] = sum(weights[k] * terms[k] for k in TERMS) / sum(weights.values())
    return terms


def skeleton_score(skeleton: Skeleton, **options) -> float:
    """Mean :func:`skeleton_terms` score over the people (0 with none)."""
    if skeleton.num_people == 0:
        return 0.0
    return float(np.mean([skeleton_terms(skeleton, p, **options)["score"] for p in range(skeleton.num_people)]))


@register("skeleton")
class SkeletonReward(Reward):
    """Plausibility of the skeleton drawn in each *layout image*, in [0, 1] (module docstring)."""

    name = "skeleton"

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        angle_margin: float = 30.0,
        proportion_tolerance: float = 0.3,
        symmetry_tolerance: float = 0.15,
        angle_limits: Mapping | None = None,
        hue_radius: float = 10.0,
    ):
        limits = dict(ANGLE_LIMITS)
        for joint, value in dict(angle_limits or {}).items():
            pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
            if joint not in ANGLE_LIMITS or not (pair and float(value[0]) < float(value[1])):
                raise ValueError(
                    f"skeleton reward: angle_limits.{joint}: expected elbow or knee: [low, high] "
                    f"degrees with low < high, got {value!r}"
                )
            limits[joint] = (float(value[0]), float(value[1]))
        self.options = {
            "weights": _check_weights(weights, DEFAULT_WEIGHTS, "skeleton reward"),
            "angle_margin": float(angle_margin),
            "proportion_tolerance": float(proportion_tolerance),
            "symmetry_tolerance": float(symmetry_tolerance),
            "angle_limits": limits,
        }
        self.hue_radius = float(hue_radius)
        self.last_skeletons: list[Skeleton] = []

    def score_skeletons(self, skeletons: Sequence[Skeleton]) -> np.ndarray:
        """Scores of skeletons given directly (no image), float32 ``[B]``."""
        return np.array([skeleton_score(s, **self.options) for s in skeletons], dtype=np.float32)

    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        self.last_skeletons = [parse_layout(image, hue_radius=self.hue_radius) for image in images]
        return self.score_skeletons(self.last_skeletons)


# ----------------------------------------------------------------------------- pose adherence
def reference_size(person: np.ndarray, reference: str = "bbox") -> float:
    """The planned person's size for PCK: its joints' box's larger side, or its torso length."""
    present = person[:, 2] > 0
    if reference == "torso":
        names = ("left_shoulder", "right_shoulder", "left_hip", "right_hip")
        if all(present[INDEX[n]] for n in names):
            top = (person[INDEX["left_shoulder"], :2] + person[INDEX["right_shoulder"], :2]) / 2
            bottom = (person[INDEX["left_hip"], :2] + person[INDEX["right_hip"], :2]) / 2
            return float(np.linalg.norm(top - bottom))
    elif reference != "bbox":
        raise ValueError(f"pose_adherence: reference must be 'bbox' or 'torso', got {reference!r}")
    xy = person[present, :2]
    return float((xy.max(0) - xy.min(0)).max()) if len(xy) else 0.0


def pck(
    estimated: Skeleton, planned: Skeleton, alpha: float = 0.1, reference: str = "bbox", min_visibility: float = 1e-9
) -> float:
    """PCK of ``estimated`` against ``planned`` (module docstring); ``estimated`` is rescaled to
    the plan's canvas. A planned person is matched to its best estimated person; a plan with no
    joint scores 0."""
    if (estimated.width, estimated.height) != (planned.width, planned.height):
        estimated = estimated.resized(planned.width, planned.height)
    scores = []
    for person in planned.array:
        present = person[:, 2] > 0
        if not present.any():
            continue
        threshold = alpha * reference_size(person, reference)
        best = 0.0
        for guess in estimated.array:
            found = guess[:, 2] >= min_visibility
            near = np.linalg.norm(guess[:, :2] - person[:, :2], axis=1) <= threshold
            best = max(best, float((present & found & near).sum() / present.sum()))
        scores.append(best)
    return float(np.mean(scores)) if scores else 0.0


def as_plan(plan) -> Skeleton:
    """A plan given as a Skeleton, its JSON (dict or text) or a layout image."""
    if isinstance(plan, Skeleton):
        return plan
    if isinstance(plan, (dict, str, bytes)):
        return Skeleton.from_json(plan)
    if isinstance(plan, (np.ndarray, PIL.Image.Image)):
        return parse_layout(plan)
    raise TypeError(f"a plan must be a Skeleton, its JSON or a layout image, got {type(plan).__name__}")


@register("pose_adherence")
class PoseAdherence(Reward):
    """PCK of the pose estimated on each image against its planned skeleton (module docstring)."""

    name = "pose_adherence"

    def __init__(
        self,
        alpha: float = 0.1,
        reference: str = "bbox",
        method: str = "gym",
        plans: str | Mapping | None = None,
        min_visibility: float = 0.5,
        cache_dir: str | None = None,
    ):
        if method not in ("gym", "blazepose", "auto"):
            raise ValueError(f"pose_adherence: method must be 'gym', 'blazepose' or 'auto', got {method!r}")
        if reference not in ("bbox", "torso"):
            raise ValueError(f"pose_adherence: reference must be 'bbox' or 'torso', got {reference!r}")
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"pose_adherence: alpha must be a number > 0, got {alpha!r}")
        self.alpha, self.reference, self.method = float(alpha), reference, method
        self.min_visibility, self.cache_dir = float(min_visibility), cache_dir
        self._by_prompt: dict[str, Skeleton] = {}
        self._next: list[Skeleton] | None = None
        self._call: list | None = None
        self._estimator = None
        self.last_estimates: list[Skeleton] = []
        if plans is not None:
            if isinstance(plans, (str, Path)):
                try:
                    plans = json.loads(Path(plans).read_text())
                except (OSError, json.JSONDecodeError) as err:
                    raise ValueError(
                        f"pose_adherence: plans: cannot read {plans!r} as a JSON object {{prompt: pose JSON}} ({err})"
                    ) from None
            if not isinstance(plans, Mapping):
                raise ValueError("pose_adherence: plans must be a JSON object mapping each prompt to its pose JSON")
            self.set_plans(plans)

    def set_plans(self, plans) -> None:
        """A mapping prompt -> plan (kept), or a list of plans for the next call's images."""
        if isinstance(plans, Mapping):
            self._by_prompt.update({str(prompt): as_plan(plan) for prompt, plan in plans.items()})
        else:
            self._next = [as_plan(plan) for plan in plans]

    def __call__(self, images, prompts, plans=None) -> np.ndarray:
        if plans is None and self._next is not None:
            plans, self._next = self._next, None
        self._call = None if plans is None else [as_plan(plan) for plan in plans]
        if not isinstance(images, PIL.Image.Image):
            images = list(images)
        try:
            if self._call is not None and len(self._call) != len(images):
                raise ValueError(
                    f"pose_adherence: got {len(self._call)} plans for {len(images)} images; give one plan per image"
                )
            return super().__call__(images, prompts)
        finally:
            self._call = None

    def estimate(self, image: PIL.Image.Image) -> Skeleton:
        """The pose on one image (by ``method``), on the image's own canvas."""
        image = image.convert("RGB")
        method = self.method if self.method != "auto" else ("gym" if image.size == (SIZE, SIZE) else "blazepose")
        if method == "gym":
            small = image if image.size == (SIZE, SIZE) else image.resize((SIZE, SIZE), PIL.Image.NEAREST)
            return from_figure_image(np.asarray(small)).resized(*image.size)
        if self._estimator is None:
            self._estimator = BlazePose(self.cache_dir, min_detection_score=0.3)
        return from_photo(np.asarray(image), self._estimator)

    def _plan(self, i: int, prompt: str) -> Skeleton:
        if self._call is not None:
            return self._call[i]
        if prompt in self._by_prompt:
            return self._by_prompt[prompt]
        raise ValueError(
            f"pose_adherence: no plan for image {i} (prompt {prompt!r}); pass plans=[...] to the call, "
            "call set_plans() first, or give reward.components.pose_adherence.plans a JSON file "
            "{prompt: pose}"
        )

    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        plans = [self._plan(i, p) for i, p in enumerate(prompts)]
        self.last_estimates = [self.estimate(image) for image in images]
        return np.array(
            [pck(e, p, self.alpha, self.reference, self.min_visibility) for e, p in zip(self.last_estimates, plans)],
            dtype=np.float32,
        )
