"""The Ray Serve generator on the session's Ray cluster, called over HTTP.

Two applications start once for the module: ``open`` (no API key) and ``secure`` (a key from the
environment). Adapters are real: LoRA and full fine-tunes saved from the tiny policy, logged to
MLflow runs in a temporary SQLite store and registered with ``register_adapter``.
"""

import asyncio
import base64
import io
import os
import socket

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from armature.platform.config import compose
from armature.platform.registry import register_adapter
from armature.platform.tracking import RunLogger, resolve_tracking, start_run
from armature.policies import build_policy
from armature.serve.generation import ImageJob, PassShape, generate

pytestmark = pytest.mark.slow

BASE = {"family": "tiny", "lora": {"enabled": False}}
SAMPLING = {"num_steps": 4, "guidance_scale": 1.0, "eta": 1.0}
SHAPE = PassShape(steps=4, height=32, width=32, guidance_scale=1.0, eta=1.0)
PASS = 4
KEY = "test-key-123"
# ARMATURE_TEST_DIRECT_INGRESS=1: the application serves on its replica's own port (http.direct_ingress)
DIRECT = os.environ.get("ARMATURE_TEST_DIRECT_INGRESS") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora(folder, seed):
    policy = build_policy({"family": "tiny", "lora": {"enabled": True, "rank": 2}}, SAMPLING)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return policy.save_adapter(folder)


def _full(folder):
    policy = build_policy(BASE, SAMPLING)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.mul_(1.05)
    return policy.save_trainable(folder)


def _register(tracking, uri, name, folder):
    run_id = start_run(tracking, f"train-{name}", {})
    RunLogger(uri, run_id).log_artifacts(folder, "adapter")
    return register_adapter(uri, run_id, name)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf
    from ray import serve

    from armature.serve.app import build_application, controller_options, direct_ingress_ports

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas: float sums depend on the thread count
    tmp = tmp_path_factory.mktemp("serve")
    tracking = {"local_dir": str(tmp / "track"), "experiment": "serve-test"}
    uri, _ = resolve_tracking(tracking)
    folders = {
        "lora-adapter/1": _lora(tmp / "l1", 1),
        "lora-adapter/2": _lora(tmp / "l2", 2),
        "full-adapter/1": _full(tmp / "full"),
        "local-lora": _lora(tmp / "l3", 3),
    }
    for ref in ("lora-adapter/1", "lora-adapter/2", "full-adapter/1"):
        assert _register(tracking, uri, ref.split("/")[0], folders[ref]) == int(ref[-1])
    MlflowClient(uri).set_registered_model_alias("lora-adapter", "prod", "1")
    (tmp / "pickled").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp / "pickled" / "adapter_model.bin")
    _register(tracking, uri, "pickled-adapter", tmp / "pickled")

    overrides = [
        f"tracking.local_dir={tmp / 'track'}",
        "tracking.experiment=serve-test",
        f"adapters.cache_dir={tmp / 'cache'}",
        "adapters.max_per_replica=2",
        "sampling.num_steps=4",
        "generator.torch_threads=1",
        "generator.max_ongoing_requests=8",
        "generator.max_queued_requests=16",
        "batching.max_batch_size=4",
        f"batching.pass_size={PASS}",
        "batching.batch_wait_timeout_s=0.05",
        "limits.max_steps=200",
        "limits.request_timeout_s=4",
        "limits.max_images=4",
        "limits.max_best_of=8",
        f"http.direct_ingress={DIRECT}",
        "http.direct_ingress_drain_s=0",
    ]
    open_cfg = compose("serve", overrides + ["api_key_env=null"])
    open_cfg.adapters.local = {"local-lora": str(folders["local-lora"])}
    secure_cfg = compose("serve", overrides + ["api_key_env=ARMATURE_TEST_KEY", "generator.num_cpus=0.5"])
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options(open_cfg))
    serve.run(build_application(open_cfg), name="open", route_prefix="/")
    os.environ["ARMATURE_TEST_KEY"] = KEY
    try:
        serve.run(build_application(secure_cfg), name="secure", route_prefix="/secure")
    finally:
        del os.environ["ARMATURE_TEST_KEY"]
    ports = direct_ingress_ports() if DIRECT else {"open": port, "secure": port}  # each replica its own
    base, secure = f"http://127.0.0.1:{ports['open']}", f"http://127.0.0.1:{ports['secure']}/secure"
    with httpx.Client(base_url=base, timeout=60) as client, httpx.Client(base_url=secure, timeout=60) as keyed:
        yield {
            "client": client,
            "secure": keyed,
            "base": base,
            "folders": folders,
            "uri": uri,
            "stats": serve.get_deployment_handle("Generator", app_name="open").stats,
            "config": OmegaConf.to_container(open_cfg),
        }
    serve.shutdown()
    torch.set_num_threads(threads)


def _images(response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in response.json()["data"]]


def _local(folder, jobs) -> np.ndarray:
    policy = build_policy(BASE, SAMPLING)
    policy.unet.requires_grad_(False)
    if folder is not None:
        policy.load_adapter(folder)
    return generate(policy, jobs, SHAPE, pass_size=PASS)


def _stats(server) -> dict:
    return server["stats"].remote().result()


def test_generation_is_reproducible_batched_or_not(server):
    client = server["client"]
    body = {"prompt": "a red cube", "seed": 11, "n": 2}
    first = client.post("/v1/images/generations", json=body)
    images = _images(first)
    assert [d["seed"] for d in first.json()["data"]] == [11, 12] and images[0].shape == (32, 32, 3)
    assert first.json()["adapter_version"] is None
    assert first.json()["data"] == client.post("/v1/images/generations", json=body).json()["data"]
    second = client.post("/v1/images/generations", json={**body, "n": 1, "seed": 12})
    assert np.array_equal(_images(second)[0], images[1])
    expected = _local(None, [ImageJob("a red cube", "", 11), ImageJob("a red cube", "", 12)])
    assert np.array_equal(np.stack(images), expected)

    # Concurrent compatible requests share passes; each image is what it is alone.
    bodies = [{"prompt": f"shape {i}", "seed": 100 + i, "negative_prompt": "blue" if i % 2 else None} for i in range(6)]
    before = _stats(server)

    async def burst():
        async with httpx.AsyncClient(base_url=server["base"], timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/images/generations", json=b) for b in bodies))

    together = asyncio.run(burst())
    after = _stats(server)
    assert after["largest_group"] >= 2 and after["groups"] - before["groups"] < len(bodies)
    for body, response in zip(bodies, together):
        alone = client.post("/v1/images/generations", json=body)
        assert np.array_equal(_images(response)[0], _images(alone)[0])


def test_adapters_by_name_version_alias_and_local_folder(server):
    client, folders = server["client"], server["folders"]
    body = {"prompt": "a green sphere", "seed": 5}
    jobs = [ImageJob("a green sphere", "", 5)]
    base = _images(client.post("/v1/images/generations", json=body))[0]
    cases = [
        ("lora-adapter", "lora-adapter/2"),
        ("lora-adapter/1", "lora-adapter/1"),
        ("lora-adapter@prod", "lora-adapter/1"),
        ("full-adapter", "full-adapter/1"),
        ("local-lora", "local:local-lora"),
        ("lora-adapter/2", "lora-adapter/2"),
    ]
    loads = _stats(server)["adapter_loads"]
    for reference, resolved in cases:
        response = client.post("/v1/images/generations", json={**body, "adapter": reference})
        image = _images(response)[0]
        assert response.json()["adapter_version"] == resolved
        assert not np.array_equal(image, base), reference
        folder = folders[resolved.removeprefix("local:")]
        assert np.array_equal(image, _local(folder, jobs)[0]), reference
    stats = _stats(server)
    # LRU of 2 per replica: lora/2 was evicted by the others and loaded again.
    assert stats["adapter_loads"] - loads == 5 and len(stats["adapters_loaded"]) <= 2
    assert np.array_equal(_images(client.post("/v1/images/generations", json=body))[0], base)

    listed = {a["id"] for a in client.get("/v1/adapters").json()["data"]}
    assert {
        "lora-adapter/1",
        "lora-adapter/2",
        "lora-adapter",
        "lora-adapter@prod",
        "full-adapter/1",
        "local-lora",
    } <= listed


@pytest.mark.parametrize(
    "reference, status, words",
    [
        ("no-such-adapter", 404, "no registered model"),
        ("lora-adapter/9", 404, "not found"),
        ("lora-adapter@nope", 404, "nope"),
        ("pickled-adapter", 400, "only safetensors"),
    ],
)
def test_unservable_adapters(server, reference, status, words):
    response = server["client"].post("/v1/images/generations", json={"prompt": "x", "adapter": reference})
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == "adapter" and words in response.json()["error"]["message"]


def test_best_of_returns_the_best_candidates(server):
    client = server["client"]
    body = {"prompt": "a yellow star", "seed": 40, "reward": "compressibility"}
    every = client.post("/v1/images/generations", json={**body, "n": 4}).json()["data"]
    best = client.post("/v1/images/generations", json={**body, "n": 2, "best_of": 4}).json()["data"]
    ranked = sorted(every, key=lambda d: -d["score"])[:2]
    assert [(d["seed"], d["b64_json"]) for d in best] == [(d["seed"], d["b64_json"]) for d in ranked]
    assert best[0]["score"] >= best[1]["score"]
    plain = client.post("/v1/images/generations", json={"prompt": "a yellow star", "seed": 40}).json()
    assert plain["data"][0]["score"] is None


REFUSED = [
    ({"prompt": "x" * 501}, "prompt"),
    ({"prompt": "x", "negative_prompt": "y" * 501}, "negative_prompt"),
    ({"prompt": "x", "steps": 201}, "steps"),
    ({"prompt": "x", "size": "128x32"}, "size"),
    ({"prompt": "x", "size": "30x30"}, "size"),
    ({"prompt": "x", "n": 5}, "n"),
    ({"prompt": "x", "best_of": 9, "reward": "compressibility"}, "best_of"),
    ({"prompt": "x", "n": 3, "best_of": 2, "reward": "compressibility"}, "best_of"),
    ({"prompt": "x", "guidance_scale": 21}, "guidance_scale"),
    ({"prompt": "x", "reward": "aesthetic"}, "reward"),
    ({"prompt": "x", "adapter": "/etc/passwd"}, "adapter"),
    ({"prompt": "x", "seed": 2**32}, "seed"),
    ({"prompt": "x", "unknown": 1}, "unknown"),
    ({}, "prompt"),
]


def test_limits_refuse_before_the_model(server):
    client = server["client"]
    before = _stats(server)
    for body, field in REFUSED:
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["field"] == field, (body, response.json())
    big = client.post(
        "/v1/images/generations",
        content=b'{"prompt": "' + b"x" * 70000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert big.status_code == 413 and big.json()["error"]["field"] == "body"
    assert _stats(server)["requests"] == before["requests"]  # none reached a generator
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ImageRequest"]["properties"]
    assert schema["steps"]["anyOf"][0]["maximum"] == 200 and schema["n"]["maximum"] == 4


def test_auth_on_and_off(server):
    client, secure = server["client"], server["secure"]
    assert client.post("/v1/images/generations", json={"prompt": "x", "seed": 1}).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        denied = secure.post("/v1/images/generations", json={"prompt": "x"}, headers=headers)
        assert denied.status_code == 401 and denied.json()["error"]["field"] == "authorization"
        assert secure.get("/v1/adapters", headers=headers).status_code == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    allowed = secure.post("/v1/images/generations", json={"prompt": "x", "seed": 1}, headers=ok)
    assert allowed.status_code == 200
    assert secure.get("/v1/adapters", headers=ok).status_code == 200
    assert secure.get("/healthz").status_code == 200 and secure.get("/readyz").status_code == 200


def test_timeout_504_and_overload_503(server):
    client = server["client"]
    slow = {"prompt": "x", "steps": 200, "size": "64x64", "n": 4, "best_of": 8, "reward": "compressibility"}
    response = client.post("/v1/images/generations", json=slow)
    assert response.status_code == 504 and "request_timeout_s" in response.json()["error"]["message"]

    async def flood():
        async with httpx.AsyncClient(base_url=server["base"], timeout=60) as c:
            bodies = [{"prompt": f"p{i}", "steps": 10, "seed": i} for i in range(40)]
            return await asyncio.gather(*(c.post("/v1/images/generations", json=b) for b in bodies))

    statuses = [r.status_code for r in asyncio.run(flood())]
    # queued past the deadline on a slow machine, a request may also get 504; nothing else is allowed
    assert set(statuses) <= {200, 503, 504} and statuses.count(200) >= 8 and statuses.count(503) >= 1, statuses
    refused = next(r for r in asyncio.run(flood()) if r.status_code == 503)
    assert refused.json()["error"]["code"] == "overloaded" and refused.headers["retry-after"] == "1"
    assert client.post("/v1/images/generations", json={"prompt": "x", "seed": 1}).status_code == 200


def test_python_client(server):
    from armature.serve.client import GeneratorClient, GeneratorError

    with GeneratorClient(str(server["secure"].base_url).rstrip("/"), api_key=KEY) as client:
        assert client.ready()
        result = client.generate("a red cube", seed=11, n=2)
        assert result.seeds == [11, 12] and result.images[0].size == (32, 32)
        assert any(a["id"] == "lora-adapter@prod" for a in client.adapters())
        with pytest.raises(GeneratorError) as err:
            client.generate("a red cube", steps=1000)
        assert err.value.status == 400 and err.value.field == "steps"
    with GeneratorClient(str(server["secure"].base_url).rstrip("/"), api_key="") as anonymous:
        with pytest.raises(GeneratorError, match="401"):
            anonymous.generate("a red cube")
