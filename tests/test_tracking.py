"""MLflow tracking and the adapter registry, on a real local MLflow store."""

import numpy as np
import pytest
import torch

from armature.platform.registry import list_adapters, register_adapter, resolve_adapter
from armature.platform.tracking import RunLogger, image_grid, resolve_tracking, start_run
from armature.policies import build_policy

SAMPLING = {"num_steps": 2, "guidance_scale": 1.0}


def test_image_grid_places_each_image():
    images = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(5)])
    grid = image_grid(images, columns=2)
    assert grid.shape == (6, 6, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        assert (grid[2 * r : 2 * r + 2, 3 * c : 3 * c + 3] == i).all()
    assert (grid[4:, 3:] == 0).all()  # the empty sixth cell


def test_local_store_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts = resolve_tracking({"local_dir": "runs"})
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "runs" / "artifacts").as_uri()
    assert resolve_tracking({"tracking_uri": "http://mlflow:5000"}) == ("http://mlflow:5000", None)


def test_run_resume_logging_and_registered_adapter(tmp_path):
    tracking = {"local_dir": str(tmp_path / "track"), "experiment": "t"}
    uri, _ = resolve_tracking(tracking)
    run_id = start_run(tracking, "r", {"algo.lr": "0.1"})
    assert start_run(tracking, "r", {}, run_id=run_id) == run_id  # a resume reopens the run
    logger = RunLogger(uri, run_id)
    assert logger.last_step() == -1
    logger.log_metrics({"epoch": 0, "reward": 1.5, "bad": float("nan")}, step=0)
    logger.log_metrics({"epoch": 1, "reward": 2.5}, step=1)
    assert logger.last_step() == 1
    logger.log_images(np.zeros((4, 8, 8, 3), np.uint8), "samples/epoch_0000.png")

    # A trained adapter, logged and registered, resolves by name, version and alias.
    policy = build_policy({"family": "tiny", "lora": {"enabled": True, "rank": 2}}, SAMPLING)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1)
    policy.save_adapter(tmp_path / "adapter")
    logger.log_artifacts(tmp_path / "adapter", "adapter")
    logger.finish()
    assert register_adapter(uri, run_id, "tiny-adapter") == 1
    assert register_adapter(uri, run_id, "tiny-adapter") == 2
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_registered_model_alias("tiny-adapter", "prod", "1")
    assert [(a["name"], a["version"]) for a in list_adapters(uri)] == [("tiny-adapter", 1), ("tiny-adapter", 2)]
    for reference in ("tiny-adapter", "tiny-adapter/1", "tiny-adapter@prod"):
        folder = resolve_adapter(uri, reference, tmp_path / "cache")
        fresh = build_policy({"family": "tiny", "lora": {"enabled": False}}, SAMPLING)
        fresh.unet.requires_grad_(False)
        fresh.load_adapter(folder)
        for name, value in policy.trainable_state_dict().items():
            torch.testing.assert_close(dict(fresh.unet.named_parameters())[name], value)
    with pytest.raises(KeyError, match="no-such"):
        resolve_adapter(uri, "no-such", tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        resolve_adapter(None, "no-such", tmp_path / "cache")


def test_storage_paths_and_run_file(tmp_path, monkeypatch):
    from armature.platform.storage import normalize_storage_path, read_json, write_json

    monkeypatch.chdir(tmp_path)
    assert normalize_storage_path("s3://bucket/armature/ray") == "s3://bucket/armature/ray"
    assert normalize_storage_path("runs/ray") == str(tmp_path / "runs" / "ray")
    path = normalize_storage_path("runs/ray") + "/job/armature_run.json"
    assert read_json(path) is None
    write_json(path, {"mlflow_run_id": "abc"})
    assert read_json(path) == {"mlflow_run_id": "abc"}
    assert read_json("file://" + path) == {"mlflow_run_id": "abc"}
