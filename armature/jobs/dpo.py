"""Diffusion-DPO (Wallace et al., 2023) and ASAP's localized, margin-bounded DPO, on Ray.

``algo=dpo`` is Diffusion-DPO; ``algo=asap_dpo`` weights each denoising residual by
``1 + alpha * M`` inside the pair's region mask (ASAP eq. 4) and, with ``algo.tau`` set,
regresses the preference gap onto the margin tau instead of pushing it up (eq. 6).

Read top to bottom:

* ``run`` (the driver) connects to Ray and opens the MLflow run; builds synthetic pairs if
  ``data.pairs`` is unset (procedural drawings, localized degradations: nothing downloaded);
  runs the Ray Data pipeline (validate, decode, resize, quarantine, VAE latents on an actor
  pool, held-out split) and hands ``TorchTrainer`` the learner loop and the two datasets.
* ``train_loop`` (each Ray Train worker) builds the policy, wraps its trainable weights (the
  LoRA adapter) with DeepSpeed, restores the last checkpoint if there is one, then per epoch:
  1. streams its shard of the training pairs; per micro-batch, one timestep and one noise
     draw per pair, shared by the preferred and the rejected latents; the reference model's
     errors (the same UNet with its adapter switched off: no second copy) and the policy's;
     the loss; DeepSpeed accumulates and steps;
  2. measures the implicit reward accuracy on the held-out pairs (rank 0, fixed draws);
  3. logs every optimizer step and the epoch to MLflow (rank 0) and reports a checkpoint.

A rerun with the same ``tracking.run_name`` resumes from the last checkpoint and keeps
logging into the same MLflow run; metrics reach MLflow only once their checkpoint is saved.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from armature.losses import (
    denoising_target,
    diffusion_dpo_loss,
    margin_bounded_loss,
    preference_gap,
    resize_mask,
    weighted_denoising_error,
)
from armature.platform.engine import all_reduce_mean as _all_reduce_mean
from armature.platform.engine import deepspeed_engine, grad_norm

STATE_FILE = "armature_state.json"
NATIVE_SIZE = {"sd": 512, "sdxl": 1024}


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Run a DPO job as configured; returns the last epoch's metrics."""
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    from armature.data.stream import build_datasets, quarantine_summary
    from armature.platform.launch import fit, open_run, trainer_kwargs

    t, data = cfg.trainer, cfg.data
    # + 1 CPU: the data tasks
    job = open_run(cfg, t.num_workers * t.cpus_per_worker + data.encoder_actors * data.encoder_num_cpus + 1)
    c, threads, run_dir = job.cfg, job.threads, job.run_dir
    algo, data, trainer_cfg = c["algo"], c["data"], c["trainer"]

    # ---- the pairs: given, or synthetic ------------------------------------------------
    import ray.data

    data_context = ray.data.DataContext.get_current()  # Ray Train hands it to the workers too
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    data_context.execution_options.preserve_order = True  # a seeded job is repeatable
    size = data["image_size"] or _native_size(c["model"])
    pairs = data["pairs"] or _synthetic_pairs(f"{run_dir}/synthetic_pairs", data, size, trainer_cfg["seed"])
    quarantine = data["quarantine_path"] or f"{run_dir}/quarantine"
    train_ds, heldout_ds = build_datasets(data, c["model"], size, quarantine, pairs_path=pairs, threads=threads)
    counts = {"data_train_pairs": train_ds.count(), "data_heldout_pairs": heldout_ds.count(),
              **_quarantine_metrics(quarantine_summary(quarantine))}
    print(f"[armature] pairs {pairs}: {counts['data_train_pairs']} for training, "
          f"{counts['data_heldout_pairs']} held out, {counts['data_quarantined']} quarantined, "
          f"{counts['data_ties_dropped']} ties dropped (quarantine: {quarantine})", flush=True)
    if counts["data_train_pairs"] < trainer_cfg["num_workers"] * algo["train_batch_size"]:
        raise ValueError(f"{counts['data_train_pairs']} training pairs: fewer than one micro-batch per worker")

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": c, "run_id": job.run_id, "tracking_uri": job.tracking_uri, "threads": threads,
                           "quarantine": quarantine, "counts": counts},
        datasets={"train": train_ds, "heldout": heldout_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        **trainer_kwargs(job),
    )
    return fit(trainer, job)


# ============================================================================ learner
def train_loop(config: dict) -> None:
    import ray.train

    from armature.data.stream import collate, quarantine_summary
    from armature.platform.tracking import RunLogger
    from armature.policies import build_policy

    c = config["cfg"]
    algo, trainer_cfg = c["algo"], c["trainer"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(trainer_cfg["seed"] + rank)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])

    policy = build_policy(c["model"], c["sampling"], seed=trainer_cfg["seed"])
    # The reference model: the base UNet with the LoRA adapter switched off. Full fine-tuning
    # has no adapter to switch off, so it keeps a frozen copy (one more UNet in memory).
    frozen = None if policy.lora is not None else copy.deepcopy(policy.unet).requires_grad_(False)
    prediction_type = algo["prediction_type"] or policy.scheduler.config.prediction_type
    micro = algo["train_batch_size"]

    engine, optimizer, params = deepspeed_engine(policy, algo, trainer_cfg, algo["gradient_accumulation_batches"])

    def errors(batch: dict, generator: torch.Generator | None = None, train: bool = True):
        denoiser = engine if train else engine.module
        return pair_errors(policy, denoiser, batch, algo["alpha"], prediction_type, frozen, generator, train)

    def loss_fn(errs, tie):
        if algo["tau"] is not None:
            return margin_bounded_loss(*errs, tau=algo["tau"], tie=tie)
        return diffusion_dpo_loss(*errs, beta=algo["beta"], tie=tie)

    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    start_epoch, global_step = _restore(engine, logger)
    shard = ray.train.get_dataset_shard("train")
    unlogged: list[tuple[int, dict]] = []  # (step, metrics) waiting for their checkpoint
    window: list[dict] = []  # the micro-batches of the optimizer step under way
    for epoch in range(start_epoch, algo["num_epochs"]):
        t_epoch = time.perf_counter()
        engine.module.train()

        # ---- 1. one pass over this worker's training pairs -------------------------------
        epoch_stats, pairs_seen = [], 0
        batches = shard.iter_torch_batches(
            batch_size=micro, drop_last=True, collate_fn=collate,
            local_shuffle_buffer_size=4 * micro, local_shuffle_seed=trainer_cfg["seed"] * 10_000 + epoch,
        )
        for batch in batches:
            errs = errors(batch)
            loss, info = loss_fn(errs, batch["tie"].to(policy.device))
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            norm = grad_norm(params) if boundary else None
            engine.step()  # DeepSpeed steps the optimizer at a boundary only
            window.append({"loss": loss.item(), **{k: v.item() for k, v in info.items() if k != "num_pairs"}})
            epoch_stats.append(window[-1])
            pairs_seen += len(batch["prompt"])
            if boundary:
                global_step += 1
                step = _all_reduce_mean({k: float(np.mean([w[k] for w in window])) for k in window[0]})
                step["grad_norm"] = engine.get_global_grad_norm() or norm
                step["learning_rate"] = optimizer.param_groups[0]["lr"]
                unlogged.append((global_step, {f"step/{k}": v for k, v in step.items()}))
                window = []
        train_time = time.perf_counter() - t_epoch

        # ---- 2. held-out pairs -----------------------------------------------------------
        metrics = {
            "epoch": epoch,
            **_all_reduce_mean({k: float(np.mean([s[k] for s in epoch_stats])) for k in epoch_stats[0]}),
            "pairs_per_s": _all_reduce_sum(pairs_seen) / train_time,
            "optimizer_steps": global_step,
        }
        last = epoch + 1 == algo["num_epochs"]
        if rank == 0 and (last or (epoch + 1) % algo["eval_every"] == 0):
            heldout = ray.train.get_dataset_shard("heldout")
            metrics.update(_evaluate(heldout, errors, loss_fn, engine, algo, trainer_cfg["seed"]))
        metrics["epoch_time_s"] = time.perf_counter() - t_epoch
        if rank == 0:
            metrics.update(config["counts"])
            metrics.update(_quarantine_metrics(quarantine_summary(config["quarantine"])))
            _print_progress(epoch, algo["num_epochs"], metrics)

        # ---- 3. checkpoint, then log ---------------------------------------------------
        unlogged.append((epoch, metrics))
        if last or (epoch + 1) % trainer_cfg["checkpoint_every"] == 0:
            _report_with_checkpoint(engine, epoch, global_step, unlogged, rank)
            ray.train.get_all_reported_checkpoints()
            if logger is not None:
                _log(logger, unlogged)
            unlogged = []
        else:
            ray.train.report(metrics)

    if logger is not None:
        with tempfile.TemporaryDirectory() as tmp:
            _save_trainable(policy, Path(tmp) / "adapter", c)
            logger.log_artifacts(Path(tmp) / "adapter", "adapter")
            logger.log_text(json.dumps(c, indent=2, default=str), "config.json")


# ============================================================================ helpers
def pair_errors(policy, denoiser, batch: dict, alpha: float, prediction_type: str, frozen=None,
                generator: torch.Generator | None = None, grad: bool = True):
    """``(pol_err_w, pol_err_l, ref_err_w, ref_err_l)``, each ``[B]``, for a batch of pairs.

    One timestep and one noise draw per pair, shared by its two images (and its prompt), so
    the two errors differ only through the images. ``denoiser`` computes the policy's output
    (the DeepSpeed engine while training); the reference is ``frozen`` or, by default, the
    policy's UNet with its adapter switched off. Errors are weighted by ``1 + alpha * mask``.
    """
    device = policy.device
    if "latents_w" in batch:  # cached by the pipeline's VAE actors
        x_w, x_l = batch["latents_w"].to(device), batch["latents_l"].to(device)
    else:
        from armature.data.stream import vae_encode

        x_w, x_l = vae_encode(policy.pipe.vae, batch["pixels_w"]), vae_encode(policy.pipe.vae, batch["pixels_l"])
    n = len(x_w)
    mask = resize_mask(batch["mask"].to(device), tuple(x_w.shape[-2:]))
    t = torch.randint(0, policy.scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
    noise = torch.randn(x_w.shape, generator=generator).to(device, x_w.dtype)
    # w and l in one forward pass: the same timestep, noise and prompt for both images
    x0, noise, t, mask = torch.cat([x_w, x_l]), torch.cat([noise, noise]), torch.cat([t, t]), torch.cat([mask, mask])
    cond = {k: torch.cat([v, v]) for k, v in policy.encode(batch["prompt"]).items()}
    kwargs = policy._unet_kwargs(cond, guided=False)
    noisy = policy.scheduler.add_noise(x0, noise, t)
    alpha_bar = policy.scheduler.alphas_cumprod.to(device)[t]
    target = denoising_target(x0, noise, alpha_bar, prediction_type)
    with torch.no_grad(), _reference(policy, frozen) as reference:
        ref_err = weighted_denoising_error(reference(noisy, t, **kwargs).sample.float(), target, mask, alpha)
    with contextlib.nullcontext() if grad else torch.no_grad():
        pol_err = weighted_denoising_error(denoiser(noisy, t, **kwargs).sample.float(), target, mask, alpha)
    return pol_err[:n], pol_err[n:], ref_err[:n], ref_err[n:]


@contextlib.contextmanager
def _reference(policy, frozen=None):
    """The reference model: a frozen copy if given, else the policy's UNet with its LoRA
    adapter switched off for the duration (peft restores the adapter's trainable state)."""
    if frozen is not None:
        yield frozen
        return
    policy.unet.disable_adapters()
    try:
        yield policy.unet
    finally:
        policy.unet.enable_adapters()


def _evaluate(shard, errors, loss_fn, engine, algo: dict, seed: int) -> dict:
    """The implicit reward on the held-out pairs, with the same timesteps and noise every epoch
    (``heldout_draws`` per pair), so that epochs compare.

    ``heldout_implicit_acc``: the share of (pair, draw) with delta > 0, Diffusion-DPO's implicit
    accuracy; ``heldout_pair_acc``: the share of pairs whose delta averaged over the draws is > 0
    (the implicit reward is an expectation over timesteps and noise: this ranks by its estimate).
    Ties are left out of both.
    """
    from armature.data.stream import collate

    engine.module.eval()
    generator = torch.Generator().manual_seed(seed + 7919)
    draws = algo["heldout_draws"]
    totals = dict.fromkeys(("draw_right", "draws", "pair_right", "pairs", "margin", "loss", "losses"), 0.0)
    for batch in shard.iter_torch_batches(batch_size=algo["train_batch_size"], collate_fn=collate):
        deltas = []
        for _ in range(draws):
            errs = errors(batch, generator, train=False)
            totals["loss"] += loss_fn(errs, batch["tie"])[0].item() * len(batch["tie"])
            totals["losses"] += len(batch["tie"])
            deltas.append(preference_gap(*errs).cpu())
        delta, strict = torch.stack(deltas), ~batch["tie"]  # [draws, B], [B]
        totals["draw_right"] += ((delta > 0) & strict).sum().item()
        totals["draws"] += draws * strict.sum().item()
        totals["pair_right"] += ((delta.mean(0) > 0) & strict).sum().item()
        totals["pairs"] += strict.sum().item()
        totals["margin"] += delta[:, strict].sum().item()
    engine.module.train()
    if not totals["pairs"]:
        return {}
    return {"heldout_implicit_acc": totals["draw_right"] / totals["draws"],
            "heldout_pair_acc": totals["pair_right"] / totals["pairs"],
            "heldout_margin": totals["margin"] / totals["draws"],
            "heldout_loss": totals["loss"] / totals["losses"]}


def _quarantine_metrics(summary: dict[str, int]) -> dict[str, int]:
    out = {"data_quarantined": summary.get("quarantined", 0), "data_ties_dropped": summary.get("tie_dropped", 0)}
    out.update({f"data_quarantined_{k}": v for k, v in summary.items() if k not in ("quarantined", "tie_dropped")})
    return out


def _native_size(model: dict) -> int:
    if model.get("family", "tiny") == "tiny":
        return (model.get("tiny") or {}).get("image_size", 32)
    if model["family"] == "gym":
        from armature.gym.figures import SIZE

        return SIZE
    return NATIVE_SIZE[model["family"]]


def _synthetic_pairs(directory: str, data: dict, size: int, seed: int) -> str:
    """Pairs from procedural drawings (ASAP-style localized degradations); built once per run."""
    from pyarrow import fs

    from armature.data.synthetic import build_pairs, procedural_sources

    filesystem, path = fs.FileSystem.from_uri(directory) if "://" in directory else (fs.LocalFileSystem(), directory)
    found = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    if not any(f.path.endswith(".parquet") for f in found):
        sources = procedural_sources(data["synthetic_pairs"], size=size, seed=seed)
        n = build_pairs(sources, directory, kinds=data["synthetic_kinds"], seed=seed, pad=data["synthetic_pad"])
        print(f"[armature] built {n} synthetic pairs in {directory}", flush=True)
    return directory


def _all_reduce_sum(value: float) -> float:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def _save_trainable(policy, directory: Path, c: dict) -> None:
    if policy.lora is not None:
        policy.save_adapter(directory, metadata={"model": c["model"], "sampling": c["sampling"]})
        return
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in policy.trainable_state_dict().items()}, directory / "unet.safetensors")


def _log(logger, entries: list[tuple[int, dict]]) -> None:
    for step, values in entries:
        logger.log_metrics(values, step=step)


def _report_with_checkpoint(engine, epoch: int, global_step: int, unlogged: list, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="deepspeed", exclude_frozen_parameters=True)
        if rank == 0:
            state = {"epoch": epoch, "global_step": global_step, "unlogged": unlogged}
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        metrics = [m for _, m in unlogged if "epoch" in m][-1]
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(engine, logger) -> tuple[int, int]:
    """Load the last checkpoint, if any; returns (epoch to start from, optimizer steps done)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    from armature.platform.weights_only import load_deepspeed_checkpoint

    with checkpoint.as_directory() as directory:
        load_deepspeed_checkpoint(engine, directory, load_module_strict=False)  # weights-only unpickler: no code runs
        state = json.loads((Path(directory) / STATE_FILE).read_text())
    if logger is not None:  # the checkpoint's metrics may not have reached MLflow
        last_epoch, last_step = logger.last_step("epoch"), logger.last_step("step/loss")
        _log(logger, [(s, m) for s, m in state["unlogged"] if s > (last_epoch if "epoch" in m else last_step)])
        print(f"[armature] resumed from the checkpoint of epoch {state['epoch']}", flush=True)
    return state["epoch"] + 1, state["global_step"]


def _print_progress(epoch: int, total: int, m: dict) -> None:
    done = epoch + 1
    bar = "#" * int(20 * done / total) + "-" * (20 - int(20 * done / total))
    heldout = (f"  held-out acc {m['heldout_implicit_acc']:.3f} (by pair {m['heldout_pair_acc']:.3f})"
               f" margin {m['heldout_margin']:+.2e}" if "heldout_implicit_acc" in m else "")
    print(
        f"[armature] [{bar}] epoch {done}/{total}  loss {m['loss']:.4f}  acc {m['implicit_acc']:.3f}"
        f"  margin {m['margin']:+.2e}{heldout}  {m['pairs_per_s']:.1f} pairs/s  {m['epoch_time_s']:.1f}s",
        flush=True,
    )
