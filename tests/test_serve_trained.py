"""End to end: `armature train` registers its adapter, and the generator serves it by name."""

import base64
import io
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

pytestmark = pytest.mark.slow


def test_trained_adapter_is_served_by_name(ray_cluster, tmp_path):
    from ray import serve

    from armature.platform.config import compose
    from armature.platform.registry import resolve_adapter
    from armature.platform.tracking import resolve_tracking
    from armature.policies import build_policy
    from armature.serve.app import build_application
    from armature.serve.generation import ImageJob, PassShape, generate

    # 1. A short DDPO job (the tiny model: a full fine-tune, saved as unet.safetensors).
    track = tmp_path / "track"
    command = [
        sys.executable,
        "-m",
        "armature.cli",
        "train",
        "model=tiny",
        "reward=compressibility",
        "prompts.file=null",
        "algo.num_epochs=1",
        "algo.samples_per_epoch=8",
        "algo.train_batch_size=4",
        "algo.stat_min_count=2",
        "sampling.num_steps=3",
        "sampling.batch_size=4",
        "cluster.sampler_num_cpus=0.5",
        "reward.num_cpus=0.25",
        "algo.learning_rate=0.01",
        "algo.final_eval_per_prompt=2",
        f"trainer.storage_path={tmp_path / 'ray'}",
        f"tracking.local_dir={track}",
        "tracking.run_name=serve-e2e",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "adapter registered as armature-adapter/1" in done.stdout
    assert "[armature] fixed seeds (4 prompts x 2), before -> after training: reward" in done.stdout

    # 2. The generator, on the same tracking store, serves it as `armature-adapter`.
    cfg = compose(
        "serve",
        [
            f"tracking.local_dir={track}",
            f"adapters.cache_dir={tmp_path / 'cache'}",
            "generator.torch_threads=1",
            "batching.pass_size=2",
            "sampling.num_steps=4",
            "api_key_env=null",
        ],
    )
    serve.start(http_options={"host": "127.0.0.1", "port": 8791})
    serve.run(build_application(cfg), name="trained", route_prefix="/")
    try:
        body = {"prompt": "a cat", "seed": 3}
        with httpx.Client(base_url="http://127.0.0.1:8791", timeout=60) as client:
            base = client.post("/v1/images/generations", json=body)
            tuned = client.post("/v1/images/generations", json={**body, "adapter": "armature-adapter"})
            listed = client.get("/v1/adapters").json()["data"]
    finally:
        serve.shutdown()
    assert base.status_code == 200 and tuned.status_code == 200, tuned.text
    assert tuned.json()["adapter_version"] == "armature-adapter/1"
    assert [a["id"] for a in listed] == ["armature-adapter/1", "armature-adapter"]

    def decode(response):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        policy = build_policy({"family": "tiny", "lora": {"enabled": False}}, {"num_steps": 4})
        policy.unet.requires_grad_(False)
        uri, _ = resolve_tracking({"local_dir": str(track)})
        policy.load_adapter(resolve_adapter(uri, "armature-adapter", tmp_path / "local"))
        shape = PassShape(steps=4, height=32, width=32, guidance_scale=1.0, eta=1.0)
        expected = generate(policy, [ImageJob("a cat", "", 3)], shape, pass_size=2)[0]
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(decode(tuned), expected)
    assert not np.array_equal(decode(tuned), decode(base))

    # 3. The job's fixed-seed evaluation, recomputed here from the base and the registered weights
    from armature.jobs.ddpo import fixed_seed_plan
    from armature.rewards.registry import load as load_reward

    info = json.loads((tmp_path / "ray" / "serve-e2e" / "armature_run.json").read_text())
    logged = MlflowClient(info["tracking_uri"]).get_run(info["mlflow_run_id"]).data.metrics
    plan, seeds = fixed_seed_plan(["a cat", "a dog", "a horse", "a rabbit"], 2, seed=0)
    assert len(set(seeds)) == 8 and fixed_seed_plan(["a cat"], 2, seed=0)[1] == seeds[:2]
    reward = load_reward("compressibility")
    torch.set_num_threads(1)
    try:
        for name, trained in (("before", False), ("after", True)):
            policy = build_policy(
                {"family": "tiny", "lora": {"enabled": False}}, {"num_steps": 3, "guidance_scale": 1.0, "eta": 1.0}
            )
            if trained:
                policy.load_adapter(resolve_adapter(uri, "armature-adapter", tmp_path / "local"))
            with torch.no_grad():
                images = policy.rollout(plan, [torch.Generator().manual_seed(s) for s in seeds]).images
            expected = reward([Image.fromarray(a) for a in images], plan).mean()
            # JPEG kB: 5e-4 is 4 bytes over the 8 images (a sampler actor's thread count can round a
            # pixel differently); before and after training differ by 3.6e-3 here
            assert logged[f"final_{name}_reward_mean"] == pytest.approx(float(expected), abs=5e-4), name
    finally:
        torch.set_num_threads(threads)
    assert logged["final_samples"] == 8
    assert abs(logged["final_after_reward_mean"] - logged["final_before_reward_mean"]) > 2e-3
