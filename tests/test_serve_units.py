"""The serving pieces without Ray: sampling, adapters side by side, Best-of-N, the HTTP schema."""

import time

import numpy as np
import pytest
import torch

from armature.policies import build_policy
from armature.serve.adapters import AdapterBank, AdapterError
from armature.serve.generation import ImageJob, PassShape, best_of, generate

BASE = {"family": "tiny", "lora": {"enabled": False}}
SAMPLING = {"num_steps": 3, "guidance_scale": 3.0, "eta": 1.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model runs best on one thread, and far slower on two when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _policy(model=BASE):
    policy = build_policy(model, SAMPLING)
    policy.unet.requires_grad_(False)
    return policy


def _lora_adapter(folder, seed, rank=2):
    trained = build_policy({"family": "tiny", "lora": {"enabled": True, "rank": rank}}, SAMPLING)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return trained.save_adapter(folder)


FLOW = {"family": "tiny_flow", "tiny": {"image_size": 32}, "lora": {"enabled": False}}


@pytest.mark.parametrize("model", [BASE, FLOW], ids=["ddim", "flow"])
def test_generation_reproduces_rollout_and_ignores_batch_mates(model):
    """Serving samples as the training sampler does, for the UNet and the flow-matching families
    (eta is DDIM's eta or the flow SDE's noise level; 0: the deterministic ODE/DDIM step)."""
    policy = _policy(model)
    policy.sampling.noise_level = 1.0  # the flow SDE's level, as the request's eta below
    # pass_size 1, eta > 0: exactly the training sampler's rollout for that prompt and seed.
    shape = PassShape(steps=3, height=32, width=32, guidance_scale=3.0, eta=1.0)
    rollout = policy.rollout(["a cat"], torch.Generator().manual_seed(7)).images
    assert np.array_equal(generate(policy, [ImageJob("a cat", "", 7)], shape, pass_size=1), rollout)

    jobs = [ImageJob(f"prompt {i}", "blurry" if i % 2 else "", 100 + i) for i in range(5)]
    for eta in (1.0, 0.0):
        shape = PassShape(steps=3, height=32, width=32, guidance_scale=3.0, eta=eta)
        together = generate(policy, jobs, shape, pass_size=4)
        alone = np.concatenate([generate(policy, [job], shape, pass_size=4) for job in jobs])
        reversed_ = generate(policy, jobs[::-1], shape, pass_size=4)[::-1]
        assert np.array_equal(together, alone) and np.array_equal(together, reversed_)
        assert len({together[i].tobytes() for i in range(5)}) == 5

    with pytest.raises(TimeoutError):
        generate(policy, jobs, shape, pass_size=4, should_stop=lambda: True)

    # Unpadded: passes as large as their images (here 4, then 1), each image what a padded pass of
    # that many rows gives it.
    unpadded = generate(policy, jobs, shape, pass_size=4, pad=False)
    assert np.array_equal(unpadded[:4], generate(policy, jobs[:4], shape, pass_size=4))
    assert np.array_equal(unpadded[4:], generate(policy, jobs[4:], shape, pass_size=1))


def test_adapter_bank_serves_adapters_side_by_side(tmp_path):
    folders = {"a": _lora_adapter(tmp_path / "a", 1, rank=2), "b": _lora_adapter(tmp_path / "b", 2, rank=4)}
    full = build_policy(BASE, SAMPLING)  # full fine-tuning: every UNet weight is trainable
    with torch.no_grad():
        for p in full.trainable_parameters():
            p.mul_(1.05)
    folders["full"] = full.save_trainable(tmp_path / "full")

    shape = PassShape(steps=3, height=32, width=32, guidance_scale=3.0, eta=1.0)
    jobs = [ImageJob("a cat", "", 5), ImageJob("a dog", "", 6)]

    def local(folder):
        policy = _policy()
        if folder is not None:
            policy.load_adapter(folder)
        return generate(policy, jobs, shape, pass_size=2)

    served = _policy()
    bank = AdapterBank(served, BASE)
    adapters = {name: bank.load(name, folder) for name, folder in folders.items()}
    assert [a.kind for a in adapters.values()] == ["lora", "lora", "full"] and len(bank.loaded) == 2
    base = local(None)
    for name in ["a", "b", "full", None, "a"]:
        with bank.lock:
            bank.activate(adapters.get(name))
            images = generate(served, jobs, shape, pass_size=2)
        assert np.array_equal(images, local(folders.get(name))), name
        assert (name is None) == np.array_equal(images, base)

    # Eviction (Ray Serve calls __del__) drops the peft adapter at the next activation.
    adapters.pop("a").__del__()
    with bank.lock:
        bank.activate(None)
        assert np.array_equal(generate(served, jobs, shape, pass_size=2), base)
    assert len(bank.loaded) == 1


def test_adapter_bank_refuses_what_it_cannot_serve(tmp_path):
    bank = AdapterBank(_policy(), BASE)
    (tmp_path / "pickle").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "pickle" / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only safetensors"):
        bank.load("pickle", tmp_path / "pickle")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "unet.safetensors").write_bytes(b"\x80\x04 not a safetensors file")
    with pytest.raises(AdapterError, match="not a safetensors file"):
        bank.load("fake", tmp_path / "fake")
    other = build_policy({"family": "tiny", "tiny": {"seed": 3}, "lora": {"enabled": True, "rank": 2}}, SAMPLING)
    other.save_adapter(tmp_path / "other", metadata={"model": {"family": "tiny", "tiny": {"seed": 3}}})
    with pytest.raises(AdapterError, match="another tiny model"):
        AdapterBank(_policy(), {"family": "tiny", "tiny": {"seed": 0}}).load("other", tmp_path / "other")


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"lora": {"rank": 2,', "not valid JSON"),
        ("\udcff", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"lora": [2]}', "'lora' must be a JSON object"),
        ('{"lora": {"rank": 2}, "model": "tiny"}', "'model' must be a JSON object"),
        ('{"lora": {"rank": 2}, "model": {"tiny": 3}}', "'model.tiny' must be a JSON object"),
    ],
)
def test_adapter_bank_names_the_adapter_of_a_malformed_config(tmp_path, text, words):
    folder = _lora_adapter(tmp_path / "broken", 1)
    (folder / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(AdapterError, match="adapter 'broken': adapter_config.json") as err:
        AdapterBank(_policy(), BASE).load("broken", folder)
    assert words in str(err.value)


def test_best_of_keeps_the_best_first():
    assert best_of(np.array([0.1, 0.9, np.nan, 0.9, 0.5]), 3).tolist() == [1, 3, 4]


# --------------------------------------------------------------------------- HTTP schema
LIMITS = {
    "max_prompt_chars": 20,
    "max_steps": 8,
    "min_size": 16,
    "max_size": 64,
    "size_multiple": 8,
    "max_images": 2,
    "max_best_of": 4,
    "max_guidance_scale": 10.0,
    "max_body_bytes": 2048,
    "request_timeout_s": 5.0,
}


class FakeService:
    def __init__(self):
        self.calls = []

    async def generate(self, body):
        self.calls.append(body)
        return {"created": 0, "data": [{"b64_json": "", "seed": body.seed or 0}]}

    async def adapters(self):
        return []

    async def ready(self):
        return True


@pytest.fixture()
def api():
    from fastapi.testclient import TestClient

    from armature.serve.routes import create_api, hash_key

    service = FakeService()
    app = create_api(service, LIMITS, ["compressibility"], api_key_sha256=hash_key("s3cret"))
    return TestClient(app), service


REFUSED = [
    ({"prompt": "x" * 21}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "negative_prompt": "y" * 21}, "negative_prompt"),
    ({"prompt": "x", "steps": 9}, "steps"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "size": "72x32"}, "size"),
    ({"prompt": "x", "size": "8x32"}, "size"),
    ({"prompt": "x", "size": "36x32"}, "size"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "n": 3}, "n"),
    ({"prompt": "x", "best_of": 5, "reward": "compressibility"}, "best_of"),
    ({"prompt": "x", "n": 2, "best_of": 1, "reward": "compressibility"}, "best_of"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "reward": "aesthetic"}, "reward"),
    ({"prompt": "x", "guidance_scale": 10.5}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "adapter": "../etc/passwd"}, "adapter"),
    ({"prompt": "x", "colour": "red"}, "colour"),
]


@pytest.mark.parametrize("body, field", REFUSED)
def test_limits_refuse_naming_the_field(api, body, field):
    client, service = api
    response = client.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field
    assert field in response.json()["error"]["message"]
    assert service.calls == []  # never reached the model


def test_body_size_and_auth(api):
    client, service = api
    ok = {"Authorization": "Bearer s3cret"}
    big = client.post("/v1/images/generations", content=b"{" + b" " * 4096 + b"}", headers=ok)
    assert big.status_code == 413 and big.json()["error"]["field"] == "body"
    # A chunked body (no Content-Length) is counted as it arrives: refused past the limit, else served.
    chunked = client.post("/v1/images/generations", content=iter([b"{", b" " * 4096, b"}"]), headers=ok)
    assert chunked.status_code == 413 and chunked.json()["error"]["field"] == "body"
    assert chunked.headers["connection"] == "close"
    chunked = client.post(
        "/v1/images/generations",
        content=iter([b'{"prompt": ', b'"x", "seed": 4}']),
        headers={**ok, "Content-Type": "application/json"},
    )
    assert chunked.status_code == 200 and service.calls[-1].seed == 4
    service.calls.clear()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        denied = client.post("/v1/images/generations", json={"prompt": "x"}, headers=headers)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/adapters", headers=headers).status_code == 401
    assert service.calls == []
    assert client.post("/v1/images/generations", json={"prompt": "x", "seed": 3}, headers=ok).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    schema = client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["ImageRequest"]["properties"]
    assert request["steps"]["anyOf"][0]["maximum"] == LIMITS["max_steps"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_serve_config_composes_and_names_bad_keys(capsys):
    from ray.serve.schema import ServeDeploySchema

    from armature.cli import main
    from armature.platform.config import ConfigError, compose

    cfg = compose("serve", ["limits.max_steps=30"])
    assert cfg.limits.max_steps == 30 and cfg.model.family == "tiny"
    for override, named in (
        (["limits.max_stps=3"], "max_stps"),
        (["sampling.num_steps=99"], "sampling.num_steps"),
        (["limits.min_size=12"], "size_multiple"),
        (["ingress_in_generator=true", "generator.autoscaling.max_replicas=2"], "ingress_in_generator"),
    ):
        with pytest.raises(ConfigError, match=named):
            compose("serve", override)
    from armature.serve.app import check_rewards

    with pytest.raises(ConfigError, match="nope"):  # the reward registry is serve's to check
        check_rewards(compose("serve", ["+rewards.nope={}"]))
    assert main(["serve", "--cfg", "+rewards.nope={}"]) == 2 and "unknown ['nope']" in capsys.readouterr().err
    assert main(["serve", "--serve-config", "limits.max_steps=30"]) == 0
    import yaml

    config = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(config)
    assert config["applications"][0]["import_path"] == "armature.serve.app:build_app"
    assert config["applications"][0]["args"] == {"overrides": ["limits.max_steps=30"]}
    # The checked-in Serve config file is what `armature serve --serve-config` writes.
    from pathlib import Path

    from armature.platform.config import config_dir
    from armature.serve.app import serve_config

    shipped = yaml.safe_load((Path(config_dir()) / "ray_serve.yaml").read_text())
    assert shipped == serve_config(compose("serve", []))

    # The Serve application builder takes its `args` as Hydra overrides, mappings included.
    from armature.serve.app import _overrides

    args = {
        "model": "tiny",
        "limits.max_steps": 30,
        "batching.enabled": False,
        "api_key_env": None,
        "sampling.negative_prompt": "ugly, it's blurry",
        "adapters.local": {"mine": "/tmp/my adapter"},
    }
    cfg = compose("serve", [o for k, v in args.items() for o in _overrides(k, v)])
    assert (cfg.limits.max_steps, cfg.batching.enabled, cfg.api_key_env) == (30, False, None)
    assert cfg.sampling.negative_prompt == "ugly, it's blurry" and cfg.adapters.local == {"mine": "/tmp/my adapter"}


def test_deployment_options_from_config(tmp_path):
    from omegaconf import OmegaConf

    from armature.platform.config import compose
    from armature.serve.app import build_application, deployment_options

    cfg = compose(
        "serve",
        [
            "generator.autoscaling.max_replicas=4",
            "generator.num_gpus=1",
            "generator.max_queued_requests=10",
            "api_key_env=null",
            f"tracking.local_dir={tmp_path}",
            f"adapters.cache_dir={tmp_path / 'cache'}",
        ],
    )
    options = deployment_options(OmegaConf.to_container(cfg.generator))
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert options["max_queued_requests"] == 10 and options["max_ongoing_requests"] == 32
    assert options["autoscaling_config"]["min_replicas"] == 1 and options["autoscaling_config"]["max_replicas"] == 4
    app = build_application(cfg)  # binds the deployments with those options; starts nothing
    assert type(app).__name__ == "Application"


def test_direct_ingress_reaches_the_serve_controller_and_the_ingress_replica(tmp_path):
    """``http.direct_ingress`` becomes the environment of the Serve controller (``controller_options``,
    the Serve config file) and of the ingress replica (its runtime_env), under the names Ray reads."""
    import json
    import os
    import subprocess
    import sys

    from ray.serve.schema import ServeDeploySchema

    from armature.platform.config import ConfigError, compose
    from armature.serve.app import build_application, controller_options, ray_serve_env, serve_config

    base = ["api_key_env=null", f"tracking.local_dir={tmp_path}", f"adapters.cache_dir={tmp_path / 'cache'}"]
    off = compose("serve", base)
    assert ray_serve_env(off) == {} and controller_options(off) is None
    assert "controller_options" not in serve_config(off)
    assert "runtime_env" not in build_application(off)._bound_deployment.ray_actor_options
    on = compose("serve", base + ["http.direct_ingress=true", "http.direct_ingress_drain_s=2.5"])
    env = ray_serve_env(on)
    assert controller_options(on) == {"runtime_env": {"env_vars": env}}
    ServeDeploySchema.model_validate(serve_config(on))
    assert serve_config(on)["controller_options"] == {"runtime_env": {"env_vars": env}}
    for layout in ([], ["ingress_in_generator=false"]):  # the ingress replica, wherever the model is
        ingress = build_application(compose("serve", base + ["http.direct_ingress=true"] + layout))._bound_deployment
        assert ingress.name == ("Generator" if not layout else "Ingress")
        assert ingress.ray_actor_options["runtime_env"]["env_vars"]["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Ray Serve reads these names when its processes start: direct ingress on, the drain as set.
    read = (
        "import json; from ray.serve._private import constants as c; "
        "print(json.dumps([c.RAY_SERVE_ENABLE_DIRECT_INGRESS, c.RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", read], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert json.loads(out.stdout) == [True, 2.5], out.stderr
    with pytest.raises(ConfigError, match="http.direct_ingress_drain_s"):
        compose("serve", ["http.direct_ingress_drain_s=-1"])


def test_the_ingress_runs_in_the_generator_only_with_one_generator_replica():
    from omegaconf import OmegaConf

    from armature.platform.config import compose
    from armature.serve.app import ingress_in_generator

    def layout(*overrides):
        return ingress_in_generator(OmegaConf.to_container(compose("serve", list(overrides))))

    assert layout() is True  # the shipped config: one replica
    assert layout("generator.autoscaling.max_replicas=3") is False  # adapter-aware routing needs the ingress
    assert layout("ingress_in_generator=false") is False


def test_a_generator_holding_its_own_queue_refuses_past_max_waiting():
    """With the ingress inside it, a generator bounds its own queue as Serve bounds a separate one."""
    import asyncio

    from armature.serve.app import Generator, Overloaded, Waiting

    generator = Generator.func_or_class.__new__(Generator.func_or_class)  # no model: only the admission
    generator.max_waiting, generator.running = 3, 2
    generator.waiting = [Waiting(None, PassShape(3, 32, 32, 1.0, 1.0), {}, None)]
    with pytest.raises(Overloaded):
        asyncio.run(generator.run({"prompt": "x"}, ""))


def test_generator_groups_the_oldest_request_with_compatible_ones():
    """A group: the oldest waiting request and those of the same adapter and shape, oldest first, at
    most max_batch_size. The free model waits for a group to fill only while requests keep coming."""
    import asyncio

    from armature.serve.app import Generator, Waiting

    shape, other = (PassShape(3, 32, 32, 1.0, 1.0), PassShape(5, 32, 32, 1.0, 1.0))
    adapter = object()
    generator = Generator.func_or_class.__new__(Generator.func_or_class)  # no model: only the grouping
    generator.max_group, generator.max_wait, generator.arrival_gap = 3, 600.0, 600.0

    async def scenario():
        generator.arrived = asyncio.Event()
        future = asyncio.get_running_loop().create_future
        generator.waiting = [
            Waiting(None, shape, {"i": 0}, future()),
            Waiting(adapter, shape, {"i": 1}, future()),
            Waiting(None, other, {"i": 2}, future()),
            Waiting(None, shape, {"i": 3}, future()),
            Waiting(None, shape, {"i": 4}, future()),
            Waiting(None, shape, {"i": 5}, future()),
        ]
        assert [w.request["i"] for w in generator._group()] == [0, 3, 4]
        # A full group does not wait (the gap and the cap are 10 minutes).
        await asyncio.wait_for(generator._gather(), timeout=60)
        # One not full waits for arrivals: a compatible one fills it, then it goes.
        generator.waiting = generator.waiting[1:3]  # the adapter's request, then another shape
        gathering = asyncio.create_task(generator._gather())
        await asyncio.sleep(0)
        assert not gathering.done()
        for i in (6, 7):
            generator.waiting.append(Waiting(adapter, shape, {"i": i}, future()))
            generator.arrived.set()
            await asyncio.sleep(0)
        await asyncio.wait_for(gathering, timeout=60)
        assert [w.request["i"] for w in generator._group()] == [1, 6, 7]
        # No gap allowed: it goes at once with what it has.
        generator.arrival_gap, generator.waiting = 0.0, generator.waiting[1:2]
        await asyncio.wait_for(generator._gather(), timeout=60)
        assert [w.request["i"] for w in generator._group()] == [2]

    asyncio.run(scenario())


def test_a_generation_carries_its_stage_times():
    """Each answer of a group says when it was queued, when its group's pass ran and how many shared
    it (what ``serve_load.py --stages`` joins with the client's own times)."""
    import asyncio

    from armature.serve.app import Generator

    generator = Generator.func_or_class.__new__(Generator.func_or_class)  # no model: a stand-in pass
    generator.max_waiting, generator.running, generator.waiting, generator.runner = None, 0, [], None
    generator.max_group, generator.max_wait, generator.arrival_gap = 4, 0.0, 0.0
    generator.counts = {"groups": 0, "largest_group": 0}
    generator.defaults = {"num_steps": 3, "guidance_scale": 1.0, "negative_prompt": "", "eta": 1.0}
    generator.policy = type("Policy", (), {"image_size": (32, 32)})()
    passes = []

    def stand_in(adapter, shape, requests, count=True):
        passes.append(len(requests))
        start = time.time()
        return [{"images": [r["seed"]], "timing": {"model_start": start, "model_end": time.time()}} for r in requests]

    generator._generate_group = stand_in

    async def scenario():
        generator.arrived = asyncio.Event()
        return await asyncio.gather(*(generator.run({"prompt": "x", "seed": i}, "") for i in range(3)))

    before = time.time()
    outputs = asyncio.run(scenario())
    assert passes == [3] and [o["images"] for o in outputs] == [[0], [1], [2]]
    for o in outputs:
        t = o["timing"]
        assert before <= t["queued"] <= t["model_start"] <= t["model_end"] <= t["ran"] <= time.time()
        assert t["group"] == 3
