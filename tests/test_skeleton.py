"""Skeletons (armature.skeleton) and the skeleton rewards: the JSON schema, the layout round trip
on thousands of gym skeletons, extraction from figures and photos, training triples, and the
rewards against hand-computed values."""

import json
import math
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from armature.gym.figures import Figure, build_parts, render, sample_background, sample_figure, sample_pose
from armature.rewards import load
from armature.rewards.skeleton import joint_bends, pck, skeleton_score, skeleton_terms
from armature.skeleton import (
    COCO17,
    Skeleton,
    canonical,
    from_figure,
    from_figure_image,
    parse_layout,
    photo_triples,
    read_triples,
    render_layout,
    triples,
    write_triples,
)
from armature.skeleton.keypoints import INDEX
from armature.skeleton.render import JOINT_COLOURS

# a person facing us on a 64x64 canvas (the person's left on the image's right), drawn by hand:
# upper arm (2, 9), forearm (1, 8), thigh (1, 11), shin (0, 10), torso 16 (mid-shoulders to mid-hips)
HAND = {
    "nose": (32, 10),
    "left_eye": (34, 8),
    "right_eye": (30, 8),
    "left_ear": (36, 9),
    "right_ear": (28, 9),
    "left_shoulder": (38, 16),
    "right_shoulder": (26, 16),
    "left_elbow": (40, 25),
    "right_elbow": (24, 25),
    "left_wrist": (41, 33),
    "right_wrist": (23, 33),
    "left_hip": (35, 32),
    "right_hip": (29, 32),
    "left_knee": (36, 43),
    "right_knee": (28, 43),
    "left_ankle": (36, 53),
    "right_ankle": (28, 53),
}


def _hand(**moved) -> Skeleton:
    points = {**HAND, **moved}
    return Skeleton(64, 64, np.array([[(*points[n][:2], points[n][2] if len(points[n]) > 2 else 1.0) for n in COCO17]]))


def _json(**keypoints):
    base = {name: [float(x), float(y), 1.0] for name, (x, y) in HAND.items()}
    base.update(keypoints)
    return {"format": "coco17", "width": 64, "height": 64, "people": [{"keypoints": base}]}


# ----------------------------------------------------------------------------- schema
def test_json_round_trip_and_views():
    skeleton = Skeleton.from_json(json.dumps(_json()))
    assert skeleton.array.shape == (1, 17, 3) and skeleton.num_people == 1
    assert tuple(skeleton.joint("left_wrist")) == (41.0, 33.0, 1.0)
    again = Skeleton.from_json(skeleton.to_json())
    assert again.equals(skeleton, atol=0) and Skeleton.from_json(skeleton.dumps()).equals(skeleton, atol=0)
    absent = Skeleton.from_json(_json(left_ear=[0, 0, 0]))
    assert absent.visible.sum() == 16 and not absent.visible[0, INDEX["left_ear"]]
    two = Skeleton.from_json({**_json(), "people": _json()["people"] * 2})
    assert two.array.shape == (2, 17, 3)


@pytest.mark.parametrize(
    "broken, message",
    [
        (_json(left_wrist=[41, 33]), r"people\[0\]\.keypoints\.left_wrist: expected \[x, y, visibility\]"),
        (_json(left_wrist="41,33,1"), r"people\[0\]\.keypoints\.left_wrist: expected \[x, y, visibility\]"),
        (_json(left_wrist=[70, 33, 1]), r"left_wrist: \(70, 33\) is outside the 64x64 canvas; x must be in \[0, 63\]"),
        (_json(left_wrist=[41, 33, 1.5]), r"left_wrist: visibility 1.5 is outside \[0, 1\]"),
        (_json(left_hand=[1, 1, 1]), r"people\[0\]\.keypoints\.left_hand: unknown joint name; COCO-17 names are nose"),
        ({**_json(), "width": 0}, r"width: expected a positive integer"),
        ({**_json(), "format": "openpose"}, r"format: 'openpose' is not supported; use \"coco17\""),
        ({**_json(), "people": {}}, r"people: expected a list"),
        ({**_json(), "people": [{"points": {}}]}, r"people\[0\]: expected an object with a \"keypoints\""),
        ("{not json", r"pose: not valid JSON"),
    ],
)
def test_schema_errors_name_the_field_and_the_fix(broken, message):
    with pytest.raises(ValueError, match=message):
        Skeleton.from_json(broken)


def test_missing_joint_is_named_with_the_fix():
    keypoints = _json()
    del keypoints["people"][0]["keypoints"]["right_ankle"]
    with pytest.raises(ValueError, match=r"people\[0\]\.keypoints\.right_ankle: missing; .* \[0, 0, 0\]"):
        Skeleton.from_json(keypoints)
    # an absent joint's coordinates are not checked
    assert Skeleton.from_json(_json(left_wrist=[-5, 100, 0])).visible.sum() == 16


# ----------------------------------------------------------------------------- render / parse
def _gym_skeletons(n: int, seed: int, drop: float = 0.1):
    """Skeletons of random gym poses (every class, overlapping parts allowed), some joints absent."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        pose = sample_pose(rng)
        array = from_figure(Figure(pose, build_parts(pose), None)).array.copy()
        array[0, rng.random(17) < drop] = 0.0
        yield Skeleton(64, 64, array), rng


def test_layout_encoding():
    skeleton = _hand()
    layout = render_layout(skeleton)
    assert layout.shape == (64, 64, 3) and layout.dtype == np.uint8
    x, y = HAND["left_elbow"]
    assert np.all(layout[y - 1 : y + 2, x - 1 : x + 2] == JOINT_COLOURS[INDEX["left_elbow"]])  # a 3x3 mark
    assert len({tuple(c) for c in JOINT_COLOURS}) == 17
    scene = sample_background(np.random.default_rng(0))
    over = render_layout(skeleton, scene)
    drawn = (over != scene).any(-1)
    assert np.array_equal(over[~drawn], scene[~drawn]) and np.array_equal(drawn, layout.any(-1))
    with pytest.raises(ValueError, match="scene: shape"):
        render_layout(skeleton, scene[:32])


def test_round_trip_is_exact_on_2000_gym_skeletons():
    """JSON -> layout -> JSON on 2,000 random gym skeletons (10 % of joints absent), half of them
    over a gym scene, a quarter parsed knowing the scene: every one comes back exactly."""
    start, count, exact, ambiguous = time.perf_counter(), 0, 0, 0
    for i, (skeleton, rng) in enumerate(_gym_skeletons(2000, seed=12)):
        skeleton = Skeleton.from_json(json.loads(skeleton.dumps()))  # through the JSON text
        scene = sample_background(rng) if i % 2 else None
        parsed, counts = parse_layout(render_layout(skeleton, scene), scene if i % 4 == 1 else None, details=True)
        back = Skeleton.from_json(parsed.to_json())
        count += 1
        exact += back.equals(canonical(skeleton), atol=0)
        ambiguous += counts["ambiguous"]
    rate = exact / count
    print(
        f"\nlayout round trip: {exact}/{count} exact ({rate:.2%}), {ambiguous} ambiguous marks, "
        f"{(time.perf_counter() - start) / count * 1e3:.2f} ms each"
    )
    assert count == 2000 and exact == count


def test_round_trip_two_people_side_by_side():
    skeletons = [s for s, _ in _gym_skeletons(100, seed=3)]
    for left, right in zip(skeletons[::2], skeletons[1::2]):
        array = np.concatenate([right.array, left.array])
        array[1, :, 0] += 64 * (array[1, :, 2] > 0)  # the second person on the right half
        two = Skeleton(128, 64, array)
        assert parse_layout(render_layout(two)).equals(canonical(two), atol=0)


def test_occlusion_is_reported_as_absent():
    """Documented limit: a joint on the same pixel as a later joint is covered completely."""
    covered = _hand(left_wrist=HAND["left_hip"])  # the wrist (index 9) is drawn before the hip (11)
    parsed = parse_layout(render_layout(covered))
    assert not parsed.visible[0, INDEX["left_wrist"]] and parsed.visible[0, INDEX["left_hip"]]
    # a partly covered mark is still exact
    partly = _hand(left_wrist=(HAND["left_hip"][0] + 1, HAND["left_hip"][1] + 1))
    assert parse_layout(render_layout(partly)).equals(canonical(partly), atol=0)


def test_scene_with_palette_colours_needs_the_scene():
    skeleton = _hand()
    scene = np.full((64, 64, 3), 90, np.uint8)
    scene[2:5, 2:5] = JOINT_COLOURS[INDEX["nose"]]  # a stray "nose" in the scene
    layout = render_layout(skeleton, scene)
    assert parse_layout(layout, scene).equals(canonical(skeleton), atol=0)
    assert parse_layout(layout).num_people == 2  # without the scene, it looks like a second nose


def test_tolerant_parse_of_noisy_layouts():
    rng = np.random.default_rng(5)
    errors, found = [], 0
    for i in range(20):
        figure = sample_figure(rng)
        skeleton = from_figure(figure)
        layout = render_layout(skeleton, figure.background if i % 2 else None).astype(np.float64)
        noisy = ndimage.gaussian_filter(layout, (0.6, 0.6, 0)) + rng.normal(0, 8, layout.shape)
        parsed, counts = parse_layout(np.clip(noisy, 0, 255).astype(np.uint8), details=True)
        assert parsed.num_people == 1 and counts["tolerant"] > 0
        present = parsed.visible[0]
        found += present.sum()
        errors += list(np.linalg.norm(parsed.array[0, present, :2] - skeleton.array[0, present, :2], axis=1))
        assert np.all(parsed.array[0, present, 2] > 0.25)
    assert found >= 0.98 * 20 * 17 and max(errors) < 2.0 and np.mean(errors) < 0.8


# ----------------------------------------------------------------------------- extraction
def test_from_figure_uses_the_figures_joints():
    figure = sample_figure(np.random.default_rng(7))
    skeleton = from_figure(figure)
    parts = {(p.type, p.side): p for p in figure.parts}
    assert np.allclose(skeleton.joint("left_shoulder")[:2], parts["upper_arm", "left"].points[0])
    assert np.allclose(skeleton.joint("right_elbow")[:2], parts["upper_arm", "right"].points[1])
    assert np.allclose(skeleton.joint("left_wrist")[:2], parts["forearm", "left"].points[1])
    assert np.allclose(skeleton.joint("right_knee")[:2], parts["thigh", "right"].points[1])
    assert np.allclose(skeleton.joint("left_ankle")[:2], parts["shin", "left"].points[1])
    head = parts["head", None]
    for name in COCO17[:5]:  # the face lies on the head disc, left features on the image's right
        assert np.linalg.norm(skeleton.joint(name)[:2] - head.points[0]) <= head.radius
    assert skeleton.joint("left_eye")[0] > skeleton.joint("right_eye")[0]
    # the pose's own elbow bends come back (the gym's angle convention)
    bends = joint_bends(skeleton.array[0])
    assert bends["left_elbow"] == pytest.approx(figure.pose.angles["left"]["elbow"], abs=1e-6)
    assert bends["right_knee"] == pytest.approx(figure.pose.angles["right"]["knee"], abs=1e-6)


def test_from_figure_image_estimates_the_joints_within_two_pixels():
    rng = np.random.default_rng(8)
    errors = []
    for _ in range(30):
        figure = sample_figure(rng)
        truth, estimate = from_figure(figure), from_figure_image(render(figure))
        assert estimate.visible.all()
        errors.append(np.linalg.norm(estimate.array[0, :, :2] - truth.array[0, :, :2], axis=1))
    assert np.max(errors) < 2.5 and np.mean(errors) < 1.2


def test_from_photo_with_blazepose():
    from armature.rewards.assets import MissingAssetsError, require_pose_files
    from armature.rewards.pose import BlazePose
    from armature.skeleton import from_photo

    try:
        require_pose_files()
    except MissingAssetsError:
        pytest.skip("BlazePose models not cached (`armature assets pose`)")
    from skimage import data

    skeleton = from_photo(data.astronaut(), BlazePose(min_detection_score=0.3))
    assert skeleton.num_people == 1 and (skeleton.width, skeleton.height) == (512, 512)
    nose, left, right = (skeleton.joint(n) for n in ("nose", "left_shoulder", "right_shoulder"))
    assert 170 < nose[0] < 270 and 90 < nose[1] < 170 and nose[2] > 0.9  # her face (as tests/test_pose.py)
    assert left[0] > right[0] and min(left[1], right[1]) > nose[1] + 50
    assert Skeleton.from_json(skeleton.to_json()).equals(skeleton)  # valid JSON (in the canvas)


# ----------------------------------------------------------------------------- triples
def test_gym_triples_and_parquet(tmp_path):
    items = triples(6, seed=1)
    for t in items:
        assert t.scene.shape == t.layout.shape == t.target.shape == (64, 64, 3)
        differs = (t.target != t.scene).any(-1)
        assert differs.any() and not (differs & ~t.person_mask).any()  # the person lies in the mask
        assert t.person_mask.sum() <= ndimage.binary_dilation(differs, np.ones((3, 3)), iterations=2).sum()
        assert parse_layout(t.layout, t.scene).equals(canonical(t.skeleton), atol=0)
    assert write_triples(items, tmp_path / "t.parquet") == 6
    back = read_triples(tmp_path / "t.parquet")
    for a, b in zip(items, back):
        assert a.prompt == b.prompt and a.skeleton.equals(b.skeleton, atol=0)
        for key in ("scene", "layout", "target", "person_mask"):
            assert np.array_equal(getattr(a, key), getattr(b, key))


def test_photo_triples_fill_the_person(tmp_path):
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 60, (48, 40, 3)).astype(np.uint8)
    mask = np.zeros((48, 40), bool)
    mask[10:40, 15:25] = True
    photo[mask] = (250, 240, 230)  # the "person"
    Image.fromarray(photo).save(tmp_path / "p.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "p.mask.png")
    (tmp_path / "p.txt").write_text("a person by the wall\n")
    Image.fromarray(photo).save(tmp_path / "unmasked.png")  # no mask: ignored
    planned = Skeleton(40, 48, np.zeros((1, 17, 3)))
    planned.array[0, INDEX["nose"]] = (20, 12, 0.9)
    (t,) = photo_triples(tmp_path, pose=lambda image: planned, grow=2)
    assert t.prompt == "a person by the wall" and t.source == "p.png" and np.array_equal(t.target, photo)
    assert np.array_equal(t.scene[~t.person_mask], photo[~t.person_mask])
    assert t.scene[mask].max() < 100  # the bright person is gone, filled from its dark surroundings
    assert parse_layout(t.layout, t.scene).visible[0, INDEX["nose"]]


# ----------------------------------------------------------------------------- rewards
def test_skeleton_reward_intact_figures_score_one():
    rng = np.random.default_rng(9)
    for _ in range(20):
        assert skeleton_score(from_figure(sample_figure(rng))) == pytest.approx(1.0)
    terms = skeleton_terms(_hand())
    assert terms == pytest.approx(
        {"angles": 1.0, "proportions": 1.0, "symmetry": 1.0, "completeness": 1.0, "score": 1.0}
    )


def test_skeleton_reward_reversed_elbow():
    # the left forearm turned outward by 40 degrees past straight: bend -40, 30 outside [-10, 120]
    upper = math.degrees(math.atan2(2, 9))
    fore = math.radians(upper + 40.0)
    wrist = (40 + math.hypot(1, 8) * math.sin(fore), 25 + math.hypot(1, 8) * math.cos(fore))
    reversed_ = _hand(left_wrist=wrist)
    assert joint_bends(reversed_.array[0])["left_elbow"] == pytest.approx(-40.0)
    terms = skeleton_terms(reversed_)
    assert terms["angles"] == pytest.approx(3 / 4)  # one of four joints scores 0
    assert terms["score"] == pytest.approx(1 - 1 / 16)
    # 25 degrees reversed: 15 outside, 1 - 15 / 30 = 0.5
    fore = math.radians(upper + 25.0)
    half = _hand(left_wrist=(40 + math.hypot(1, 8) * math.sin(fore), 25 + math.hypot(1, 8) * math.cos(fore)))
    assert skeleton_terms(half)["score"] == pytest.approx(1 - 0.5 / 16)


def test_skeleton_reward_stretched_forearm_and_missing_joint():
    stretched = _hand(left_wrist=(40 + 1.8 * 1, 25 + 1.8 * 8))
    terms = skeleton_terms(stretched)
    forearm, upper = 1.8 * math.hypot(1, 8), math.hypot(2, 9)
    proportion = 1 - (math.log(forearm / upper / 0.85) - math.log(1.3)) / math.log(2)
    symmetry = 1 - (math.log(1.8) - math.log(1.15)) / math.log(2)
    assert terms["proportions"] == pytest.approx((7 + proportion) / 8)
    assert terms["symmetry"] == pytest.approx((3 + symmetry) / 4)
    assert terms["score"] == pytest.approx((2 + (7 + proportion) / 8 + (3 + symmetry) / 4) / 4)
    assert terms["score"] < 0.95  # 0.944: proportions 0.936, symmetry 0.838
    missing = skeleton_terms(_hand(left_wrist=(0, 0, 0.0)))
    assert missing["completeness"] == pytest.approx(16 / 17) and missing["score"] == pytest.approx((3 + 16 / 17) / 4)


def test_skeleton_reward_on_layout_images():
    reward = load("skeleton")
    rng = np.random.default_rng(10)
    figures = [sample_figure(rng) for _ in range(8)]
    layouts = [Image.fromarray(render_layout(from_figure(f), f.background)) for f in figures]
    start = time.perf_counter()
    scores = reward(layouts, [f.prompt for f in figures])
    print(f"\nskeleton reward: {(time.perf_counter() - start) / len(layouts) * 1e3:.2f} ms a layout image")
    assert scores.dtype == np.float32 and scores.shape == (8,) and scores.min() > 0.97  # pixel rounding only
    upper = math.degrees(math.atan2(2, 9))
    fore = math.radians(upper + 40.0)
    bad = _hand(left_wrist=(40 + 8 * math.sin(fore), 25 + 8 * math.cos(fore)))
    good_score, bad_score = reward([Image.fromarray(render_layout(s)) for s in (_hand(), bad)], ["", ""])
    assert good_score == pytest.approx(1.0) and bad_score < good_score - 0.05
    assert reward.score_skeletons([_hand()])[0] == pytest.approx(1.0)
    assert reward([Image.new("RGB", (64, 64))], [""])[0] == 0.0  # no one drawn


def test_pck_hand_computed():
    plan = _hand()
    estimate = plan.array.copy()
    for name in ("left_wrist", "right_wrist", "left_ankle", "right_ankle"):
        estimate[0, INDEX[name], 0] += 5.0  # beyond 0.1 * 45 = 4.5 px (the plan's box is 18 x 45)
    for name in ("left_knee", "right_knee", "nose"):
        estimate[0, INDEX[name], 1] += 4.0  # within it
    estimate[0, INDEX["left_ear"], 2] = 0.0  # not found
    estimated = Skeleton(64, 64, estimate)
    assert pck(estimated, plan, alpha=0.1) == pytest.approx(12 / 17)
    # torso reference: 0.1 * 16 = 1.6 px, the 4 px ones miss too
    assert pck(estimated, plan, alpha=0.1, reference="torso") == pytest.approx(9 / 17)
    # an estimate on a canvas twice as large is scaled to the plan's
    assert pck(plan.resized(127, 127), plan) == pytest.approx(1.0)


def test_pose_adherence_on_gym_images(tmp_path):
    rng = np.random.default_rng(11)
    figures = [sample_figure(rng) for _ in range(8)]
    images = [Image.fromarray(render(f)) for f in figures]
    plans = [from_figure(f) for f in figures]
    reward = load("pose_adherence")
    start = time.perf_counter()
    scores = reward(images, [f.prompt for f in figures], plans=plans)
    print(f"\npose_adherence reward (gym): {(time.perf_counter() - start) / len(images) * 1e3:.2f} ms an image")
    assert np.all(scores == 1.0)
    shifted = []
    for p in plans:
        array = p.array.copy()
        array[0, :, 0] += 8.0  # 8 px off: every joint farther than 0.1 * (at most 50 px) + the 2.5 px estimate error
        shifted.append(Skeleton(64, 64, array))
    assert np.all(reward(images, [""] * 8, plans=shifted) == 0.0)
    # plans as layout images, as a list set for the next call, and by prompt from a JSON file
    layouts = [render_layout(p) for p in plans]
    assert np.all(reward(images, [""] * 8, plans=layouts) == 1.0)
    reward.set_plans(shifted)
    assert np.all(reward(images, [""] * 8) == 0.0)
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"p0": plans[0].to_json(), "p1": shifted[1].to_json()}))
    by_prompt = load("pose_adherence", plans=str(path))
    assert list(by_prompt(images[:2], ["p0", "p1"])) == [1.0, 0.0]
    with pytest.raises(ValueError, match="no plan for image 0"):
        by_prompt(images[:1], ["unknown prompt"])
    with pytest.raises(ValueError, match="method must be"):
        load("pose_adherence", method="openpose")


def test_pose_adherence_on_a_photo_with_blazepose():
    from armature.rewards.assets import MissingAssetsError, require_pose_files
    from armature.rewards.pose import BlazePose
    from armature.skeleton import from_photo

    try:
        require_pose_files()
    except MissingAssetsError:
        pytest.skip("BlazePose models not cached (`armature assets pose`)")
    from skimage import data

    photo = data.astronaut()
    plan = from_photo(photo, BlazePose(min_detection_score=0.3))
    plan.array[plan.array[..., 2] < 0.5] = 0.0  # plan only what is clearly seen (the hands and legs are not)
    reward = load("pose_adherence", method="auto")  # 512x512: BlazePose
    start = time.perf_counter()
    (score,) = reward([Image.fromarray(photo)], ["an astronaut"], plans=[plan])
    print(
        f"\npose_adherence reward (BlazePose, 512x512, first call: loads the models): "
        f"{(time.perf_counter() - start) * 1e3:.0f} ms"
    )
    assert score == pytest.approx(1.0)
    moved = plan.array.copy()
    moved[0, :, 1] = np.clip(moved[0, :, 1] + 60, 0, 511)  # 60 px lower: > 0.1 * the plan's size
    (score,) = reward([Image.fromarray(photo)], [""], plans=[Skeleton(512, 512, moved)])
    assert score < 0.2
