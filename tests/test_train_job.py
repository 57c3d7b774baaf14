"""End to end: `armature train` on a real Ray cluster with Ray Train + DeepSpeed (2 workers,
ZeRO-2), tracked in MLflow; killed after a checkpoint, rerun, resumed from that checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EPOCHS = 3


def _command(tmp: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "armature.cli",
        "train",
        "model=tiny",
        "reward=compressibility",
        "prompts.file=null",
        "algo.learning_rate=1e-3",
        f"algo.num_epochs={EPOCHS}",
        "algo.samples_per_epoch=16",
        "algo.train_batch_size=4",
        "algo.gradient_accumulation_batches=2",
        "algo.stat_min_count=4",
        "algo.stat_buffer_size=8",
        "sampling.num_steps=3",
        "sampling.batch_size=4",
        "trainer.num_workers=2",
        "trainer.zero_stage=2",
        "trainer.cpus_per_worker=1",
        "cluster.num_samplers=2",
        "cluster.sampler_num_cpus=0.5",
        "reward.num_cpus=0.25",
        # a monitor and the over-optimisation guard, patient enough never to stop this run: its
        # state and best weights ride in the checkpoints through the kill and the resume
        "+reward.components.brightness={weight: 0.0}",
        "guard.monitor=brightness",
        "guard.patience=100",
        "model.lora.enabled=true",
        "model.lora.rank=2",
        f"trainer.storage_path={tmp / 'ray'}",
        f"tracking.local_dir={tmp / 'track'}",
        "tracking.run_name=e2e",
        "tracking.images_per_grid=4",
    ]


def _registered_epochs(snapshot: Path) -> list[int]:
    import json

    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []
    return [r["metrics"]["epoch"] for r in results]


def test_train_killed_after_checkpoint_resumes(ray_cluster, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "ray" / "e2e"

    # 1. Start the job; kill it (driver and its Ray job) once the first checkpoint is persisted.
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(_command(tmp_path), env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if _registered_epochs(snapshot):  # Ray Train has registered a checkpoint
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it was killed: " + (tmp_path / "run1.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    registered = _registered_epochs(snapshot)
    assert registered and max(registered) < EPOCHS - 1, registered

    # 2. The same command again resumes from the last checkpoint and finishes.
    done = subprocess.run(_command(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "resumed from the checkpoint of epoch" in out, out[-5000:]
    resumed_epoch = int(out.split("resumed from the checkpoint of epoch ")[1].split()[0])
    assert resumed_epoch == max(registered)
    assert f"epoch {resumed_epoch + 1}/{EPOCHS} " not in out  # that epoch was not trained again
    assert f"epoch {EPOCHS}/{EPOCHS} " in out

    # 3. One MLflow run holds every epoch exactly once, the images and the adapter.
    import json

    from mlflow.tracking import MlflowClient

    info = json.loads((run_dir / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("armature.resumed") == "true"
    assert run.data.params["algo.clip_range"] == "0.05"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch"))
    assert steps == list(range(EPOCHS)), steps
    for key in (
        "reward_mean",
        "reward_std",
        "loss",
        "approx_kl",
        "clipfrac",
        "learning_rate",
        "grad_norm",
        "samples_per_s",
    ):
        assert len(client.get_metric_history(run.info.run_id, key)) == EPOCHS, key
    # The first inner update starts on-policy: the learner recomputes the samplers' log-probs.
    assert client.get_metric_history(run.info.run_id, "approx_kl")[0].value < 1e-2
    # In step (trainer.rollout_ahead=0, the default): every epoch sampled with its own weights.
    assert [m.value for m in client.get_metric_history(run.info.run_id, "staleness")] == [0] * EPOCHS
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "samples", "config.json"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    images = client.list_artifacts(run.info.run_id, "samples")
    assert len(images) == EPOCHS
    # The guard's best epoch is the monitor's first maximum (the logged metric, computed apart);
    # the run ended rolled back to it unless it was the last epoch; the curve was drawn.
    monitor = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "reward_brightness_mean"), key=lambda m: m.step)
    ]
    best = [
        m.value for m in sorted(client.get_metric_history(run.info.run_id, "guard_best_epoch"), key=lambda m: m.step)
    ]
    assert len(monitor) == len(best) == EPOCHS
    assert best[-1] == max(range(EPOCHS), key=lambda e: (monitor[e], -e))
    rolled = client.get_metric_history(run.info.run_id, "guard_rolled_back_to")
    assert [m.value for m in rolled] == ([] if best[-1] == EPOCHS - 1 else [best[-1]])
    assert "overoptimisation" in artifacts

    # The adapter was registered under the default name, and loads into a fresh policy.
    from armature.platform.registry import list_adapters, resolve_adapter
    from armature.policies import build_policy

    registered = list_adapters(info["tracking_uri"])
    assert [(a["name"], a["run_id"]) for a in registered] == [("armature-adapter", run.info.run_id)]
    local = resolve_adapter(info["tracking_uri"], "armature-adapter", tmp_path / "dl")
    policy = build_policy({"family": "tiny", "lora": {"enabled": False}}, {"num_steps": 3})
    policy.unet.requires_grad_(False)
    policy.load_adapter(local)
    assert policy.lora.rank == 2
