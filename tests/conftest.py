import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every test names its own MLflow store; one from the environment would override them.
os.environ.pop("MLFLOW_TRACKING_URI", None)

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
