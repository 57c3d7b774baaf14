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


def save_checkpoint(engine, state: dict, epoch: int, unlogged: list, rank: int,
                    extra: dict[str, torch.Tensor] | None = None) -> None:
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
        logged = logger.last_step("epoch")
        for step, values in state["unlogged"]:
            if step > logged:
                logger.log_metrics(values, step=step)
        print(f"[armature] resumed from the checkpoint of epoch {state['epoch']}", flush=True)
    return state["epoch"] + 1, state, extra


def commit_epoch(engine, logger, epoch: int, metrics: dict, unlogged: list, rank: int, checkpoint: bool,
                 state: dict | None = None, extra_fn=None) -> list:
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
