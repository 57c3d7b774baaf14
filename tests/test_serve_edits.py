"""``POST /v1/images/edits``: a person rendered into a scene by a SkeleGuide pipeline.

The request checks (every 422 names its field, a bad pose down to the joint) run on the FastAPI
app alone; the rest on one Serve application on the session's Ray cluster with the tiny
SkeleGuide pipeline saved to a folder, called over HTTP.
"""

import base64
import io
import socket

import httpx
import numpy as np
import pytest
from PIL import Image

from armature.skeleton import COCO17, Skeleton

SIZE = 32
LIMITS = {"max_prompt_chars": 40, "max_steps": 8, "min_size": 16, "max_size": 64, "size_multiple": 8,
          "max_images": 2, "max_best_of": 4, "max_guidance_scale": 10.0, "max_body_bytes": 4096,
          "request_timeout_s": 5.0}


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
    at = {"nose": (16, 5), "left_eye": (17, 4), "right_eye": (15, 4), "left_ear": (18, 5), "right_ear": (14, 5),
          "left_shoulder": (19, 9), "right_shoulder": (13, 9), "left_elbow": (21, 13), "right_elbow": (11, 13),
          "left_wrist": (22, 17), "right_wrist": (10, 17), "left_hip": (18, 18), "right_hip": (14, 18),
          "left_knee": (18, 23), "right_knee": (14, 23), "left_ankle": (18, 28), "right_ankle": (14, 28)}
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
    ({"pose": _bad_pose(lambda p: p["people"][0]["keypoints"].update(nose=[40.0, 3.0, 1.0]))},
     "pose.people[0].keypoints.nose"),
    ({"pose": _bad_pose(lambda p: p["people"][0]["keypoints"].update(nose=[4.0, 3.0, 2.0]))},
     "pose.people[0].keypoints.nose"),
    ({"pose": _bad_pose(lambda p: p["people"][0]["keypoints"].update(tail=[4.0, 3.0, 1.0]))},
     "pose.people[0].keypoints.tail"),
    ({"pose": _bad_pose(lambda p: p.update(format="openpose"))}, "pose.format"),
    ({"pose": _bad_pose(lambda p: p.update(people="everyone"))}, "pose.people"),
    ({"pose": _bad_pose(lambda p: p.update(colour="red"))}, "pose"),
    ({"pose": standing(size=64)}, "pose.width"),
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
    response = client.post("/v1/images/edits", json=body)
    assert response.status_code == 422, response.text
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
