"""MLflow tracking: where runs go, how a resumed job finds its run, and what each epoch logs."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["resolve_tracking", "start_run", "RunLogger", "image_grid"]


def resolve_tracking(tracking: dict) -> tuple[str, str | None]:
    """``(tracking_uri, artifact_location)``: a configured URI, or a local store.

    The local default is an SQLite database plus an artifact folder under ``local_dir``,
    both absolute so that Ray workers with another working directory reach them.
    """
    uri = tracking.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    root = Path(tracking.get("local_dir") or "armature_runs").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def start_run(
    tracking: dict,
    run_name: str,
    params: dict[str, str],
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    resumed: bool = False,
) -> str:
    """Create the MLflow run of a job, or reopen ``run_id`` (made at submission, or on resume)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    # A client bound to the URI, not mlflow.set_tracking_uri: that would also set
    # MLFLOW_TRACKING_URI for every process this one starts.
    uri, artifact_location = resolve_tracking(tracking)
    client = MlflowClient(uri)
    name = tracking.get("experiment") or "armature"
    experiment = client.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(name, artifact_location=artifact_location)
    )
    if run_id:
        client.update_run(run_id, status="RUNNING")
        if resumed:
            client.set_tag(run_id, "armature.resumed", "true")
        return run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    # MLflow caps a parameter value at 6000 characters; long lists are still recorded in full
    # in the config artifact.
    items = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile ``[N, H, W, 3]`` uint8 images into one ``[rows*H, cols*W, 3]`` image."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


class RunLogger:
    """Logs one job's metrics, images and artifacts into its MLflow run (rank 0 only)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def last_step(self, key: str = "epoch") -> int:
        """The last step at which ``key`` was logged, or -1."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))
        ]
        self.client.log_batch(self.run_id, metrics=items)

    def log_images(self, images: np.ndarray, artifact_file: str) -> None:
        from PIL import Image

        grid = image_grid(images)
        scale = max(1, 256 // grid.shape[0])
        picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            picture.save(path)
            self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent))

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
