"""Submitting Armature jobs to a Ray cluster through the Ray Jobs API.

``armature submit train algo.num_epochs=50`` composes the job's config here (so a bad config
fails before anything reaches the cluster), opens its MLflow run, and submits
``armature train ... tracking.run_id=<id>`` as a Ray job whose metadata carries the MLflow run
id and tracking URI: a platform team can go from a Ray job to its run, and back (the run is
tagged with the Ray submission id).
"""

from __future__ import annotations

import os
import shlex
import time
import uuid

__all__ = ["SUBMITTABLE", "client", "submit", "wait"]

# Jobs that `armature submit` can send: the config each composes.
SUBMITTABLE = {"train": "train"}

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: explicit, else RAY_ADDRESS, else the local default."""
    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if "://" not in address:
        address = f"http://{address}"
    return address


def client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_address(address))


def submit(
    job: str,
    overrides: list[str],
    *,
    address: str | None = None,
    working_dir: str | None = None,
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
) -> dict:
    """Submit ``armature <job> <overrides>``; returns the submission id and the MLflow run."""
    from armature.platform.cluster import job_runtime_env
    from armature.platform.config import compose, flatten
    from armature.platform.tracking import resolve_tracking, start_run

    if job not in SUBMITTABLE:
        raise ValueError(f"unknown job {job!r}: armature submit takes one of {sorted(SUBMITTABLE)}")
    cfg = compose(SUBMITTABLE[job], overrides)
    tracking = dict(cfg.tracking)
    submission_id = submission_id or f"armature-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_name = tracking.get("run_name") or submission_id
    tracking_uri, _ = resolve_tracking(tracking)
    run_id = tracking.get("run_id") or start_run(
        tracking,
        run_name,
        flatten(cfg),
        tags={"armature.job": job, "ray.submission_id": submission_id},
    )
    # The entrypoint names the run explicitly, so the cluster logs into the same store.
    args = [
        *overrides,
        f"tracking.run_name={run_name}",
        f"tracking.run_id={run_id}",
        f"tracking.tracking_uri={tracking_uri}",
    ]
    entrypoint = shlex.join(["armature", job, *args])
    runtime_env = job_runtime_env({**dict(cfg.cluster.runtime_env), "env_vars": dict(env or {})})
    if working_dir:
        runtime_env["working_dir"] = working_dir
    metadata = {
        "armature_job": job,
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": tracking_uri,
        "run_name": run_name,
    }
    jobs = client(address)
    deadline = time.time() + 120
    while True:
        try:
            jobs.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env, metadata=metadata
            )
            break
        except RuntimeError as err:  # a cluster that just started has no job agent yet
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)
    return {"submission_id": submission_id, "entrypoint": entrypoint, **metadata}


def wait(submission_id: str, address: str | None = None, timeout_s: float = 3600, poll_s: float = 2.0) -> str:
    """Block until the job reaches a terminal state; returns it."""
    jobs = client(address)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = str(jobs.get_job_status(submission_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"job {submission_id} still running after {timeout_s:.0f} s")
