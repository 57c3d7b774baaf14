"""What every training job's driver does around its Ray Train loop.

A learner job (``armature/jobs/*.py``) reads as: ``open_run`` (connect to Ray, open or reopen the
MLflow run, remember it in the run folder), start whatever actors or datasets it needs, build a
``TorchTrainer`` with ``trainer_kwargs(run)``, then ``fit(trainer, run)`` (fit, close the MLflow
run, register the adapter). A rerun with the same ``tracking.run_name`` finds the run file and
keeps logging into the same MLflow run, while Ray Train resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from omegaconf import DictConfig, OmegaConf

from armature.platform.config import TrainConfig

RUN_FILE = "armature_run.json"  # {"mlflow_run_id", "tracking_uri"} in <storage>/<run name>/


@dataclass
class JobRun:
    """A job's resolved config and where it lives."""

    cfg: TrainConfig  # the whole config as typed objects (``cfg.algo``: the algorithm's schema)
    algo: str
    name: str  # tracking.run_name, or <algo>-<time>
    storage: str  # Ray Train's storage path (a folder or a URI)
    run_dir: str  # <storage>/<name>
    run_id: str  # the MLflow run
    tracking_uri: str
    threads: int | None  # torch threads for the job's processes (None: leave torch's default)
    local: bool  # a Ray started here (not a remote cluster)


def open_run(cfg: DictConfig, required_cpus: float, job: str = "train") -> JobRun:
    """Connect to Ray (starting a local one sized for ``required_cpus`` if no cluster is
    configured) and open the job's MLflow run, reopening it when the run folder says so."""
    from armature.platform.cluster import connect
    from armature.platform.config import flatten
    from armature.platform.storage import normalize_storage_path, read_json, write_json
    from armature.platform.tracking import resolve_tracking, start_run

    c = typed(cfg)
    algo, trainer, cluster, tracking = c.algo.name, c.trainer, c.cluster, c.tracking
    name = tracking.run_name or f"{algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = normalize_storage_path(trainer.storage_path)
    run_dir = f"{storage}/{name}"

    # connect and the tracking helpers are shared with serving, whose config stays plain dicts
    local = connect(asdict(cluster), required_cpus, cluster.runtime_env)
    # On a local cluster the learner and the actors take turns, so each may use every core.
    threads = cluster.torch_threads or ((os.cpu_count() or 1) if local else None)

    previous = read_json(f"{run_dir}/{RUN_FILE}") or {}
    tracking_uri, _ = resolve_tracking(asdict(tracking))
    run_id = start_run(
        asdict(tracking),
        name,
        flatten(c),
        run_id=previous.get("mlflow_run_id") or tracking.run_id,
        tags={"armature.job": job, "armature.algo": algo},
        resumed=bool(previous),
    )
    write_json(f"{run_dir}/{RUN_FILE}", {"mlflow_run_id": run_id, "tracking_uri": tracking_uri})
    print(f"[armature] run {name}: MLflow run {run_id} at {tracking_uri}", flush=True)
    return JobRun(c, algo, name, storage, run_dir, run_id, tracking_uri, threads, local)


def typed(cfg: DictConfig) -> TrainConfig:
    """The composed config as dataclass instances: a ``TrainConfig`` whose ``algo`` is the
    registered algorithm's schema (attribute access, types checked by the schema); they pickle
    to Ray workers as they are."""
    return OmegaConf.to_object(cfg)


def trainer_kwargs(run: JobRun) -> dict:
    """``scaling_config`` and ``run_config`` for the job's ``TorchTrainer``, from ``trainer.*``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    t = run.cfg.trainer
    return {
        "scaling_config": ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **t.resources_per_worker},
            placement_strategy=t.placement_strategy,
        ),
        "run_config": RunConfig(
            name=run.name,
            storage_path=run.storage,
            checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
    }


def fit(trainer, run: JobRun) -> dict:
    """Run the trainer; close the MLflow run as FINISHED or FAILED; register the trained
    adapter as ``tracking.registered_model`` when set. Returns the last reported metrics."""
    from armature.platform.tracking import RunLogger

    logger = RunLogger(run.tracking_uri, run.run_id)
    try:
        result = trainer.fit()
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish("FINISHED")
    model_name = run.cfg.tracking.registered_model
    if model_name:
        from armature.platform.registry import register_adapter

        version = register_adapter(
            run.tracking_uri, run.run_id, model_name, tags={"run_name": run.name, "algo": run.algo}
        )
        print(f"[armature] adapter registered as {model_name}/{version}", flush=True)
    return dict(result.metrics or {})
