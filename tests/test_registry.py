"""The algorithm registry: `armature train algo=<name>` runs whatever declared itself, the CLI and
the config composition read nothing else, and a learner kept outside the package (the toy
learner of tests/toy_learner.py) runs through `armature train` on the learner core."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from armature.platform.config import ConfigError, compose

TESTS = Path(__file__).resolve().parent
SEARCHPATH = f"hydra.searchpath=[file://{TESTS / 'toy_configs'}]"
# every algorithm `armature train` ran before the registry (cli.JOBS), by the module that runs it
SHIPPED = {
    "ddpo": "ddpo",
    "dpo": "dpo",
    "asap_dpo": "dpo",
    "grpo": "grpo",
    "nft": "nft",
    "alignprop": "alignprop",
    "draft": "alignprop",
    "refl": "alignprop",
    "online_dpo": "online_dpo",
    "eval": "evaluate",
    "bon": "bon",
    "hps_prefix": "hps_prefix",
    "skeleguide": "skeleguide",
    "reward_model": "reward_model",
    "reward_eval": "reward_eval",
}


def test_every_shipped_algorithm_is_registered_by_its_own_file():
    from armature.platform.algorithms import get, names
    from armature.platform.config import config_dir

    assert set(SHIPPED) <= set(names())
    for name, module in SHIPPED.items():
        algorithm = get(name)
        assert algorithm.name == name and algorithm.run.__module__ == f"armature.jobs.{module}", name
        assert algorithm.schema.__module__ == f"armature.jobs.{module}", name  # its schema lives with it
        assert (config_dir() / "algo" / f"{name}.yaml").is_file(), name


def test_learner_schemas_share_one_optimizer_schema():
    from armature.platform.algorithms import get
    from armature.platform.config import OptimizerConfig

    learners = ["ddpo", "dpo", "grpo", "nft", "alignprop", "hps_prefix", "online_dpo", "skeleguide"]
    assert all(issubclass(get(name).schema, OptimizerConfig) for name in learners)
    cfg = compose("train", ["algo=grpo", "+algo.adam_beta2=0.99"])  # a schema key its yaml leaves out
    assert cfg.algo.adam_beta2 == 0.99 and cfg.algo.adam_weight_decay == OptimizerConfig.adam_weight_decay


def test_unknown_algorithm_names_the_choices():
    with pytest.raises(ConfigError, match=r"algo.name='nope': choose one of \[.*'ddpo'.*\]"):
        compose("train", ["algo.name=nope"])


def test_a_registered_toy_learner_is_composed_and_checked_by_its_own_schema():
    import toy_learner  # noqa: F401  (registers `toy`)

    cfg = compose("train", [SEARCHPATH, "algo=toy", "model=tiny"])
    assert cfg.algo.name == "toy" and cfg.algo.steps_per_epoch == 4 and cfg.algo.adam_epsilon == 1e-8
    with pytest.raises(ConfigError, match="algo.steps_per_epoch=0: must be >= 1"):
        compose("train", [SEARCHPATH, "algo=toy", "algo.steps_per_epoch=0"])
    with pytest.raises(ConfigError, match="algo.clip_range"):  # not a key of its schema
        compose("train", [SEARCHPATH, "algo=toy", "+algo.clip_range=0.1"])


@pytest.mark.slow
def test_toy_learner_runs_through_armature_train(ray_cluster, tmp_path):
    """Ray Train + DeepSpeed through the learner core: the loss it logs falls, epoch after epoch."""
    path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        "-m",
        "armature.cli",
        "train",
        SEARCHPATH,
        "algo=toy",
        "model=tiny",
        "reward=brightness",
        "sampling.guidance_scale=1.0",
        "cluster.torch_threads=1",
        f"+cluster.runtime_env.env_vars={{PYTHONPATH:'{path}'}}",  # the workers import it too
        f"trainer.storage_path={tmp_path / 'ray'}",
        f"tracking.local_dir={tmp_path / 'track'}",
        "tracking.run_name=toy",
        "tracking.registered_model=null",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "ARMATURE_ALGORITHMS": "toy_learner", "PYTHONPATH": path}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "[armature] done: epoch 3, toy loss" in done.stdout
    from mlflow.tracking import MlflowClient

    info = json.loads((tmp_path / "ray" / "toy" / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    losses = [m.value for m in sorted(client.get_metric_history(info["mlflow_run_id"], "loss"), key=lambda m: m.step)]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]
    artifacts = {a.path for a in client.list_artifacts(info["mlflow_run_id"])}
    assert {"adapter", "config.json"} <= artifacts
    # the typed config goes out as plain JSON: config.json, the MLflow params, the adapter's metadata
    run_dir = Path(client.download_artifacts(info["mlflow_run_id"], "", str(tmp_path / "dl")))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["algo"]["name"] == "toy" and config["model"]["family"] == "tiny"
    assert client.get_run(info["mlflow_run_id"]).data.params["algo.name"] == "toy"
    metadata = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert metadata["model"]["lora"]["enabled"] is False and metadata["sampling"]["guidance_scale"] == 1.0


def test_a_name_taken_by_another_learner_is_refused():
    from armature.platform.algorithms import Algorithm, get, register

    ddpo = get("ddpo")
    register(Algorithm("ddpo", ddpo.schema, ddpo.run))  # the same file loaded again: kept, no error
    assert get("ddpo") is ddpo
    with pytest.raises(ValueError, match="'ddpo' is already registered by armature.jobs.ddpo"):
        register(Algorithm("ddpo", ddpo.schema, lambda cfg: {}))
