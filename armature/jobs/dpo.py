"""Diffusion-DPO (Wallace et al., 2023) and ASAP's localized, margin-bounded DPO, on Ray.

``algo=dpo`` is Diffusion-DPO; ``algo=asap_dpo`` weights each denoising residual by
``1 + alpha * M`` inside the pair's region mask (ASAP eq. 4) and, with ``algo.tau`` set,
regresses the preference gap onto the margin tau instead of pushing it up (eq. 6).

Read top to bottom:

* ``run``: the learner core's driver (``armature.platform.learner``); its ``prepare`` step
  builds synthetic pairs if ``data.pairs`` is unset (procedural drawings, localized
  degradations: nothing downloaded) and runs the Ray Data pipeline (validate, decode, resize,
  quarantine, VAE latents on an actor pool, held-out split) for the two datasets.
* ``train_loop`` (each Ray Train worker): a ``Worker`` builds the policy, wraps its trainable
  weights (the LoRA adapter) with DeepSpeed and restores the last checkpoint if there is one;
  then per epoch:
  1. streams its shard of the training pairs; per micro-batch, one timestep and one noise
     draw per pair, shared by the preferred and the rejected latents; the reference model's
     errors (the same UNet with its adapter switched off: no second copy) and the policy's;
     the loss; DeepSpeed accumulates and steps;
  2. measures the implicit reward accuracy on the held-out pairs (rank 0, fixed draws) on the
     first epoch, every ``algo.eval_every``-th after it and the last;
  3. logs every optimizer step and the epoch to MLflow (rank 0) and reports a checkpoint.

A rerun with the same ``tracking.run_name`` resumes from the last checkpoint and keeps
logging into the same MLflow run; metrics reach MLflow only once their checkpoint is saved.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass
from typing import Optional

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
from armature.platform.algorithms import Algorithm, register
from armature.platform.config import DataConfig, ModelConfig, OptimizerConfig
from armature.platform.engine import all_reduce_mean, all_reduce_sum
from armature.platform.learner import LoopInputs, Worker, quarantine_metrics, run_learner

NATIVE_SIZE = {"sd": 512, "sdxl": 1024}


# ============================================================================ config
@dataclass
class DPOConfig(OptimizerConfig):
    name: str = "dpo"  # dpo (Diffusion-DPO) or asap_dpo (ASAP's localized, margin-bounded DPO)
    num_epochs: int = 4
    train_batch_size: int = 8  # pairs per micro-batch on one worker
    gradient_accumulation_batches: int = 1  # micro-batches per optimizer step
    learning_rate: float = 3e-3
    adam_weight_decay: float = 0.0
    beta: float = 5000.0  # Diffusion-DPO's KL strength: loss = -log sigmoid(beta / 2 * delta)
    alpha: float = 0.0  # ASAP eq. 4: residuals weighted by 1 + alpha * mask
    tau: Optional[float] = None  # ASAP eq. 6: set -> loss (delta - tau)^2 instead of DPO's
    prediction_type: Optional[str] = None  # None: the scheduler's (epsilon or v_prediction)
    heldout_draws: int = 4  # timestep/noise draws per held-out pair
    eval_every: int = 1  # held-out evaluation on epochs 1, 1 + eval_every, ... and the last


def check(cfg: DictConfig) -> list[str]:
    """The loss's strengths, the prediction type and the held-out split."""
    algo, errors = cfg.algo, []
    if algo.beta <= 0 or algo.alpha < 0 or (algo.tau is not None and algo.tau < 0):
        errors.append(f"algo.beta={algo.beta} must be > 0, algo.alpha={algo.alpha} and algo.tau={algo.tau} >= 0")
    if algo.prediction_type not in (None, "epsilon", "v_prediction"):
        errors.append(f"algo.prediction_type={algo.prediction_type}: use epsilon or v_prediction (or null)")
    if not 0 <= cfg.data.heldout_fraction < 1:
        errors.append(f"data.heldout_fraction={cfg.data.heldout_fraction}: must be in [0, 1)")
    if cfg.data.heldout_fraction > 0 and algo.heldout_draws < 1:
        errors.append(f"algo.heldout_draws={algo.heldout_draws}: must be >= 1")
    if algo.eval_every < 1:
        errors.append(f"algo.eval_every={algo.eval_every}: must be >= 1 (held-out evaluation every that many epochs)")
    return errors


def result(metrics: dict) -> str:
    """The CLI's closing words."""
    return f"held-out implicit accuracy {metrics.get('heldout_implicit_acc', float('nan')):.3f}"


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Run a DPO job as configured; returns the last epoch's metrics."""
    data = cfg.data
    return run_learner(
        cfg,
        train_loop,
        extra_cpus=data.encoder_actors * data.encoder_num_cpus + 1,  # + data tasks
        prepare=_prepare,
    )


register(Algorithm("dpo", DPOConfig, run, check, result), Algorithm("asap_dpo", DPOConfig, run, check, result))


def _prepare(job, samplers: list, rewards: list) -> LoopInputs:
    """The pairs (given, or synthetic) through the Ray Data pipeline: training and held-out sets."""
    import ray.data

    from armature.data.stream import build_datasets

    c, run_dir = job.cfg, job.run_dir
    algo, data, trainer_cfg = c.algo, c.data, c.trainer
    data_context = ray.data.DataContext.get_current()  # Ray Train hands it to the workers too
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    data_context.execution_options.preserve_order = True  # a seeded job is repeatable
    size = data.image_size or native_size(c.model)
    pairs = data.pairs or _synthetic_pairs(f"{run_dir}/synthetic_pairs", data, size, trainer_cfg.seed)
    quarantine = data.quarantine_path or f"{run_dir}/quarantine"
    train_ds, heldout_ds = build_datasets(
        data, asdict(c.model), size, quarantine, pairs_path=pairs, threads=job.threads
    )
    counts = {
        "data_train_pairs": train_ds.count(),
        "data_heldout_pairs": heldout_ds.count(),
        **quarantine_metrics(quarantine),
    }
    print(
        f"[armature] pairs {pairs}: {counts['data_train_pairs']} for training, "
        f"{counts['data_heldout_pairs']} held out, {counts['data_quarantined']} quarantined, "
        f"{counts['data_ties_dropped']} ties dropped (quarantine: {quarantine})",
        flush=True,
    )
    if counts["data_train_pairs"] < trainer_cfg.num_workers * algo.train_batch_size:
        raise ValueError(f"{counts['data_train_pairs']} training pairs: fewer than one micro-batch per worker")
    return LoopInputs({"quarantine": quarantine, "counts": counts}, {"train": train_ds, "heldout": heldout_ds})


# ============================================================================ learner
def train_loop(config: dict) -> None:
    import ray.train

    from armature.data.stream import collate

    w = Worker(config)
    algo, rank = w.algo, w.rank
    policy = w.build_policy()
    # The reference model: the base UNet with the LoRA adapter switched off. Full fine-tuning
    # has no adapter to switch off, so it keeps a frozen copy (one more UNet in memory).
    frozen = None if policy.lora is not None else copy.deepcopy(policy.unet).requires_grad_(False)
    prediction_type = algo.prediction_type or policy.scheduler.config.prediction_type
    micro = algo.train_batch_size
    engine = w.start(policy, algo.gradient_accumulation_batches, route=False)

    def errors(batch: dict, generator: torch.Generator | None = None, train: bool = True):
        denoiser = engine if train else engine.module
        return pair_errors(policy, denoiser, batch, algo.alpha, prediction_type, frozen, generator, train)

    def loss_fn(errs, tie):
        if algo.tau is not None:
            return margin_bounded_loss(*errs, tau=algo.tau, tie=tie)
        return diffusion_dpo_loss(*errs, beta=algo.beta, tie=tie)

    global_step = w.state.get("global_step", 0)
    shard = ray.train.get_dataset_shard("train")
    window: list[dict] = []  # the micro-batches of the optimizer step under way
    for epoch in range(w.start_epoch, algo.num_epochs):
        t_epoch = time.perf_counter()
        engine.module.train()

        # ---- 1. one pass over this worker's training pairs -------------------------------
        epoch_stats, pairs_seen = [], 0
        batches = shard.iter_torch_batches(
            batch_size=micro,
            drop_last=True,
            collate_fn=collate,
            local_shuffle_buffer_size=4 * micro,
            local_shuffle_seed=w.seed * 10_000 + epoch,
        )
        for batch in batches:
            loss, info = loss_fn(errors(batch), batch["tie"].to(policy.device))
            boundary = w.step(loss)
            window.append({"loss": loss.item(), **{k: v.item() for k, v in info.items() if k != "num_pairs"}})
            epoch_stats.append(window[-1])
            pairs_seen += len(batch["prompt"])
            if boundary:
                global_step += 1
                step = all_reduce_mean({k: float(np.mean([m[k] for m in window])) for k in window[0]})
                step.update(w.optimizer_metrics())  # this step's gradient norm
                w.unlogged.append((global_step, {f"step/{k}": v for k, v in step.items()}))
                window = []
        train_time = time.perf_counter() - t_epoch

        # ---- 2. held-out pairs -----------------------------------------------------------
        metrics = {
            "epoch": epoch,
            **all_reduce_mean({k: float(np.mean([s[k] for s in epoch_stats])) for k in epoch_stats[0]}),
            "pairs_per_s": all_reduce_sum(pairs_seen) / train_time,
            "optimizer_steps": global_step,
        }
        # the first epoch, every eval_every-th after it and the last (the first gives the curve its start)
        if rank == 0 and (epoch % algo.eval_every == 0 or epoch + 1 == algo.num_epochs):
            heldout = ray.train.get_dataset_shard("heldout")
            metrics.update(evaluate_heldout(heldout, errors, loss_fn, engine, algo, w.seed))
        metrics["epoch_time_s"] = time.perf_counter() - t_epoch
        if rank == 0:
            metrics.update(config["counts"])
            metrics.update(quarantine_metrics(config["quarantine"]))

        # ---- 3. checkpoint, then log ---------------------------------------------------
        if w.end_epoch(epoch, metrics, state={"global_step": global_step}, progress=print_progress):
            break  # trainer.time_budget_s spent

    w.finish(policy)


# ============================================================================ helpers
def pair_errors(
    policy,
    denoiser,
    batch: dict,
    alpha: float,
    prediction_type: str,
    frozen=None,
    generator: torch.Generator | None = None,
    grad: bool = True,
):
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
    kwargs = policy.denoiser_inputs(cond, guided=False)
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


def evaluate_heldout(shard, errors, loss_fn, engine, algo: DPOConfig, seed: int) -> dict:
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
    draws = algo.heldout_draws
    totals = dict.fromkeys(("draw_right", "draws", "pair_right", "pairs", "margin", "loss", "losses"), 0.0)
    for batch in shard.iter_torch_batches(batch_size=algo.train_batch_size, collate_fn=collate):
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
    return {
        "heldout_implicit_acc": totals["draw_right"] / totals["draws"],
        "heldout_pair_acc": totals["pair_right"] / totals["pairs"],
        "heldout_margin": totals["margin"] / totals["draws"],
        "heldout_loss": totals["loss"] / totals["losses"],
    }


def native_size(model: ModelConfig) -> int:
    """The image size the model family was trained at."""
    if model.family == "tiny":
        return model.tiny.image_size
    if model.family == "gym":
        from armature.gym.figures import SIZE

        return SIZE
    return NATIVE_SIZE[model.family]


def _synthetic_pairs(directory: str, data: DataConfig, size: int, seed: int) -> str:
    """Pairs from procedural drawings (ASAP-style localized degradations); built once per run."""
    from pyarrow import fs

    from armature.data.synthetic import build_pairs, procedural_sources

    filesystem, path = fs.FileSystem.from_uri(directory) if "://" in directory else (fs.LocalFileSystem(), directory)
    found = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    if not any(f.path.endswith(".parquet") for f in found):
        sources = procedural_sources(data.synthetic_pairs, size=size, seed=seed)
        n = build_pairs(sources, directory, kinds=data.synthetic_kinds, seed=seed, pad=data.synthetic_pad)
        print(f"[armature] built {n} synthetic pairs in {directory}", flush=True)
    return directory


def print_progress(epoch: int, total: int, m: dict) -> None:
    """The progress line of a preference learner's epoch."""
    done = epoch + 1
    bar = "#" * int(20 * done / total) + "-" * (20 - int(20 * done / total))
    heldout = (
        f"  held-out acc {m['heldout_implicit_acc']:.3f} (by pair {m['heldout_pair_acc']:.3f})"
        f" margin {m['heldout_margin']:+.2e}"
        if "heldout_implicit_acc" in m
        else ""
    )
    print(
        f"[armature] [{bar}] epoch {done}/{total}  loss {m['loss']:.4f}  acc {m['implicit_acc']:.3f}"
        f"  margin {m['margin']:+.2e}{heldout}  {m['pairs_per_s']:.1f} pairs/s  {m['epoch_time_s']:.1f}s",
        flush=True,
    )
