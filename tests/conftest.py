import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default, and a worker's `ray.train.report`
# waits for that poll: every epoch of a tiny test job idled up to 2 s. Its preemption watcher (one
# more actor process per job, for cluster node drains) has nothing to watch on a local cluster.
# The `armature train` subprocesses inherit both; Ray Train hands them on to its controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Every test names its own MLflow store; one from the environment would override them.
os.environ.pop("MLFLOW_TRACKING_URI", None)

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session; yields its address.

    It declares 4 logical CPUs on the 2 cores of CI: the jobs' learner, sampler and reward
    actors take turns rather than run at once.
    """
    import ray

    ray.init(num_cpus=4, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


class TrainRun:
    """A finished `armature train` job: its output, and its MLflow run's metrics by step."""

    def __init__(self, out: str, run_dir: Path):
        from mlflow.tracking import MlflowClient

        self.out = out
        info = json.loads((run_dir / "armature_run.json").read_text())
        self.client = MlflowClient(info["tracking_uri"])
        self.run_id = info["mlflow_run_id"]

    def history(self, key: str) -> list[float]:
        return [m.value for m in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)]


def train_command(tmp: Path, name: str, *overrides: str) -> list[str]:
    """`armature train` with the overrides, its checkpoints and MLflow store under tmp, run `name`."""
    return [
        sys.executable,
        "-m",
        "armature.cli",
        "train",
        *overrides,
        f"trainer.storage_path={tmp / 'ray'}",
        f"tracking.local_dir={tmp / 'track'}",
        f"tracking.run_name={name}",
    ]


class TrainJobs:
    """Runs `armature train` on the session's cluster: ``train_job(tmp, "name", "algo=grpo", ...)``
    runs one to the end, asserts it succeeded and returns its TrainRun; ``train_job.start(...)``
    (same arguments) starts one and returns the function that waits for it, so that two jobs run
    at once when the cluster's 4 logical CPUs hold both."""

    def __init__(self, address: str):
        self.env = {**os.environ, "RAY_ADDRESS": address, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.started: list[subprocess.Popen] = []

    def kill_leftovers(self) -> None:
        """Kills the jobs nobody waited for (a test failed before it did)."""
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def start(self, tmp: Path, name: str, *overrides: str, timeout: int = 900):
        tmp.mkdir(parents=True, exist_ok=True)
        log = open(tmp / f"{name}.log", "w+")
        proc = subprocess.Popen(
            train_command(tmp, name, *overrides), env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.started.append(proc)

        def wait() -> TrainRun:
            try:
                returncode = proc.wait(timeout=timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.seek(0)
                out = log.read()
                log.close()
            assert returncode == 0, out[-5000:]
            return TrainRun(out, tmp / "ray" / name)

        return wait

    def __call__(self, tmp: Path, name: str, *overrides: str, timeout: int = 900) -> TrainRun:
        return self.start(tmp, name, *overrides, timeout=timeout)()


@pytest.fixture(scope="session")
def train_job(ray_cluster):
    """A TrainJobs on the session's cluster."""
    jobs = TrainJobs(ray_cluster)
    yield jobs
    jobs.kill_leftovers()
