"""A training job survives a killed learner worker and a killed reward actor: it resumes from
its last checkpoint, retries the rollouts in flight, and logs every epoch once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

EPOCHS = 4


def _alive(address, cls):
    from ray.util.state import list_actors

    return list_actors(address=address, filters=[("class_name", "=", cls), ("state", "=", "ALIVE")], detail=True)


def _registered(snapshot):
    try:
        return [r["metrics"]["epoch"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def test_worker_and_reward_actor_killed_mid_run(ray_cluster, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1"}
    cmd = [
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
        "algo.stat_min_count=4",
        "algo.stat_buffer_size=8",
        "sampling.num_steps=3",
        "sampling.batch_size=2",
        "trainer.num_workers=2",
        "trainer.max_failures=3",
        "trainer.cpus_per_worker=1",
        "cluster.sampler_num_cpus=0.5",
        "reward.num_cpus=0.25",
        "cluster.max_restarts=3",
        f"trainer.storage_path={tmp_path / 'ray'}",
        f"tracking.local_dir={tmp_path / 'track'}",
        "tracking.run_name=ft",
    ]
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    snapshot = tmp_path / "ray" / "ft" / "checkpoint_manager_snapshot.json"
    try:
        # The reward actor dies while the first epoch's rollouts are being scored.
        deadline = time.time() + 300
        while time.time() < deadline and not _alive(ray_cluster, "RewardScorer"):
            time.sleep(0.5)
        while time.time() < deadline and not _alive(ray_cluster, "RayTrainWorker"):
            time.sleep(0.5)
        time.sleep(3)
        (scorer,) = _alive(ray_cluster, "RewardScorer")
        os.kill(scorer.pid, signal.SIGKILL)
        # A learner worker dies after the first checkpoint.
        while time.time() < deadline and not _registered(snapshot):
            assert proc.poll() is None, (tmp_path / "job.log").read_text()[-4000:]
            time.sleep(0.2)
        worker = _alive(ray_cluster, "RayTrainWorker")[0]
        os.kill(worker.pid, signal.SIGKILL)
        assert proc.wait(timeout=900) == 0, (tmp_path / "job.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "job.log").read_text()
    assert "resumed from the checkpoint of epoch" in text

    from mlflow.tracking import MlflowClient

    info = json.loads((tmp_path / "ray" / "ft" / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    run_id = info["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "epoch"))
    assert steps == list(range(EPOCHS)), steps  # no epoch missing, none twice
    samples = [m.value for m in client.get_metric_history(run_id, "samples")]
    assert samples == [16.0] * EPOCHS  # no rollout lost to the dead reward actor
    assert len(_registered(snapshot)) >= 1
