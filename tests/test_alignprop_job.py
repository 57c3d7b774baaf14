"""The reward-gradient learner as a job: it refuses a reward it cannot backpropagate, and a short
AlignProp run on the tiny model raises a differentiable reward (end to end, Ray Train + DeepSpeed)."""

import json
import os
import subprocess
import sys

import pytest

from armature.platform.config import ConfigError, compose


def test_a_non_differentiable_reward_is_refused_before_ray_starts():
    from armature.jobs import alignprop

    cfg = compose("train", ["algo=refl", "reward=compressibility"])
    with pytest.raises(ValueError, match=r"^reward.components: algo=refl backpropagates.*reward=brightness"):
        alignprop.run(cfg)


def test_truncation_bounds_are_checked_at_composition():
    with pytest.raises(ConfigError, match=r"algo.truncation_min=4, algo.truncation_max=2"):
        compose("train", ["algo=alignprop", "reward=brightness", "algo.truncation_min=4", "algo.truncation_max=2"])
    with pytest.raises(ConfigError, match=r"algo.truncation_max"):
        compose(
            "train",
            [
                "algo=draft",
                "reward=brightness",
                "sampling.num_steps=4",
                "algo.truncation_max=5",
                "algo.truncation_min=5",
            ],
        )
    with pytest.raises(ConfigError, match=r"algo.beta=-1.0: the KL penalty's weight must be >= 0"):
        compose("train", ["algo=alignprop", "reward=brightness", "algo.beta=-1.0"])


@pytest.mark.slow
def test_alignprop_raises_brightness(ray_cluster, tmp_path):
    epochs = 5
    command = [
        sys.executable,
        "-m",
        "armature.cli",
        "train",
        "algo=alignprop",
        "reward=brightness",
        "model=tiny_lora",
        f"algo.num_epochs={epochs}",
        "algo.batches_per_epoch=3",
        "algo.batch_size=4",
        "algo.learning_rate=3e-3",
        "algo.truncation_min=1",
        "algo.truncation_max=10",
        "trainer.num_workers=1",
        "trainer.cpus_per_worker=1",
        f"trainer.storage_path={tmp_path / 'ray'}",
        f"tracking.local_dir={tmp_path / 'track'}",
        "tracking.run_name=alignprop",
        "tracking.registered_model=null",
        "cluster.torch_threads=1",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]

    from mlflow.tracking import MlflowClient

    info = json.loads((tmp_path / "ray" / "alignprop" / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    history = sorted(client.get_metric_history(info["mlflow_run_id"], "reward_mean"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(epochs))
    first, last = history[0].value, history[-1].value
    stds = client.get_metric_history(info["mlflow_run_id"], "reward_std")
    # 12 images an epoch: the standard error of a mean is std / sqrt(12); ask for far more
    assert last - first > 5 * max(m.value for m in stds) / 12**0.5, (first, last)
    assert client.list_artifacts(info["mlflow_run_id"], "adapter")
