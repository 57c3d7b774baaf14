"""The labeling server as a real process: tokens, the left/right mapping through HTTP, and a
SIGKILL mid-session that loses no acknowledged label."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image

from armature.feedback.store import PreferenceStore

RED, BLUE = (220, 10, 10), (10, 10, 220)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db, port, *extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "armature.cli", "label", "serve", "--db", str(db), "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).text == "ok":
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the labeling server did not start in 60 s")


def seed_store(db, n):
    """n pairs whose image a is red and image b blue; one annotator; returns the token."""
    store = PreferenceStore(db)
    store.add_pairs(
        [
            {
                "prompt": f"prompt {i}",
                "image_a": np.full((16, 16, 3), RED, np.uint8),
                "image_b": np.full((16, 16, 3), BLUE, np.uint8),
            }
            for i in range(n)
        ]
    )
    token = store.add_annotator("alice")
    store.close()
    return token


def color_of(data_uri: str):
    data = base64.b64decode(data_uri.split(",", 1)[1])
    return tuple(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 0])


def expected_decision(left_color, choice):
    """Independently of the store: the stored image (red = a, blue = b) the click picked."""
    if choice == "none":
        return "tie"
    right_color = BLUE if left_color == RED else RED
    picked = left_color if choice == "left" else right_color
    return "w" if picked == RED else "l"


def test_tokens_required(tmp_path):
    db = tmp_path / "fb.db"
    seed_store(db, 1)
    from fastapi.testclient import TestClient

    from armature.feedback.web import create_app

    client = TestClient(create_app(str(db)))
    assert client.get("/api/next").status_code == 401
    assert client.get("/api/next", headers={"Authorization": "Bearer nope"}).status_code == 401
    response = client.post("/api/label", json={"pair_id": "x", "choice": "left"})
    assert response.status_code == 401
    assert "<html" in client.get("/").text


def test_sigkill_mid_session_loses_no_label(tmp_path):
    db, port = tmp_path / "fb.db", free_port()
    token = seed_store(db, 12)
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{port}"
    choices = ["left", "right", "none", "right", "left"]
    acknowledged = {}  # pair_id -> decision the server answered with
    expected = {}

    def label_some(n):
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            for _ in range(n):
                pair = client.get("/api/next").json()
                if pair["pair_id"] is None:
                    return None
                choice = choices[len(acknowledged) % len(choices)]
                answer = client.post("/api/label", json={"pair_id": pair["pair_id"], "choice": choice})
                assert answer.status_code == 200, answer.text
                acknowledged[pair["pair_id"]] = answer.json()["decision"]
                expected[pair["pair_id"]] = expected_decision(color_of(pair["left"]), choice)
            return client.get("/api/next").json()  # served, left unlabeled when the server dies

    server = start_server(db, port)
    try:
        pending = label_some(5)
        server.send_signal(signal.SIGKILL)  # no shutdown handler runs
        server.wait(10)
        server = start_server(db, port)
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            resumed = client.get("/api/next").json()
        assert resumed["pair_id"] == pending["pair_id"]  # the pending pair, same order: not re-served
        assert color_of(resumed["left"]) == color_of(pending["left"])
        label_some(20)  # the rest
    finally:
        server.kill()
        server.wait(10)

    store = PreferenceStore(db)
    labels = {lab["pair_id"]: lab for lab in store.labels()}
    assert len(acknowledged) == 12 and set(labels) == set(acknowledged)
    for pair_id, decision in acknowledged.items():
        assert labels[pair_id]["decision"] == decision == expected[pair_id]
    assert {d for d in acknowledged.values()} == {"w", "l", "tie"}
    assert store.progress("alice")["labeled"] == 12 and store.progress("alice")["remaining"] == 0


def test_severity_required_when_configured(tmp_path):
    db = tmp_path / "fb.db"
    token = seed_store(db, 2)
    from fastapi.testclient import TestClient

    from armature.feedback.web import create_app

    client = TestClient(create_app(str(db), severity=True), headers={"Authorization": f"Bearer {token}"})
    pair = client.get("/api/next").json()
    assert client.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "left"}).status_code == 422
    assert (
        client.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "left", "severity": 9}).status_code == 422
    )
    ok = client.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "left", "severity": 2})
    assert ok.status_code == 200
    again = client.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "right", "severity": 1})
    assert again.status_code == 409  # one label per person and pair
    assert PreferenceStore(db).labels()[0]["severity"] == 2


def test_page_headers_url_tokens_and_unasked_severity(tmp_path):
    """Framing is forbidden on every response, a token in the URL is refused even when valid, and
    a severity the page did not ask for is refused (nothing stored)."""
    db = tmp_path / "fb.db"
    token = seed_store(db, 2)
    from fastapi.testclient import TestClient

    from armature.feedback.web import create_app

    client = TestClient(create_app(str(db)))
    for response in (client.get("/"), client.get("/healthz"), client.get("/api/next")):
        assert response.headers["x-frame-options"] == "DENY"
        csp = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
        assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'none'"
        assert "unsafe-inline" not in response.headers["content-security-policy"]
    refused = client.get(f"/api/next?token={token}")
    assert refused.status_code == 400 and "Authorization header" in refused.json()["detail"]
    refused = client.get(f"/api/next?token={token}", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 400  # not even alongside a good header: the URL has leaked it

    client.headers["Authorization"] = f"Bearer {token}"
    pair = client.get("/api/next").json()
    unasked = client.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "left", "severity": 2})
    assert unasked.status_code == 422 and "severity" in unasked.json()["detail"]
    assert PreferenceStore(db).labels() == []
    assert client.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "left"}).status_code == 200

    asked = TestClient(create_app(str(db), severity=True), headers={"Authorization": f"Bearer {token}"})
    pair = asked.get("/api/next").json()
    tie = asked.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "none", "severity": 1})
    assert tie.status_code == 422  # no rejected image: the page asks no severity with "no preference"
    assert asked.post("/api/label", json={"pair_id": pair["pair_id"], "choice": "none"}).status_code == 200
    assert [lab["severity"] for lab in PreferenceStore(db).labels()] == [None, None]


def test_ray_serve_application_builds_the_app_in_the_replica(tmp_path):
    """Under Ray Serve the replica builds the app (``__serve_build_asgi_app__``) from the URL."""
    from fastapi.testclient import TestClient

    from armature.feedback.web import deployment

    db = tmp_path / "fb.db"
    token = seed_store(db, 1)
    app = deployment(str(db), labels_per_pair=2)
    assert type(app).__name__ == "Application"
    cls = app._bound_deployment.func_or_class
    replica = cls.__new__(cls)
    replica.args = (str(db), False, 2)  # what the replica's __init__ keeps (bound above)
    assert app._bound_deployment.init_args == replica.args
    client = TestClient(cls.__serve_build_asgi_app__(replica), headers={"Authorization": f"Bearer {token}"})
    assert client.get("/api/next").json()["prompt"] == "prompt 0"
