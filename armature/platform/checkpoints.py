"""Learner checkpoints on Ray Train, and metrics that reach MLflow only once checkpointed.

A checkpoint holds every rank's DeepSpeed shard (Ray merges the ranks' folders in storage),
rank 0's JSON state (the epoch, the metrics not yet logged, whatever the job adds: reward
statistics, step counters) and optional extra tensors (e.g. DiffusionNFT's sampling policy).

An epoch's metrics are logged to MLflow only after the checkpoint that covers them is
registered (:func:`commit_epoch`): an epoch that a restart trains again is never logged twice,
and :func:`restore_checkpoint` logs what a checkpoint holds but MLflow missed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

STATE_FILE = "armature_state.json"
EXTRA_FILE = "armature_extra.safetensors"
TORCH_STATE_FILE = "armature_state.pt"  # a learner without DeepSpeed: its modules' and optimizer's state


def save_checkpoint(
    engine, state: dict, epoch: int, unlogged: list, rank: int, extra: dict[str, torch.Tensor] | None = None
) -> None:
    """Report a Ray Train checkpoint with the last unlogged metrics."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="deepspeed", exclude_frozen_parameters=True)
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps({"epoch": epoch, "unlogged": unlogged, **state}))
            if extra:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in extra.items()}, Path(tmp) / EXTRA_FILE)
        ray.train.report(unlogged[-1][1], checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore_checkpoint(engine, logger) -> tuple[int, dict, dict[str, torch.Tensor] | None]:
    """``(epoch to start from, JSON state, extra tensors)``; ``(0, {}, None)`` without a
    checkpoint. Logs the checkpoint's metrics that had not reached MLflow (rank 0's logger)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}, None
    from armature.platform.weights_only import load_deepspeed_checkpoint

    with checkpoint.as_directory() as directory:
        load_deepspeed_checkpoint(engine, directory, load_module_strict=False)  # weights-only unpickler: no code runs
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        extra = None
        if (Path(directory) / EXTRA_FILE).is_file():
            from safetensors.torch import load_file

            extra = load_file(Path(directory) / EXTRA_FILE)
    if logger is not None:
        for step, values in state["unlogged"]:
            if step > logger.last_step(_series(values)):
                logger.log_metrics(values, step=step)
        print(f"[armature] resumed from the checkpoint of epoch {state['epoch']}", flush=True)
    return state["epoch"] + 1, state, extra


def _series(metrics: dict) -> str:
    """The key whose MLflow history says whether ``metrics`` was logged: ``epoch`` for an epoch's
    metrics, else (e.g. a learner's per-step metrics) the first key with a finite value."""
    import math

    if "epoch" in metrics:
        return "epoch"
    return next(k for k, v in sorted(metrics.items()) if v is not None and math.isfinite(float(v)))


def commit_epoch(
    engine,
    logger,
    epoch: int,
    metrics: dict,
    unlogged: list,
    rank: int,
    checkpoint: bool,
    state: dict | None = None,
    extra_fn=None,
) -> list:
    """Queue the epoch's metrics; when ``checkpoint``, save one and then log everything queued
    (``extra_fn()`` gives the extra tensors). Returns what is still queued."""
    import ray.train

    unlogged = unlogged + [(epoch, metrics)]
    if not checkpoint:
        ray.train.report(metrics)
        return unlogged
    save_checkpoint(engine, state or {}, epoch, unlogged, rank, extra_fn() if extra_fn else None)
    ray.train.get_all_reported_checkpoints()  # registered: safe to log
    if logger is not None:
        for step, values in unlogged:
            logger.log_metrics(values, step=step)
    return []


def save_torch_checkpoint(state: dict, metrics: dict, rank: int) -> None:
    """Report ``metrics`` to Ray Train with a checkpoint of ``state`` (state dicts, numbers),
    written by rank 0: the checkpoint of a learner that steps a plain torch optimizer."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            torch.save(state, Path(tmp) / TORCH_STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def restore_torch_checkpoint() -> dict | None:
    """The state of the last :func:`save_torch_checkpoint`, or None. Loaded with
    ``weights_only``: tensors, numbers and containers only, nothing unpickled."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_torch_state(Path(directory) / TORCH_STATE_FILE)


def load_torch_state(path: Path) -> dict:
    """A checkpoint's training state (tensors, numbers, containers) without running any code it
    holds: ``trainer.storage_path`` may be a bucket others can write, so torch's weights-only loader
    reads it (any other object is refused, never constructed)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"checkpoint {path}: holds objects other than tensors, numbers and containers, so it "
            "was not written by this job; refusing to unpickle it (remove that checkpoint folder "
            f"from trainer.storage_path to start over): {str(err).splitlines()[0]}"
        ) from None
