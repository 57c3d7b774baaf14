"""A real multi-node Ray cluster on loopback (`ray start --head` + `ray start --address`):
`armature submit train` through the Jobs API, with learners, samplers and reward actors spread
over both nodes, and its MLflow run found from the job's metadata."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this cluster's processes (`ray stop` would stop every Ray on the machine)."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if temp_dir in cmdline and proc.pid != os.getpid():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass


def _state(env: dict, address: str, what: str) -> list[dict]:
    """Ray's state API, queried from a subprocess (see the auth note in the fixture)."""
    code = (
        "import json, sys; from ray.util import state; "
        f"items = state.list_{what}(address={address!r}, detail=True, limit=1000); "
        "print(json.dumps([{'class_name': getattr(i, 'class_name', None), 'node_id': getattr(i, 'node_id', None), "
        "'state': i.state} for i in items]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    temp_dir = str(tmp_path_factory.mktemp("raymn"))
    gcs, dashboard = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Token authentication, as Ray starts local clusters by default. Every client of this
    # cluster runs in a subprocess with RAY_AUTH_MODE=token: this process may already have
    # settled on another auth mode for the session's other cluster.
    env["RAY_AUTH_MODE"] = "token"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    common = ["--num-cpus=3", f"--temp-dir={temp_dir}", "--disable-usage-stats"]

    def own_ports():  # each node's agents on free ports: other Rays on this machine hold the defaults
        return [
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
        ]

    try:
        subprocess.run(
            [
                ray_bin,
                "start",
                "--head",
                f"--port={gcs}",
                "--node-ip-address=127.0.0.1",
                f"--dashboard-port={dashboard}",
                "--dashboard-host=127.0.0.1",
                '--resources={"node_head": 10}',
                *common,
                *own_ports(),
            ],
            env=env,
            check=True,
            timeout=120,
        )
        subprocess.run(
            [
                ray_bin,
                "start",
                f"--address=127.0.0.1:{gcs}",
                "--node-ip-address=127.0.0.1",
                '--resources={"node_b": 10}',
                *common,
                *own_ports(),
            ],
            env=env,
            check=True,
            timeout=120,
        )
        address = f"http://127.0.0.1:{dashboard}"
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": address, "env": env}
    finally:
        _kill_cluster(temp_dir)


def test_submitted_job_spreads_over_two_nodes(multinode, tmp_path):
    env = {**multinode["env"], "RAY_ADDRESS": multinode["dashboard"]}
    deadline = time.time() + 120
    while len([n for n in _state(env, multinode["dashboard"], "nodes") if n["state"] == "ALIVE"]) < 2:
        assert time.time() < deadline, "the second node did not join"
        time.sleep(2)

    overrides = [
        "model=tiny",
        "reward=compressibility",
        "prompts.file=null",
        "algo.learning_rate=1e-3",
        "algo.num_epochs=2",
        "algo.samples_per_epoch=8",
        "algo.train_batch_size=4",
        "algo.stat_min_count=4",
        "algo.stat_buffer_size=8",
        "sampling.num_steps=2",
        "sampling.batch_size=2",
        "trainer.num_workers=2",
        "trainer.placement_strategy=SPREAD",
        "trainer.cpus_per_worker=0.5",
        "cluster.num_samplers=2",
        "cluster.sampler_num_cpus=0.5",
        "cluster.actor_scheduling=SPREAD",
        "reward.num_actors=2",
        "reward.num_cpus=0.25",
        f"trainer.storage_path={tmp_path / 'ray'}",
        f"tracking.local_dir={tmp_path / 'track'}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "armature.cli", "submit", "train", *overrides, "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "submission_id" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    submitted = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    sid = submitted["submission_id"]
    logs = subprocess.run(
        [sys.executable, "-m", "armature.cli", "jobs", "logs", sid], env=env, capture_output=True, text=True
    ).stdout
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + logs[-5000:]
    assert "epoch 2/2" in logs

    # `armature jobs` finds it; its metadata leads to a finished MLflow run, tagged back.
    listed = subprocess.run(
        [sys.executable, "-m", "armature.cli", "jobs", "list"], env=env, capture_output=True, text=True
    ).stdout
    assert sid in listed and "SUCCEEDED" in listed
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "armature.cli", "jobs", "status", sid], env=env, capture_output=True, text=True
        ).stdout
    )
    meta = status["metadata"]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(meta["mlflow_tracking_uri"]).get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.submission_id"] == sid
    assert run.data.metrics["samples"] == 8

    # Learners, samplers and reward actors each ran on both nodes.
    actors = _state(env, multinode["dashboard"], "actors")
    for cls in ("RayTrainWorker", "PolicySampler", "RewardScorer"):
        where = {a["node_id"] for a in actors if a["class_name"] == cls}
        assert len(where) == 2, (cls, where)
