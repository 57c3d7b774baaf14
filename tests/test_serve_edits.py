"""``POST /v1/images/edits``: a person rendered into a scene by a SkeleGuide pipeline.

The request checks (every 400 names its field, a bad pose down to the joint) run on the FastAPI
app alone; the rest on one Serve application on the session's Ray cluster with the tiny
SkeleGuide pipeline saved to a folder, called over HTTP.
"""

import base64
import io
import json
import socket

import httpx
import numpy as np
import pytest
from PIL import Image

from armature.skeleton import COCO17, Skeleton

SIZE = 32
LIMITS = {
    "max_prompt_chars": 40,
    "max_steps": 8,
    "min_size": 16,
    "max_size": 64,
    "size_multiple": 8,
    "max_images": 2,
    "max_best_of": 4,
    "max_guidance_scale": 10.0,
    "max_body_bytes": 4096,
    "request_timeout_s": 5.0,
}


def png(array) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unpng(text) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def scene(size=SIZE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (110 + rng.integers(-20, 21, (size, size, 3))).astype(np.uint8)


def standing(size=SIZE, dx=0) -> dict:
    """A person standing in the middle of a ``size`` canvas, integer pixels, all joints visible."""
    s = size / 32
    at = {
        "nose": (16, 5),
        "left_eye": (17, 4),
        "right_eye": (15, 4),
        "left_ear": (18, 5),
        "right_ear": (14, 5),
        "left_shoulder": (19, 9),
        "right_shoulder": (13, 9),
        "left_elbow": (21, 13),
        "right_elbow": (11, 13),
        "left_wrist": (22, 17),
        "right_wrist": (10, 17),
        "left_hip": (18, 18),
        "right_hip": (14, 18),
        "left_knee": (18, 23),
        "right_knee": (14, 23),
        "left_ankle": (18, 28),
        "right_ankle": (14, 28),
    }
    keypoints = {n: [float(round((at[n][0] + dx) * s)), float(round(at[n][1] * s)), 1.0] for n in COCO17}
    return {"format": "coco17", "width": size, "height": size, "people": [{"keypoints": keypoints}]}


# --------------------------------------------------------------------------- request checks (no Ray)
class CheckingService:
    """Runs the ingress's checks (``check_edit``), answers with the scene and the pose given."""

    def __init__(self):
        self.calls = []

    async def edit(self, body):
        from armature.serve.edits import check_edit

        checked = check_edit(body, LIMITS)
        self.calls.append(checked)
        pose = checked["pose"].to_json() if checked["pose"] is not None else standing()
        return {"created": 0, "data": [{"b64_json": png(checked["scene"]), "seed": 0}], "pose": pose}

    async def generate(self, body):
        raise AssertionError("not this route")

    async def adapters(self):
        return []

    async def ready(self):
        return True


@pytest.fixture()
def api():
    from fastapi.testclient import TestClient

    from armature.serve.routes import create_api

    service = CheckingService()
    return TestClient(create_api(service, LIMITS, [], edits_max_body_bytes=65536)), service


def _bad_pose(edit):
    pose = standing()
    edit(pose)
    return pose


REFUSED = [
    ({"pose": [1, 2, 3]}, "pose"),
    ({"pose": _bad_pose(lambda p: p["people"][0]["keypoints"].pop("left_knee"))}, "pose.people[0].keypoints.left_knee"),
    (
        {"pose": _bad_pose(lambda p: p["people"][0]["keypoints"].update(nose=[40.0, 3.0, 1.0]))},
        "pose.people[0].keypoints.nose",
    ),
    (
        {"pose": _bad_pose(lambda p: p["people"][0]["keypoints"].update(nose=[4.0, 3.0, 2.0]))},
        "pose.people[0].keypoints.nose",
    ),
    (
        {"pose": _bad_pose(lambda p: p["people"][0]["keypoints"].update(tail=[4.0, 3.0, 1.0]))},
        "pose.people[0].keypoints.tail",
    ),
    ({"pose": _bad_pose(lambda p: p.update(format="openpose"))}, "pose.format"),
    ({"pose": _bad_pose(lambda p: p.update(people="everyone"))}, "pose.people"),
    ({"pose": _bad_pose(lambda p: p.update(colour="red"))}, "pose"),
    ({"pose": standing(size=64)}, "pose.width"),
    ({"pose": _bad_pose(lambda p: p.update(width=float("inf")))}, "pose"),
    ({"image": "not base64!"}, "image"),
    ({"image": base64.b64encode(b"GIF89a....").decode()}, "image"),
    ({"image": png(scene(size=72))}, "image"),
    ({"image": png(scene(size=20))}, "image"),
    ({"box": [4, 4, 2, 30]}, "box"),
    ({"box": [0, 0, 33, 10]}, "box"),
    ({"box": [0, 0, 10]}, "box"),
    ({"mask": png(np.zeros((SIZE, SIZE), np.uint8))}, "mask"),
    ({"mask": png(np.ones((16, 16), np.uint8))}, "mask"),
    ({"box": [0, 0, 8, 8], "mask": png(np.ones((SIZE, SIZE), np.uint8))}, "mask"),
    ({"prompt": ""}, "prompt"),
    ({"steps": 9}, "steps"),
    ({"seed": -1}, "seed"),
    ({"strength": 0.5}, "strength"),
]


@pytest.mark.parametrize("change, field", REFUSED)
def test_edit_requests_are_refused_naming_the_field(api, change, field):
    client, service = api
    body = {"image": png(scene()), "prompt": "a person standing", **change}
    response = client.post(
        "/v1/images/edits",
        content=json.dumps(body),  # json.dumps writes Infinity
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    assert field.split(".")[-1] in error["message"]
    assert service.calls == []  # never reached the model


def test_edit_request_checks_pass_a_good_request_through(api):
    client, service = api
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:30, 8:24] = 255
    for region in ({"box": [8, 4, 24, 30]}, {"mask": png(mask)}, {}):
        body = {"image": png(scene()), "prompt": "a person standing", "pose": standing(), **region}
        response = client.post("/v1/images/edits", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["pose"] == standing()
    box_region, mask_region, no_region = (c["region"] for c in service.calls)
    assert np.array_equal(box_region, mask > 0) and no_region is None
    assert isinstance(service.calls[0]["pose"], Skeleton)
    # edit bodies have their own size limit (images), the other routes keep theirs
    big = client.post("/v1/images/edits", content=b"{" + b" " * 70000 + b"}")
    assert big.status_code == 413
    assert client.post("/v1/images/generations", content=b"{" + b" " * 5000 + b"}").status_code == 413


def test_pose_error_fields():
    from armature.serve.edits import pose_error_field

    assert pose_error_field("pose: not valid JSON (...)") == "pose"
    assert pose_error_field("width: expected a positive integer") == "pose.width"
    assert pose_error_field("people[2].keypoints.left_hip: missing; ...") == "pose.people[2].keypoints.left_hip"
    assert pose_error_field("something odd happened") == "pose"


# --------------------------------------------------------------------------- on Serve, over HTTP
EDIT_SIZE = 64  # the tiny SkeleGuide model's size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    """One Serve application with the tiny SkeleGuide pipeline (2 steps a stage) as its editor."""
    import torch
    from ray import serve

    from armature.platform.config import compose
    from armature.policies.skeleguide import SkeleGuidePipeline
    from armature.serve.app import build_application

    tmp = tmp_path_factory.mktemp("edits")
    SkeleGuidePipeline.build({"num_steps": 2}).save_pretrained(tmp / "skeleguide")
    cfg = compose(
        "serve",
        [
            f"tracking.local_dir={tmp / 'track'}",
            f"adapters.cache_dir={tmp / 'cache'}",
            "api_key_env=null",
            "sampling.num_steps=2",
            "generator.torch_threads=1",
            "generator.num_cpus=0.5",
            f"edits.pipeline={tmp / 'skeleguide'}",
            "edits.num_steps=2",
            "edits.editor.torch_threads=1",
            "limits.max_steps=4",
            "limits.request_timeout_s=60",
        ],
    )
    threads = torch.get_num_threads()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(cfg), name="edits", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=120) as client:
        yield {"client": client, "base": base}
    serve.delete("edits")
    serve.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def triple():
    from armature.skeleton.scenes import triples

    return triples(1, seed=5)[0]


def _edited(skeleton: Skeleton) -> Skeleton:
    """The user's edit: the left wrist moved 4 px up (and the pose shifted on whole pixels)."""
    array = skeleton.array.copy()
    array[0, COCO17.index("left_wrist"), 1] = max(0.0, array[0, COCO17.index("left_wrist"), 1] - 4)
    return Skeleton(skeleton.width, skeleton.height, array)


@pytest.mark.slow
def test_planned_then_edited_pose_round_trip(server, triple):
    """Plan a pose, edit it, send it back: it comes back as the pose used, the layout the image was
    rendered from parses to it, and outside the person box the scene is unchanged."""
    from armature.serve.client import GeneratorClient
    from armature.skeleton import canonical, parse_layout

    box = [16, 4, 48, 62]
    outside = np.ones((EDIT_SIZE, EDIT_SIZE), bool)
    outside[4:62, 16:48] = False
    with GeneratorClient(server["base"], api_key="") as client:
        planned = client.edit(triple.scene, triple.prompt, box=box, seed=3)
        assert Skeleton.from_json(planned.pose).width == EDIT_SIZE  # the model's plan, as keypoint JSON
        assert np.array_equal(np.asarray(planned.image.convert("RGB"))[outside], triple.scene[outside])

        edited = _edited(triple.skeleton)
        again = client.edit(triple.scene, triple.prompt, box=box, pose=edited.to_json(), seed=3)
    assert again.pose == edited.to_json()  # the pose used is the edited one
    layout = np.asarray(again.layout.convert("RGB"))
    assert parse_layout(layout, triple.scene).equals(canonical(edited))
    image = np.asarray(again.image.convert("RGB"))
    assert image.shape == triple.scene.shape
    assert np.array_equal(image[outside], triple.scene[outside])


@pytest.mark.slow
def test_mask_region_keeps_the_background_and_bad_poses_get_400(server, triple):
    client = server["client"]
    body = {
        "image": png(triple.scene),
        "prompt": triple.prompt,
        "seed": 1,
        "mask": png(triple.person_mask.astype(np.uint8) * 255),
        "pose": triple.skeleton.to_json(),
    }
    answer = client.post("/v1/images/edits", json=body)
    assert answer.status_code == 200, answer.text
    image = unpng(answer.json()["data"][0]["b64_json"])
    assert np.array_equal(image[~triple.person_mask], triple.scene[~triple.person_mask])
    assert answer.json()["data"][0]["seed"] == 1

    bad = triple.skeleton.to_json()
    bad["people"][0]["keypoints"]["right_knee"] = [12.0, "low", 1.0]
    refused = client.post("/v1/images/edits", json={**body, "pose": bad})
    assert refused.status_code == 400
    assert refused.json()["error"]["field"] == "pose.people[0].keypoints.right_knee"
    not_json = client.post("/v1/images/edits", json={**body, "pose": "nose at the top"})
    assert not_json.status_code == 400 and not_json.json()["error"]["field"] == "pose"
