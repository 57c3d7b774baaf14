"""Connecting to Ray: an existing cluster by address, or a local one sized for the job."""

from __future__ import annotations

import logging
import os

__all__ = ["connect", "job_runtime_env"]

log = logging.getLogger(__name__)


def job_runtime_env(extra: dict | None = None) -> dict:
    """The runtime environment of every Armature job's workers."""
    env_vars = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        # Ray Train copies worker prints into its own log stream too; print each line once.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    env: dict = {"env_vars": env_vars}
    for key, value in (extra or {}).items():
        if key == "env_vars":
            env_vars.update(value)
        else:
            env[key] = value
    return env


def connect(cluster: dict, required_cpus: float, runtime_env: dict | None = None) -> bool:
    """Connect this process to Ray; True when it started a local cluster of its own.

    ``cluster.address`` (or ``RAY_ADDRESS``) joins an existing cluster. Otherwise a local
    cluster starts with ``cluster.num_cpus`` CPUs, or at least as many logical CPUs as the
    job's actors ask for: on a laptop the learner and the samplers take turns on the cores.
    """
    import ray

    if ray.is_initialized():
        return False
    env = job_runtime_env(runtime_env)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Inside a job submitted through the Jobs API: the job already carries this runtime
        # environment (`armature submit` puts it there), and Ray refuses a second one.
        env = None
    address = cluster.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
        return False
    num_cpus = cluster.get("num_cpus") or max(os.cpu_count() or 1, int(required_cpus + 0.999))
    # The dashboard serves the state API, which Ray Train's controller polls.
    ray.init(num_cpus=num_cpus, runtime_env=env)
    return True
