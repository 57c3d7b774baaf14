"""Pose-keypoint-confidence reward (BACON's pose proxy) with MediaPipe BlazePose.

A real, pretrained pose estimator that runs offline: the BlazePose detector and the
BlazePose-full landmark model (Bazarevsky et al., 2020), plus the MediaPipe hand landmark
model, run with ``ai-edge-litert``. ``armature assets pose`` fetches them once (see
:mod:`armature.rewards.assets`).

Pipeline for one image (our own code after MediaPipe's published graph layout):

1. **Detector** (224x224, RGB in [-1, 1], the image letterboxed into a square): 2254 SSD
   anchors on feature maps of stride 8, 16, 32 (2, 2 and 6 anchors a cell, fixed size 1).
   Box ``i`` is decoded against its anchor centre ``(ax, ay)``::

       cx = ax + raw[0] / 224     cy = ay + raw[1] / 224     w = raw[2] / 224   h = raw[3] / 224
       keypoint k = (ax + raw[4 + 2k] / 224, ay + raw[5 + 2k] / 224)            k = 0..3

   scored ``sigmoid(clip(logit, +-100))``; kept above ``min_detection_score`` after a
   weighted non-maximum suppression (IoU 0.3). Keypoint 0 is the mid-hip, keypoint 1 a
   point whose distance to it is the radius of the circle around the whole body.
2. **ROI**: a square centred on the mid-hip, side ``2 * 1.25 * |k1 - k0|``, rotated by
   ``theta = atan2(dx, -dy)`` (``(dx, dy) = k1 - k0``) so the body is upright in the crop.
3. **Landmarks** (256x256 crop, RGB in [0, 1]): 39 landmarks x (x, y, z, visibility,
   presence) in crop pixels (33 body points, then 6 auxiliary ones), a pose presence
   score, and 39 world landmarks (metres, origin between the hips). Visibility and
   presence are logits (sigmoid). Crop points map back to the image through the ROI's
   rotation. With ``refine=1`` a second pass recentres the ROI on the auxiliary
   landmarks 33 (centre) and 34 (scale), as MediaPipe's tracking does (off by default).
   The model also gives 64x64 heatmaps (logits) of the 39 landmarks.
4. **Hands** (optional): a square around each wrist, index and pinky (side 2.7 times
   the wrist-to-knuckles distance, rotated so the fingers point up) goes through the hand
   landmark model (224x224, [0, 1]); its presence score is the hand confidence.

Scores (each in [0, 1]; the reward is their weighted mean, ``weights`` in config):

* ``presence``: the landmark model's pose presence score (0 if the detector finds no one);
  ``detection`` (weight 0 by default): the detector's score;
* ``visibility``: mean visibility of the 33 body landmarks;
* ``keypoint_confidence``: BACON's keypoint confidence, the visibility-weighted mean of
  each landmark's heatmap peak ``sigmoid(max heatmap_k)``;
* ``sharpness``: the visibility-weighted mean mass of each landmark's (softmax) heatmap
  within 2 cells of its peak -- a duplicated or smeared limb spreads it;
* ``plausibility``: the mean of three anatomical terms on the 3-D world landmarks --
  limb-length ratios (forearm/upper arm, shin/thigh, upper arm/shoulder width,
  thigh/shoulder width) near human proportions, joint-angle limits (elbows and knees not
  folded past ``min_joint_angle``), and left/right symmetry of the paired limb lengths;
  each limb term is weighted by the visibility of its joints;
* ``hands`` (weight 0 by default): mean hand presence over the two hands.

An image with no person detected scores 0 on every term.

Limits (measured with ``benchmarks/pose_pairs.py`` on scikit-image's astronaut and camera):
the terms respond to gross failures (no person, a cup of coffee), but barely to a *local*
break of one limb. The landmark model sees those half-body photos through a full-body ROI
(1000 to 1300 pixels a side for a 512-pixel photo), i.e. at about a fifth of their
resolution. Re-framing the same intact photo (flip, ROI scale 0.9 / 1.1, shift +-3 %) moves
its reward by a standard deviation of 0.02 to 0.03, the size of a typical intact-vs-degraded
difference (median 0.015 to 0.02). Averaged over those ten framings, per-landmark
confidences inside the broken region drop by under 0.02, and the intact photo wins about
half of the pairs. The single-framing pair rates (100 % limbs, 81.5 % dev, 87 to 88 %
held-out) come partly from the intact photo sitting near the top of that noise: the same
degradations on background boxes clear of the person are "won" 69 % of the time. Read
reward differences under about 0.03 between two images of one scene as noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import PIL.Image

from .assets import require_pose_files
from .base import Reward
from .registry import register

# BlazePose body landmark indices
NOSE = 0
L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 11, 12, 13, 14, 15, 16
L_PINKY, R_PINKY, L_INDEX, R_INDEX = 17, 18, 19, 20
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 23, 24, 25, 26, 27, 28
NUM_BODY = 33

# limb -> (joint a, joint b), per side
LIMBS = {
    "upper_arm": ((L_SHOULDER, L_ELBOW), (R_SHOULDER, R_ELBOW)),
    "forearm": ((L_ELBOW, L_WRIST), (R_ELBOW, R_WRIST)),
    "thigh": ((L_HIP, L_KNEE), (R_HIP, R_KNEE)),
    "shin": ((L_KNEE, L_ANKLE), (R_KNEE, R_ANKLE)),
}
# (numerator limb, denominator limb or "shoulders", typical ratio); adult anthropometry
# (e.g. Winter's segment lengths: upper arm 0.186 H, forearm 0.146 H, thigh 0.245 H,
# shin 0.246 H, shoulder width 0.259 H -- between the shoulder joints, about 0.2 H).
RATIOS = (
    ("forearm", "upper_arm", 0.80),
    ("shin", "thigh", 0.95),
    ("upper_arm", "shoulders", 0.85),
    ("thigh", "shoulders", 1.15),
)
# joint -> (parent, joint, child) triplets whose inner angle must not fall below the limit
JOINTS = (
    (L_SHOULDER, L_ELBOW, L_WRIST),
    (R_SHOULDER, R_ELBOW, R_WRIST),
    (L_HIP, L_KNEE, L_ANKLE),
    (R_HIP, R_KNEE, R_ANKLE),
)

DEFAULT_WEIGHTS = {
    "presence": 1.0,
    "detection": 0.0,
    "visibility": 1.0,
    "keypoint_confidence": 1.0,
    "sharpness": 1.0,
    "plausibility": 1.0,
    "hands": 0.0,
}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, dtype=np.float64), -100.0, 100.0)))


# --------------------------------------------------------------------------- geometry
@dataclass
class Roi:
    """A rotated rectangle in image pixels: centre, width, height, rotation (radians).

    A point ``(u, v)`` of the crop (in [0, 1]) is the image point
    ``centre + R(theta) @ ((u - 0.5) * width, (v - 0.5) * height)``.
    """

    cx: float
    cy: float
    width: float
    height: float
    theta: float = 0.0

    def to_image(self, uv: np.ndarray) -> np.ndarray:
        """Crop coordinates ``[..., 2]`` in [0, 1] -> image pixels ``[..., 2]``."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx = (uv[..., 0] - 0.5) * self.width
        dy = (uv[..., 1] - 0.5) * self.height
        return np.stack([self.cx + c * dx - s * dy, self.cy + s * dx + c * dy], axis=-1)

    def to_crop(self, xy: np.ndarray) -> np.ndarray:
        """Image pixels ``[..., 2]`` -> crop coordinates in [0, 1] (inverse of :meth:`to_image`)."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx, dy = xy[..., 0] - self.cx, xy[..., 1] - self.cy
        return np.stack([(c * dx + s * dy) / self.width + 0.5, (-s * dx + c * dy) / self.height + 0.5], axis=-1)


def crop(image: np.ndarray, roi: Roi, size: int) -> np.ndarray:
    """``[size, size, 3]`` float32 crop of ``image`` (``[H, W, 3]`` uint8) through ``roi``,
    bilinear, zero outside the image (MediaPipe's BORDER_ZERO)."""
    h, w = image.shape[:2]
    centres = (np.arange(size, dtype=np.float64) + 0.5) / size
    uv = np.stack(np.meshgrid(centres, centres, indexing="xy"), axis=-1)  # [size, size, (u, v)]
    xy = roi.to_image(uv) - 0.5  # pixel centres are at integer + 0.5
    x, y = xy[..., 0], xy[..., 1]
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    padded = np.zeros((h + 2, w + 2, 3), dtype=np.float32)  # a one-pixel zero ring
    padded[1:-1, 1:-1] = image
    xi0, yi0 = np.clip(x0 + 1, 0, w + 1), np.clip(y0 + 1, 0, h + 1)
    xi1, yi1 = np.clip(x0 + 2, 0, w + 1), np.clip(y0 + 2, 0, h + 1)
    top = padded[yi0, xi0] * (1 - fx) + padded[yi0, xi1] * fx
    bottom = padded[yi1, xi0] * (1 - fx) + padded[yi1, xi1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def letterbox_roi(height: int, width: int) -> Roi:
    """The square ROI holding the whole image, centred (the shorter side padded)."""
    side = float(max(height, width))
    return Roi(width / 2.0, height / 2.0, side, side, 0.0)


def aligned_roi(centre: np.ndarray, scale_point: np.ndarray, scale: float) -> Roi:
    """Square ROI centred on ``centre``, side ``2 * scale * |scale_point - centre|``, rotated so
    that ``scale_point - centre`` points up in the crop."""
    dx, dy = (scale_point - centre).tolist()
    side = 2.0 * scale * math.hypot(dx, dy)
    return Roi(float(centre[0]), float(centre[1]), side, side, math.atan2(dx, -dy))


# --------------------------------------------------------------------------- SSD detector
def ssd_anchors(input_size: int = 224, strides=(8, 16, 32, 32, 32)) -> np.ndarray:
    """Anchor centres ``[N, 2]`` (x, y in [0, 1]) of the BlazePose detector.

    Consecutive layers with the same stride share one feature map; each layer adds two
    anchors a cell (its aspect ratio 1 and the interpolated scale), all of fixed size 1,
    ordered by row, column, anchor.
    """
    centres = []
    layer = 0
    while layer < len(strides):
        same = layer
        while same < len(strides) and strides[same] == strides[layer]:
            same += 1
        per_cell = 2 * (same - layer)
        cells = math.ceil(input_size / strides[layer])
        for row in range(cells):
            for col in range(cells):
                centres.extend([((col + 0.5) / cells, (row + 0.5) / cells)] * per_cell)
        layer = same
    return np.asarray(centres, dtype=np.float64)


def decode_detections(
    raw_boxes: np.ndarray,
    raw_scores: np.ndarray,
    anchors: np.ndarray,
    input_size: int = 224,
    min_score: float = 0.5,
    iou_threshold: float = 0.3,
):
    """Decoded, suppressed detections: list of ``(score, box [x0, y0, x1, y1], keypoints [4, 2])``
    in letterboxed-square coordinates in [0, 1], best first.

    Non-maximum suppression is MediaPipe's *weighted* variant: each kept detection is the
    score-weighted average of the boxes and keypoints overlapping it by IoU > ``iou_threshold``.
    """
    scores = sigmoid(raw_scores.reshape(-1).astype(np.float64))
    raw = raw_boxes.reshape(len(scores), -1).astype(np.float64) / input_size
    cx, cy = anchors[:, 0] + raw[:, 0], anchors[:, 1] + raw[:, 1]
    w, h = raw[:, 2], raw[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keypoints = raw[:, 4:].reshape(len(scores), -1, 2) + anchors[:, None, :]
    order = [i for i in np.argsort(-scores) if scores[i] >= min_score]
    detections = []
    while order:
        best = order[0]
        ious = box_iou(boxes[best], boxes[order])
        group = [i for i, iou in zip(order, ious) if iou > iou_threshold]
        order = [i for i, iou in zip(order, ious) if iou <= iou_threshold]
        weights = scores[group] / scores[group].sum()
        detections.append(
            (
                float(scores[best]),
                (weights[:, None] * boxes[group]).sum(0),
                (weights[:, None, None] * keypoints[group]).sum(0),
            )
        )
    return detections


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


# --------------------------------------------------------------------------- estimator
@dataclass
class PoseResult:
    """One image's pose; ``landmarks`` ``[33, 4]`` = image x, y (pixels), visibility, presence."""

    detection_score: float = 0.0
    presence: float = 0.0
    landmarks: np.ndarray | None = None
    world: np.ndarray | None = None  # [33, 3] metres
    roi: Roi | None = None
    heatmap_peak: np.ndarray | None = None  # [33] sigmoid of each landmark's heatmap maximum
    heatmap_sharpness: np.ndarray | None = None  # [33] heatmap mass near each maximum
    hands: list[float] = field(default_factory=list)  # presence of each hand tried

    @property
    def found(self) -> bool:
        return self.landmarks is not None


class _Model:
    """A TFLite model: one float input, named outputs in the model's output order."""

    def __init__(self, path):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        self.interpreter.allocate_tensors()
        (self.input,) = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        self.size = int(self.input["shape"][1])

    def __call__(self, tensor: np.ndarray) -> list[np.ndarray]:
        self.interpreter.set_tensor(self.input["index"], tensor[None].astype(np.float32))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(o["index"])[0].copy() for o in self.outputs]


class BlazePose:
    """MediaPipe BlazePose (detector + full landmark model) and hand landmarks on single images.

    Args:
        cache_dir: folder with the ``.tflite`` files (default: ``armature assets pose``'s).
        min_detection_score: detector threshold (MediaPipe's default 0.5).
        refine: landmark passes after the first, each on the ROI from the last landmarks.
        hands: also run the hand landmark model on each wrist.
    """

    def __init__(self, cache_dir=None, min_detection_score: float = 0.5, refine: int = 0, hands: bool = False):
        folder = require_pose_files(cache_dir)
        self.detector = _Model(folder / "pose_detection.tflite")
        self.landmarker = _Model(folder / "pose_landmark_full.tflite")
        self.hand_model = _Model(folder / "hand_landmark_full.tflite") if hands else None
        self.anchors = ssd_anchors(self.detector.size)
        self.min_detection_score = float(min_detection_score)
        self.refine = int(refine)

    def detect(self, image: np.ndarray):
        """Detections ``(score, box, keypoints)`` in image pixels, best first."""
        h, w = image.shape[:2]
        box_roi = letterbox_roi(h, w)
        tensor = crop(image, box_roi, self.detector.size) / 127.5 - 1.0
        raw_boxes, raw_scores = self.detector(tensor)
        found = decode_detections(raw_boxes, raw_scores, self.anchors, self.detector.size, self.min_detection_score)
        out = []
        for score, box, keypoints in found:
            corners = box_roi.to_image(box.reshape(2, 2))
            out.append((score, corners.reshape(4), box_roi.to_image(keypoints)))
        return out

    def landmarks(self, image: np.ndarray, roi: Roi):
        """(landmarks ``[39, 4]`` image x, y, visibility, presence; presence score; world ``[39, 3]``;
        heatmap logits ``[64, 64, 39]``)."""
        tensor = crop(image, roi, self.landmarker.size) / 255.0
        raw, flag, _segmentation, heatmap, world = self.landmarker(tensor)
        raw = raw.reshape(-1, 5)
        xy = roi.to_image(raw[:, :2] / self.landmarker.size)
        out = np.concatenate([xy, sigmoid(raw[:, 3:5])], axis=1)
        presence = float(flag.reshape(-1)[0])
        if not 0.0 <= presence <= 1.0:  # a logit in some model versions
            presence = float(sigmoid(presence))
        return out, presence, world.reshape(-1, 3), heatmap

    def hand_presence(self, image: np.ndarray, wrist, index, pinky) -> float:
        """Hand landmark model's presence score on the square around one hand."""
        knuckles = (2.0 * np.asarray(index) + np.asarray(pinky)) / 3.0
        roi = aligned_roi(np.asarray(wrist, dtype=np.float64), knuckles, scale=1.0)
        roi.cx, roi.cy = knuckles.tolist()  # the palm sits between the wrist and the knuckles
        roi.width = roi.height = 2.7 * roi.width / 2.0
        if roi.width < 4:
            return 0.0
        outputs = self.hand_model(crop(image, roi, self.hand_model.size) / 255.0)
        score = float(outputs[1].reshape(-1)[0])
        return score if 0.0 <= score <= 1.0 else float(sigmoid(score))

    def __call__(self, image: np.ndarray) -> PoseResult:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"BlazePose expects an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
        detections = self.detect(image)
        if not detections:
            return PoseResult()
        score, _box, keypoints = detections[0]
        roi = aligned_roi(keypoints[0], keypoints[1], scale=1.25)
        for step in range(1 + self.refine):
            landmarks, presence, world, heatmap = self.landmarks(image, roi)
            if step < self.refine:
                roi = aligned_roi(landmarks[33, :2], landmarks[34, :2], scale=1.25)
        peak, sharpness = heatmap_confidence(heatmap[..., :NUM_BODY])
        result = PoseResult(score, presence, landmarks[:NUM_BODY], world[:NUM_BODY], roi, peak, sharpness)
        if self.hand_model is not None:
            for wrist, index, pinky in ((L_WRIST, L_INDEX, L_PINKY), (R_WRIST, R_INDEX, R_PINKY)):
                result.hands.append(self.hand_presence(image, *(landmarks[j, :2] for j in (wrist, index, pinky))))
        return result


def heatmap_confidence(heatmap: np.ndarray, radius: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-landmark confidence from the landmark model's heatmaps (logits ``[h, w, K]``).

    ``peak_k = sigmoid(max heatmap_k)``; ``sharpness_k`` = the mass of
    ``softmax(heatmap_k)`` (over the h x w cells) within ``radius`` cells (Chebyshev) of
    its maximum: 1 for a single clear peak, low when the model sees the joint in several
    places (a duplicated limb) or nowhere (a removed one).
    """
    h, w, k = heatmap.shape
    flat = heatmap.reshape(h * w, k).astype(np.float64)
    peak = sigmoid(flat.max(0))
    prob = np.exp(flat - flat.max(0))
    prob /= prob.sum(0)
    prob = prob.reshape(h, w, k)
    best = flat.argmax(0)
    sharpness = np.empty(k)
    for j in range(k):
        y, x = divmod(int(best[j]), w)
        sharpness[j] = prob[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1, j].sum()
    return peak, sharpness


# --------------------------------------------------------------------------- anatomy terms
def limb_lengths(world: np.ndarray) -> dict[str, np.ndarray]:
    """``{limb: [left, right]}`` 3-D lengths, plus ``shoulders`` (one value twice)."""
    out = {name: np.array([np.linalg.norm(world[a] - world[b]) for a, b in sides]) for name, sides in LIMBS.items()}
    out["shoulders"] = np.full(2, np.linalg.norm(world[L_SHOULDER] - world[R_SHOULDER]))
    return out


def limb_confidence(visibility: np.ndarray) -> dict[str, np.ndarray]:
    """``{limb: [left, right]}`` the smaller visibility of each limb's two joints."""
    out = {name: np.array([min(visibility[a], visibility[b]) for a, b in sides]) for name, sides in LIMBS.items()}
    out["shoulders"] = np.full(2, min(visibility[L_SHOULDER], visibility[R_SHOULDER]))
    return out


def joint_angle(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
    """Inner angle at ``b`` (degrees) between ``a - b`` and ``c - b``; 180 = straight."""
    u, v = a - b, c - b
    cos = float(np.dot(u, v) / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-9))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _weighted_mean(values, weights) -> float:
    values, weights = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    return float((values * weights).sum() / total) if total > 1e-9 else 0.0


def plausibility_terms(
    world: np.ndarray,
    visibility: np.ndarray,
    ratio_tolerance: float = 0.25,
    symmetry_tolerance: float = 0.15,
    min_joint_angle: float = 30.0,
) -> dict[str, float]:
    """Anatomical plausibility of one pose, each term in [0, 1] (1 = plausible).

    * ``ratios``: ``exp(-log(r / r0)^2 / (2 t^2))`` for each ratio of :data:`RATIOS` and side,
      ``t = ratio_tolerance``;
    * ``symmetry``: ``exp(-|log(left / right)| / s)`` for each limb, ``s = symmetry_tolerance``;
    * ``angles``: ``min(1, angle / min_joint_angle)`` for elbows and knees (a limb folded
      flat onto itself is not a human joint);

    each averaged with the visibility of the joints involved as weights.
    """
    lengths, confidence = limb_lengths(world), limb_confidence(visibility)
    eps = 1e-6
    ratio_values, ratio_weights = [], []
    for numerator, denominator, typical in RATIOS:
        for side in range(2):
            r = (lengths[numerator][side] + eps) / (lengths[denominator][side] + eps)
            ratio_values.append(math.exp(-(math.log(r / typical) ** 2) / (2 * ratio_tolerance**2)))
            ratio_weights.append(min(confidence[numerator][side], confidence[denominator][side]))
    sym_values, sym_weights = [], []
    for name in LIMBS:
        left, right = lengths[name] + eps
        sym_values.append(math.exp(-abs(math.log(left / right)) / symmetry_tolerance))
        sym_weights.append(confidence[name].min())
    angle_values, angle_weights = [], []
    for a, b, c in JOINTS:
        angle_values.append(min(1.0, joint_angle(world[a], world[b], world[c]) / min_joint_angle))
        angle_weights.append(min(visibility[a], visibility[b], visibility[c]))
    return {
        "ratios": _weighted_mean(ratio_values, ratio_weights),
        "symmetry": _weighted_mean(sym_values, sym_weights),
        "angles": _weighted_mean(angle_values, angle_weights),
    }


def pose_scores(result: PoseResult, **tolerances) -> dict[str, float]:
    """Every score term of one :class:`PoseResult` (all 0 when no person was found)."""
    names = (
        "presence",
        "detection",
        "visibility",
        "keypoint_confidence",
        "sharpness",
        "plausibility",
        "ratios",
        "symmetry",
        "angles",
        "hands",
    )
    if not result.found:
        return dict.fromkeys(names, 0.0)
    visibility = result.landmarks[:, 2]
    terms = plausibility_terms(result.world, visibility, **tolerances)
    return {
        "presence": result.presence,
        "detection": result.detection_score,
        "visibility": float(visibility.mean()),
        "keypoint_confidence": _weighted_mean(result.heatmap_peak, visibility),
        "sharpness": _weighted_mean(result.heatmap_sharpness, visibility),
        "plausibility": (terms["ratios"] + terms["symmetry"] + terms["angles"]) / 3.0,
        **terms,
        "hands": float(np.mean(result.hands)) if result.hands else 0.0,
    }


@register("pose")
class PoseReward(Reward):
    """Pose-keypoint confidence and anatomical plausibility from BlazePose, in [0, 1].

    ``reward = sum_k w_k * score_k / sum_k w_k`` over ``weights`` (keys ``presence``,
    ``visibility``, ``plausibility``, ``hands``); see the module docstring for the terms.
    Needs the models of ``armature assets pose`` (in ``cache_dir``, default the cache).
    """

    name = "pose"

    def __init__(
        self,
        cache_dir: str | None = None,
        weights: Mapping[str, float] | None = None,
        min_detection_score: float = 0.3,
        refine: int = 0,
        ratio_tolerance: float = 0.25,
        symmetry_tolerance: float = 0.15,
        min_joint_angle: float = 30.0,
    ):
        self.weights = dict(DEFAULT_WEIGHTS)
        for key, value in dict(weights or {}).items():
            if key not in DEFAULT_WEIGHTS:
                raise ValueError(f"pose reward: unknown weights.{key}; expected keys {sorted(DEFAULT_WEIGHTS)}")
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"pose reward: weights.{key} must be a finite number >= 0, got {value!r}")
            self.weights[key] = float(value)
        if sum(self.weights.values()) <= 0:
            raise ValueError("pose reward: every weight is 0; give at least one positive weights.<term>")
        self.tolerances = {
            "ratio_tolerance": float(ratio_tolerance),
            "symmetry_tolerance": float(symmetry_tolerance),
            "min_joint_angle": float(min_joint_angle),
        }
        self.estimator = BlazePose(cache_dir, min_detection_score, refine, hands=self.weights["hands"] > 0)

    def details(self, images: list[PIL.Image.Image]) -> list[dict[str, float]]:
        """Every term of every image (for logging and analysis)."""
        out = []
        for image in images:
            terms = pose_scores(self.estimator(np.asarray(image.convert("RGB"))), **self.tolerances)
            total = sum(self.weights.values())
            terms["reward"] = sum(w * terms[k] for k, w in self.weights.items()) / total
            out.append(terms)
        return out

    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        return np.array([terms["reward"] for terms in self.details(images)], dtype=np.float32)
