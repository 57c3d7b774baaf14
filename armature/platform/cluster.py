"""Connecting to Ray: an existing cluster by address, or a local one sized for the job."""

from __future__ import annotations

import logging
import os

__all__ = ["connect"]

log = logging.getLogger(__name__)


def connect(cluster: dict, required_cpus: float, runtime_env: dict | None = None) -> bool:
    """Connect this process to Ray; True when it started a local cluster of its own.

    ``cluster.address`` (or ``RAY_ADDRESS``) joins an existing cluster. Otherwise a local
    cluster starts with ``cluster.num_cpus`` CPUs, or at least as many logical CPUs as the
    job's actors ask for: on a laptop the learner and the samplers take turns on the cores.
    """
    import ray

    if ray.is_initialized():
        return False
    env_vars = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        # Ray Train copies worker prints into its own log stream too; print each line once.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    env = {"env_vars": env_vars}
    for key, value in (runtime_env or {}).items():
        env[key] = value
    address = cluster.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
        return False
    num_cpus = cluster.get("num_cpus") or max(os.cpu_count() or 1, int(required_cpus + 0.999))
    # The dashboard serves the state API, which Ray Train's controller polls.
    ray.init(num_cpus=num_cpus, runtime_env=env)
    return True
