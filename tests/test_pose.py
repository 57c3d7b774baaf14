"""The pose reward: BlazePose geometry against independent calculations, and the real
models (fetched by `armature assets pose`) on scikit-image's photographs of people."""

import math

import numpy as np
import pytest
from PIL import Image

from armature.rewards import load
from armature.rewards.assets import MissingAssetsError, require_pose_files
from armature.rewards.pose import (
    Roi,
    aligned_roi,
    crop,
    decode_detections,
    heatmap_confidence,
    joint_angle,
    plausibility_terms,
    ssd_anchors,
)


@pytest.fixture(scope="session")
def pose_assets():
    """The BlazePose models, fetched once through the CLI command (cached across sessions)."""
    from armature.cli import main

    if main(["assets", "pose"]) != 0:
        pytest.skip("`armature assets pose` could not download the mediapipe wheel from PyPI")
    return require_pose_files()


# ----------------------------------------------------------------------------- without models
def test_anchor_layout():
    anchors = ssd_anchors(224)
    assert anchors.shape == (2254, 2)  # 28*28*2 + 14*14*2 + 7*7*6
    # the first stride-32 anchor: cell (0, 0) of the 7x7 map, 6 anchors a cell
    first32 = 28 * 28 * 2 + 14 * 14 * 2
    assert np.allclose(anchors[first32 : first32 + 6], [0.5 / 7, 0.5 / 7])
    # row-major: anchor 2 * (28 * row + col) of the stride-8 map is at ((col + .5) / 28, (row + .5) / 28)
    row, col = 5, 17
    assert np.allclose(anchors[2 * (28 * row + col)], [(col + 0.5) / 28, (row + 0.5) / 28])


def test_decode_and_weighted_suppression():
    anchors = ssd_anchors(224)
    raw = np.zeros((2254, 12), np.float32)
    scores = np.full((2254, 1), -20.0, np.float32)
    # two overlapping boxes around anchor 100 and a separate one at anchor 2000
    for i, (dx, logit) in {100: (0.0, 3.0), 101: (2.24, 1.0), 2000: (0.0, 0.5)}.items():
        raw[i, :4] = [dx, 0.0, 44.8, 44.8]  # 0.2 of the input wide
        raw[i, 4:6] = [11.2, -22.4]  # keypoint 0 at anchor + (0.05, -0.1)
        scores[i] = logit
    found = decode_detections(raw, scores, anchors, 224, min_score=0.5, iou_threshold=0.3)
    assert len(found) == 2
    s1, s2 = 1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-1))
    score, box, keypoints = found[0]
    assert score == pytest.approx(s1)
    # weighted average of the two overlapping boxes' centres (the second moved 0.01 right)
    cx = anchors[100, 0] * s1 / (s1 + s2) + (anchors[101, 0] + 0.01) * s2 / (s1 + s2)
    assert (box[0] + box[2]) / 2 == pytest.approx(cx, abs=1e-6)
    assert box[2] - box[0] == pytest.approx(0.2, abs=1e-6)
    assert keypoints[0, 1] == pytest.approx(anchors[100, 1] - 0.1, abs=1e-6)
    assert found[1][0] == pytest.approx(1 / (1 + math.exp(-0.5)))


def test_roi_round_trip_and_rotated_crop():
    roi = Roi(40.0, 30.0, 20.0, 20.0, math.pi / 2)
    points = np.random.default_rng(0).uniform(0, 1, (10, 2))
    assert np.allclose(roi.to_crop(roi.to_image(points)), points)
    # a 90-degree ROI over the whole of a square image is the image rotated a quarter turn
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    out = crop(image, Roi(8.0, 8.0, 16.0, 16.0, math.pi / 2), 16)
    # crop (u, v) -> image centre + R(90) (du, dv) = (x, y) = (8 - dv, 8 + du): crop[v, u] = image[u, 15 - v]
    expected = np.array([[image[u, 15 - v] for u in range(16)] for v in range(16)], dtype=np.float32)
    assert np.allclose(out, expected, atol=1e-3)
    # outside the image is zero
    assert np.all(crop(image, Roi(100.0, 100.0, 4.0, 4.0), 4) == 0)


def test_aligned_roi_points_the_body_up():
    roi = aligned_roi(np.array([50.0, 50.0]), np.array([80.0, 50.0]), scale=1.25)  # head to the right
    assert roi.width == pytest.approx(2 * 1.25 * 30)
    top_centre = roi.to_image(np.array([0.5, 0.5 - 30 / roi.height]))
    assert np.allclose(top_centre, [80.0, 50.0])


def test_heatmap_confidence_matches_a_loop():
    rng = np.random.default_rng(0)
    heat = rng.normal(size=(8, 8, 3))
    heat[2, 5, 0] = 12.0  # one clear peak
    peak, sharp = heatmap_confidence(heat, radius=1)
    for k in range(3):
        flat = heat[..., k]
        y, x = np.unravel_index(np.argmax(flat), flat.shape)
        e = np.exp(flat - flat.max())
        total = sum(e[i, j] for i in range(8) for j in range(8) if abs(i - y) <= 1 and abs(j - x) <= 1)
        assert sharp[k] == pytest.approx(total / e.sum())
        assert peak[k] == pytest.approx(1 / (1 + math.exp(-flat.max())))
    assert sharp[0] > 0.99 > sharp[1]


def _skeleton(forearm: float = 0.24, left_elbow_angle: float = 150.0) -> np.ndarray:
    """World landmarks of a standing person (metres): shoulders 0.36 apart, typical limbs."""
    world = np.zeros((33, 3))
    for side, sx in ((0, 0.18), (1, -0.18)):  # left, right
        s, e, w = (11, 13, 15) if side == 0 else (12, 14, 16)
        world[s] = [sx, -0.5, 0]
        world[e] = world[s] + [0, 0.30, 0]
        angle = math.radians(left_elbow_angle if side == 0 else 170.0)
        length = forearm if side == 0 else 0.24
        world[w] = world[e] + length * np.array([math.sin(math.pi - angle), math.cos(math.pi - angle), 0])
        h, k, a = (23, 25, 27) if side == 0 else (24, 26, 28)
        world[h] = [sx * 0.6, 0, 0]
        world[k] = world[h] + [0, 0.42, 0]
        world[a] = world[k] + [0, 0.40, 0]
    return world


def test_plausibility_terms():
    visibility = np.ones(33)
    good = plausibility_terms(_skeleton(), visibility)
    assert min(good.values()) > 0.8
    long_forearm = plausibility_terms(_skeleton(forearm=0.48), visibility)
    assert long_forearm["ratios"] < good["ratios"] - 0.1
    # symmetry: exp(-|log(0.48 / 0.24)| / 0.15) on the forearms, 1 on the other three limbs
    assert long_forearm["symmetry"] == pytest.approx((3 + math.exp(-math.log(2) / 0.15)) / 4, abs=1e-6)
    folded = plausibility_terms(_skeleton(left_elbow_angle=10.0), visibility)
    assert joint_angle(*_skeleton(left_elbow_angle=10.0)[[11, 13, 15]]) == pytest.approx(10.0, abs=1e-6)
    assert folded["angles"] == pytest.approx((10 / 30 + 3) / 4, abs=1e-6)
    # an invisible limb does not count
    hidden = visibility.copy()
    hidden[[13, 15]] = 0.0
    assert plausibility_terms(_skeleton(forearm=0.48), hidden)["symmetry"] == pytest.approx(1.0)


def test_missing_models_name_the_command(tmp_path):
    with pytest.raises(MissingAssetsError, match="armature assets pose"):
        load("pose", cache_dir=str(tmp_path / "empty"))


def test_bad_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="weights.elbows"):
        load("pose", cache_dir=str(tmp_path), weights={"elbows": 1.0})


def _benchmark():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import pose_pairs

    return pose_pairs


def test_benchmark_background_control_leaves_the_person_alone():
    pose_pairs = _benchmark()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 300, 3)).astype(np.uint8)
    landmarks = np.zeros((33, 4))
    landmarks[:, :2] = rng.uniform(100, 160, (33, 2))  # the "person" within [100, 160]^2
    landmarks[:, 2] = 1.0
    pairs = list(pose_pairs.background_pairs({"p": image}, {"p": landmarks}, boxes=4, margin=10))
    assert len(pairs) >= 4 * 4  # mirror of a random patch, warp, remove, shift, duplicate all change it
    person = (slice(90, 170), slice(90, 170))  # the landmarks' box grown by the 10-pixel margin
    for _, region, _, kind, _, degraded in pairs:
        assert np.array_equal(degraded[person], image[person]), (region, kind)
        assert not np.array_equal(degraded, image)


def test_benchmark_counts_identical_degradations_once():
    pose_pairs = _benchmark()
    image = np.random.default_rng(1).integers(0, 256, (120, 120, 3)).astype(np.uint8)
    landmarks = np.zeros((33, 4))
    landmarks[:, :2], landmarks[:, 2] = 60.0, 1.0
    args = ({"p": image}, {"p": landmarks}, {"r": [0, 1]}, (0.1,), (0, 1, 2))
    every = list(pose_pairs.degraded_pairs(*args, dedupe=False))
    once = list(pose_pairs.degraded_pairs(*args, dedupe=True))
    assert sum(kind == "remove" for *_, kind, _, _ in every) == 3  # "remove" ignores the seed
    assert sum(kind == "remove" for *_, kind, _, _ in once) == 1
    keys = [d.tobytes() for *_, d in once]
    assert len(keys) == len(set(keys)) and len(once) < len(every)


# ----------------------------------------------------------------------------- the real models
def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    return np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]


def test_finds_the_people_in_real_photos(pose_assets):
    reward = load("pose")
    astronaut = reward.estimator(_photo("astronaut"))
    assert astronaut.found and astronaut.presence > 0.8
    nose, shoulders = astronaut.landmarks[0], astronaut.landmarks[[11, 12]]
    assert 170 < nose[0] < 270 and 90 < nose[1] < 170  # her face
    assert np.all(shoulders[:, 1] > nose[1] + 50) and shoulders[0, 0] > shoulders[1, 0]  # her left on our right
    camera = reward.estimator(_photo("camera"))
    assert camera.found and camera.presence > 0.8
    assert 180 < camera.landmarks[0, 0] < 300 and 120 < camera.landmarks[0, 1] < 230  # his face at the camera
    # a photograph of no one (a cup of coffee) scores far lower
    scores = reward([Image.fromarray(_photo(n)) for n in ("astronaut", "camera", "coffee")], [""] * 3)
    assert scores.dtype == np.float32 and scores[2] < 0.5 * min(scores[:2])


def test_intact_photos_beat_locally_degraded_copies(pose_assets):
    """Arms and legs in the photos duplicated / warped / removed / mirrored / shifted (one seed: 35 pairs)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from pose_pairs import REGION_SETS, evaluate, win_rate

    REGION_SETS["one-seed"] = (REGION_SETS["limbs"][0], REGION_SETS["limbs"][1], (0,), False)
    records = evaluate(load("pose"), "one-seed")
    assert len(records) >= 30
    assert win_rate(records) >= 0.9, [
        (r["photo"], r["region"], r["kind"]) for r in records if r["intact"]["reward"] <= r["degraded"]["reward"]
    ]
