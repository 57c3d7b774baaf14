"""End to end: `armature train` registers its adapter, and the generator serves it by name."""

import base64
import io
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
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
        sys.executable, "-m", "armature.cli", "train", "model=tiny", "reward=compressibility",
        "prompts.file=null", "algo.num_epochs=1", "algo.samples_per_epoch=8",
        "algo.train_batch_size=4", "algo.stat_min_count=2", "sampling.num_steps=3", "sampling.batch_size=4",
        "cluster.sampler_num_cpus=0.5", "reward.num_cpus=0.25", "algo.learning_rate=0.01",
        f"trainer.storage_path={tmp_path / 'ray'}", f"tracking.local_dir={track}", "tracking.run_name=serve-e2e",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "adapter registered as armature-adapter/1" in done.stdout

    # 2. The generator, on the same tracking store, serves it as `armature-adapter`.
    cfg = compose("serve", [f"tracking.local_dir={track}", f"adapters.cache_dir={tmp_path / 'cache'}",
                            "generator.torch_threads=1", "batching.pass_size=2", "sampling.num_steps=4",
                            "api_key_env=null"])
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
