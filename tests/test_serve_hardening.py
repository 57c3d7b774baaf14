"""The Ray Serve generator under slow clients and malformed adapters, over real sockets.

One keyed application starts for the module, with the shipped per-client limit and a short
body deadline. Stalled clients send a request's headers and then stall its body, as a
slowloris attack does; while they are held, ``/healthz`` and ``/readyz`` must answer, and
each stalled connection must get its answer (401, 429 or 408) and be closed.
"""

import os
import socket

import httpx
import pytest

from armature.platform.config import compose

pytestmark = pytest.mark.slow

KEY = "hardening-key-7"
BODY_TIMEOUT_S = 8
STALLED = 130  # more than the ingress's max_ongoing_requests (128)
ANSWER_WITHIN_S = 60  # a bound on waiting, not a speed claim
# ARMATURE_TEST_DIRECT_INGRESS=1: the application serves on its replica's own port (http.direct_ingress)
DIRECT = os.environ.get("ARMATURE_TEST_DIRECT_INGRESS") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from omegaconf import OmegaConf
    from ray import serve

    from armature.policies import build_policy
    from armature.serve.app import build_application, controller_options, direct_ingress_ports, http_options

    tmp = tmp_path_factory.mktemp("hardening")
    broken = build_policy(
        {"family": "tiny", "lora": {"enabled": True, "rank": 2}}, {"num_steps": 4, "guidance_scale": 1.0, "eta": 1.0}
    ).save_adapter(tmp / "broken")
    (broken / "adapter_config.json").write_text('{"lora": {"rank": 2,')  # cut short
    port = _free_port()
    cfg = compose(
        "serve",
        [
            f"tracking.local_dir={tmp / 'track'}",
            f"adapters.cache_dir={tmp / 'cache'}",
            f"http.port={port}",
            "sampling.num_steps=4",
            "generator.torch_threads=1",
            "api_key_env=ARMATURE_HARDENING_KEY",
            f"limits.body_timeout_s={BODY_TIMEOUT_S}",
            f"http.direct_ingress={DIRECT}",
            "http.direct_ingress_drain_s=0",
        ],
    )
    cfg.adapters.local = {"broken": str(broken)}
    options = http_options(OmegaConf.to_container(cfg))
    serve.start(http_options=options, controller_options=controller_options(cfg))
    os.environ["ARMATURE_HARDENING_KEY"] = KEY
    try:
        serve.run(build_application(cfg), name="hardened", route_prefix="/")
    finally:
        del os.environ["ARMATURE_HARDENING_KEY"]
    port = direct_ingress_ports()["hardened"] if DIRECT else port
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=ANSWER_WITHIN_S) as client:
        yield {"client": client, "port": port, "options": options, "per_client": cfg.limits.max_requests_per_client}
    serve.shutdown()


def _stall(port: int, key: str | None = None) -> socket.socket:
    """A connection that sends a generation request's headers and the start of its body, then stalls."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n"
    )
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    sock.sendall(head.encode() + b'\r\n{"prompt": ')
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    sock.settimeout(ANSWER_WITHIN_S)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _answers_while_held(client: httpx.Client) -> None:
    """``/healthz`` and ``/readyz`` answer while the stalled connections are open."""
    for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
        response = client.get(path, timeout=10)
        assert response.status_code == 200 and response.json()["status"] == status


def test_the_proxy_bounds_requests_and_idle_connections(server):
    # limits.request_timeout_s (60) + limits.body_timeout_s + the margin
    assert server["options"]["request_timeout_s"] == 60 + BODY_TIMEOUT_S + 30
    assert server["options"]["keep_alive_timeout_s"] == 5


def test_unauthenticated_stalled_bodies_get_401_from_the_headers(server):
    client, port = server["client"], server["port"]
    stalled = [_stall(port) for _ in range(STALLED)]
    try:
        _answers_while_held(client)
        ok = {"Authorization": f"Bearer {KEY}"}
        generated = client.post("/v1/images/generations", json={"prompt": "a red cube", "seed": 1}, headers=ok)
        assert generated.status_code == 200 and len(generated.json()["data"]) == 1
        # A chunked body (no Content-Length) is read too, counted against the byte limit.
        chunked = client.post(
            "/v1/images/generations",
            content=iter([b'{"prompt": "a red', b' cube", "seed": 1}']),
            headers={**ok, "Content-Type": "application/json"},
        )
        assert chunked.status_code == 200 and chunked.json()["data"] == generated.json()["data"]
        answers = [_answer(sock) for sock in stalled]  # each answered, then closed
    finally:
        for sock in stalled:
            sock.close()
    assert {_status(a) for a in answers} == {401}
    assert all(b'"field":"authorization"' in a for a in answers)


def test_authorized_stalled_bodies_get_429_past_the_client_limit_then_408(server):
    client, port, per_client = server["client"], server["port"], server["per_client"]
    stalled = [_stall(port, KEY) for _ in range(STALLED)]
    try:
        _answers_while_held(client)
        answers = [_answer(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    statuses = [_status(a) for a in answers]
    assert statuses.count(429) == STALLED - per_client and statuses.count(408) == per_client, statuses
    late = next(a for a in answers if _status(a) == 408)
    assert b"limits.body_timeout_s" in late and b'"field":"body"' in late
    refused = next(a for a in answers if _status(a) == 429)
    assert b"max_requests_per_client" in refused and b"retry-after: 1" in refused.lower()
    # The client's slots are free again.
    ok = {"Authorization": f"Bearer {KEY}"}
    assert client.post("/v1/images/generations", json={"prompt": "x", "seed": 2}, headers=ok).status_code == 200


def test_a_malformed_adapter_config_is_a_4xx_naming_the_adapter(server):
    response = server["client"].post(
        "/v1/images/generations", json={"prompt": "x", "adapter": "broken"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == "adapter" and "'local:broken'" in error["message"]
    assert "adapter_config.json is not valid JSON" in error["message"]
