"""SkeleGuide's three-phase training (Wu et al., sec. 3.4) on Ray Train + DeepSpeed.

One flow DiT (``armature.policies.skeleguide.SkeleGuidePipeline``) with a skeletal adapter
(scene + prompt -> scene-aware layout M) and an appearance adapter (layout + prompt -> the person
in the scene), trained on human-in-place triples (scene, layout, target) in three phases:

1. **reasoning** (``algo.phase1_steps``): L_reason alone (eq. 4), flow matching of the skeletal
   branch toward the encoded ground-truth layout M; only the skeletal adapter trains.
2. **joint** (``algo.phase2_steps``): lambda_reason * L_reason + lambda_render * L_render (0.5, 1).
   The renderer is conditioned on the layout predicted online, M_hat (eq. 6), and L_render's
   gradient flows through M_hat into the skeletal adapter. ``algo.layout_estimate=noise`` is
   eq. 6 as written: M_hat = M_0 + v_hat(M_0, t = 0), one more skeletal call from the noise M_0
   that L_reason also starts from; ``shared`` reuses L_reason's call, M_hat = M_t + (1 - t) v_hat.
   Both adapters train.
3. **rendering** (``algo.phase3_steps``): L_render alone, conditioned on the ground-truth M; only
   the appearance adapter trains (the skeletal one is frozen: no gradient, and the optimizer's
   state cannot move it, see ``_freeze``).

The math is ``armature.losses.skeleguide``. The triples are the anatomy gym's, drawn on the fly
per (seed, step, worker), or read from a Parquet file (``algo.triples``,
``armature.skeleton.scenes.write_triples``).

Read top to bottom: ``run`` (the driver) checks the config, connects to Ray, opens the MLflow run
and hands ``TorchTrainer`` the learner loop; ``train_loop`` (each Ray Train worker) builds the
pipeline, wraps both adapters' LoRA weights with DeepSpeed, restores the last checkpoint if there
is one, then runs the phases' epochs (``algo.steps_per_epoch`` optimizer steps each; an epoch
never spans two phases). Every step's loss terms are MLflow metrics (``step/*``, at the global
step); every epoch adds held-out losses on fixed triples and noise, ``steps_per_s`` and a
checkpoint; every phase end adds a sample grid (``samples/phase<N>.png``: scene, ground-truth
layout, planned layout, target, rendered from the ground-truth layout, rendered from the plan).
Metrics reach MLflow only once their checkpoint is registered, so a rerun with the same
``tracking.run_name`` resumes after a kill without logging a step twice. At the end rank 0 saves
the pipeline (both adapters, ``SkeleGuidePipeline.save_pretrained``) as the run's ``adapter``
artifact, which ``platform.launch.fit`` registers (as ``armature-skeleguide`` unless
``tracking.registered_model`` names another), and, on local storage, to ``<run folder>/pipeline``
for ``armature serve edits.pipeline=...``.

    python -m armature.jobs.skeleguide algo=skeleguide model=tiny_skeleguide [overrides]
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from armature.losses.skeleguide import flow_interpolate, joint_loss, one_step_layout, reasoning_loss, rendering_loss
from armature.platform.algorithms import Algorithm, register
from armature.platform.config import OptimizerConfig, TrainConfig
from armature.platform.engine import all_reduce_mean
from armature.platform.learner import LoopInputs, Worker, run_learner

PHASE_ADAPTERS = {1: ("skeletal",), 2: ("skeletal", "appearance"), 3: ("appearance",)}
DEFAULT_REGISTERED = "armature-adapter"  # the platform default: a UNet adapter name, not ours
REGISTERED_NAME = "armature-skeleguide"
FAMILIES = ("tiny_skeleguide", "flux_kontext")


# ============================================================================ config
@dataclass
class SkeleGuideConfig(OptimizerConfig):
    """SkeleGuide's three training phases (armature/jobs/skeleguide.py): `algo=skeleguide model=tiny_skeleguide`."""

    name: str = "skeleguide"
    phase1_steps: int = 30  # reasoning loss alone (eq. 4), skeletal adapter
    phase2_steps: int = 30  # joint: lambda_reason * L_reason + lambda_render * L_render, renderer on M_hat
    phase3_steps: int = 30  # rendering loss alone on ground-truth layouts, appearance adapter
    steps_per_epoch: int = 10  # optimizer steps between checkpoints; an epoch never spans two phases
    train_batch_size: int = 4  # triples per step on one worker
    learning_rate: float = 3e-3  # the paper: 1e-4 on FLUX.1-dev (the tiny random model needs more)
    adam_weight_decay: float = 0.0
    lambda_reason: float = 0.5
    lambda_render: float = 1.0
    layout_estimate: str = "noise"  # noise: eq. 6, M_0 + v_hat(M_0, t=0) | shared: M_t + (1 - t) v_hat at L_reason's t
    lora_targets: str = "qkv"  # qkv: eq. 3 (condition tokens' Q/K/V) | all: every attention projection
    guidance_scale: float = 2.5  # guidance-distilled models only (FLUX.1-Kontext-dev)
    triples: Optional[str] = None  # Parquet of triples (armature.skeleton.scenes.write_triples); None: gym, on the fly
    pose: Optional[str] = None  # gym triples of one pose class only
    heldout_triples: int = 8  # fixed triples and noise: held-out losses every epoch, sample grids at phase ends
    sample_steps: int = 8  # Euler steps of each stage in the sample grids (and the saved pipeline's default)
    # model=tiny_skeleguide: a trained AutoencoderKL folder (benchmarks/skeleguide.py --vae-cache makes one)
    tiny_vae: Optional[str] = None


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Run the three phases as configured; returns the last epoch's metrics."""
    return run_learner(cfg, train_loop, prepare=_prepare)


def _prepare(job, samplers: list, rewards: list) -> LoopInputs:
    if job.cfg.tracking.registered_model == DEFAULT_REGISTERED:
        job.cfg.tracking.registered_model = REGISTERED_NAME  # a pipeline folder, not a UNet adapter
    return LoopInputs({"run_dir": job.run_dir})


def check(cfg: DictConfig) -> list[str]:
    """What the schema cannot say (checked when the config is composed, before Ray starts)."""
    algo, model, errors = cfg.algo, cfg.model, []
    if model.family not in FAMILIES:
        errors.append(
            f"model.family={model.family}: SkeleGuide runs on a FLUX-Kontext-style DiT; use "
            "model=tiny_skeleguide, or model.family=flux_kontext model.pretrained=<hub id or folder>"
        )
    elif model.family == "flux_kontext" and not model.pretrained:
        errors.append("model.pretrained is unset: flux_kontext loads e.g. black-forest-labs/FLUX.1-Kontext-dev")
    if min(algo.phase1_steps, algo.phase2_steps, algo.phase3_steps) < 0 or algo.steps_per_epoch < 1:
        errors.append("algo.phase{1,2,3}_steps must be >= 0 and algo.steps_per_epoch >= 1")
    if algo.layout_estimate not in ("noise", "shared"):
        errors.append(f"algo.layout_estimate={algo.layout_estimate}: use noise (eq. 6 at t = 0) or shared")
    if algo.lora_targets not in ("qkv", "all"):
        errors.append(f"algo.lora_targets={algo.lora_targets}: use qkv (eq. 3) or all")
    if algo.train_batch_size < 1 or algo.heldout_triples < 1 or algo.sample_steps < 1:
        errors.append("algo.train_batch_size, algo.heldout_triples and algo.sample_steps must be >= 1")
    if not model.lora.enabled:
        errors.append("model.lora.enabled=false: SkeleGuide trains its two LoRA adapters; set it true")
    return errors


register(Algorithm("skeleguide", SkeleGuideConfig, run, check))


def pipeline_params(c: TrainConfig):
    """``SkeleGuideParams`` from the job's ``model`` and ``algo`` sections."""
    from dataclasses import fields

    from armature.policies.skeleguide import SkeleGuideParams, TinyKontextConfig

    model, algo = c.model, c.algo
    # the tiny VAE's shape is SkeleGuide's own (3 levels: 8 x 8 tokens at 64 px), or algo.tiny_vae's
    names = {f.name for f in fields(TinyKontextConfig)} - {"vae_channels", "latent_channels"}
    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return SkeleGuideParams(
        pretrained=model.pretrained if model.family == "flux_kontext" else None,
        revision=model.revision,
        variant=model.variant,
        dtype=model.dtype,
        device=device,
        tiny=TinyKontextConfig(
            **{k: v for k, v in {**asdict(model.tiny), **asdict(model.tiny_flow)}.items() if k in names}
        ),
        lora_rank=model.lora.rank,
        lora_alpha=model.lora.alpha,
        lora_targets=algo.lora_targets,
        lora_seed=c.trainer.seed,
        guidance_scale=algo.guidance_scale,
        num_steps=algo.sample_steps,
        vae=algo.tiny_vae if model.family == "tiny_skeleguide" else None,
    )


def epoch_plan(algo: SkeleGuideConfig) -> list[tuple[int, int, int]]:
    """``(phase, first global step, steps)`` of every epoch, phases in order."""
    plan, step = [], 0
    for phase in (1, 2, 3):
        total = getattr(algo, f"phase{phase}_steps")
        for first in range(0, total, algo.steps_per_epoch):
            steps = min(algo.steps_per_epoch, total - first)
            plan.append((phase, step, steps))
            step += steps
    return plan


# ============================================================================ learner
def train_loop(config: dict) -> None:
    from armature.policies.skeleguide import ADAPTERS, SkeleGuidePipeline

    w = Worker(config)
    c, algo, rank, seed = w.c, w.algo, w.rank, w.seed
    pipe = SkeleGuidePipeline.build(pipeline_params(c))
    pipe.set_trainable(ADAPTERS)  # one optimizer over both adapters; each phase freezes what it does not train
    w.start(pipe, accumulation=1)  # MLflow steps are global steps: the job's epoch is in the state
    start_epoch = w.state.get("job_epoch", -1) + 1

    source = _triple_source(algo, seed)
    heldout = _heldout_batch(pipe, source, algo, seed)
    plan = epoch_plan(algo)
    for epoch in range(start_epoch, len(plan)):
        phase, first, steps = plan[epoch]
        _freeze(pipe, phase)
        t_epoch = time.perf_counter()
        window = []
        for step in range(first, first + steps):
            batch = _batch(pipe, source(step, rank, algo.train_batch_size))
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + rank)
            loss, terms = phase_loss(pipe, batch, phase, algo, generator)
            w.step(loss)
            _freeze(pipe, phase)  # frozen adapters keep no gradient for the next step
            terms = all_reduce_mean({"loss": loss.item(), **terms})
            optimizer = w.optimizer_metrics()
            terms.update(grad_norm=optimizer["grad_norm"], phase=phase)
            w.unlogged.append((step, {f"step/{k}": v for k, v in terms.items()}))
            window.append(terms)
        elapsed = time.perf_counter() - t_epoch
        last_step = first + steps - 1
        metrics = {
            "epoch": epoch,
            "phase": phase,
            **{k: float(np.mean([m[k] for m in window])) for k in window[0] if k not in ("phase", "grad_norm")},
            **heldout_losses(pipe, heldout, phase),
            "learning_rate": optimizer["learning_rate"],
            "steps_per_s": steps / elapsed,
            "epoch_time_s": elapsed,
        }
        phase_end = epoch + 1 == len(plan) or plan[epoch + 1][0] != phase
        if w.logger is not None:
            print(
                f"[armature] skeleguide epoch {epoch + 1}/{len(plan)} phase {phase}  loss {metrics['loss']:.4f}  "
                f"held-out reason {metrics['heldout_reason_loss']:.4f} render {metrics['heldout_render_loss']:.4f}  "
                f"{metrics['steps_per_s']:.2f} steps/s",
                flush=True,
            )
            if phase_end and c.tracking.log_images_every:
                w.logger.log_images(
                    sample_grid(pipe, heldout, algo.sample_steps, c.tracking.images_per_grid),
                    f"samples/phase{phase}_epoch_{epoch:04d}.png",
                )
        w.commit(last_step, metrics, checkpoint=True, state={"job_epoch": epoch, "phase": phase})

    w.finish(pipe, save=pipe.save_pretrained)
    if w.logger is not None and "://" not in config["run_dir"]:
        path = pipe.save_pretrained(Path(config["run_dir"]) / "pipeline")
        print(f"[armature] SkeleGuide pipeline saved to {path}", flush=True)


# ============================================================================ the losses of a phase
def phase_loss(pipe, batch: dict, phase: int, algo: SkeleGuideConfig, generator: torch.Generator):
    """``(loss, {term: value})`` of one micro-batch in ``phase`` (1, 2 or 3)."""
    scene, layout, target, text, size = batch["scene"], batch["layout"], batch["target"], batch["text"], batch["size"]
    b = layout.shape[0]
    terms = {}
    if phase in (1, 2):
        m0 = torch.randn(layout.shape, generator=generator).to(layout)
        t = torch.rand(b, generator=generator).to(layout)
        v_hat = pipe.flow("skeletal", flow_interpolate(m0, layout, t), t, scene, text, size)
        reason = reasoning_loss(v_hat, m0, layout)
        terms["reason_loss"] = reason.item()
        if phase == 1:
            return reason, terms
        if algo.layout_estimate == "noise":  # eq. 6: from the noise M_0 at t = 0
            condition = one_step_layout(m0, pipe.flow("skeletal", m0, 0.0, scene, text, size), 0.0)
        else:
            condition = one_step_layout(flow_interpolate(m0, layout, t), v_hat, t)
        terms["layout_error"] = (condition.detach() - layout).pow(2).mean().item()  # M_hat vs M
    else:
        condition = layout  # phase 3: the ground-truth layout
    z0 = torch.randn(target.shape, generator=generator).to(target)
    s = torch.rand(b, generator=generator).to(target)
    u = pipe.flow("appearance", flow_interpolate(z0, target, s), s, condition, text, size)
    render = rendering_loss(u, z0, target)
    terms["render_loss"] = render.item()
    if phase == 3:
        return render, terms
    return joint_loss(reason, render, algo.lambda_reason, algo.lambda_render), terms


def _freeze(pipe, phase: int) -> None:
    """Only the phase's adapters require gradients; the others' gradients are dropped, so AdamW
    (which skips parameters without one) cannot move them with momentum from an earlier phase."""
    pipe.set_trainable(PHASE_ADAPTERS[phase])
    for adapter in {"skeletal", "appearance"} - set(PHASE_ADAPTERS[phase]):
        for p in pipe.adapter_parameters(adapter):
            p.grad = None


# ============================================================================ data
def _triple_source(algo: SkeleGuideConfig, seed: int):
    """``source(step, rank, n)``: the triples of one step, the same on a rerun."""
    from armature.skeleton.scenes import read_triples, sample_triple

    stored = read_triples(algo.triples) if algo.triples else None

    def source(step: int, rank: int, n: int) -> list:
        rng = np.random.default_rng([seed, step, rank])
        if stored is not None:
            return [stored[i] for i in rng.integers(len(stored), size=n)]
        return [sample_triple(rng, algo.pose) for _ in range(n)]

    return source


def _batch(pipe, triples: list) -> dict:
    """Encoded latents (the VAE is frozen) and prompt embeddings of a list of triples."""
    scenes = np.stack([t.scene for t in triples])
    return {
        "scene": pipe.encode_images(scenes),
        "layout": pipe.encode_images([t.layout for t in triples]),
        "target": pipe.encode_images([t.target for t in triples]),
        "text": pipe.encode_prompts([t.prompt for t in triples]),
        "size": scenes.shape[1:3],
        "triples": triples,
    }


def _heldout_batch(pipe, source, algo: SkeleGuideConfig, seed: int) -> dict:
    """Fixed triples (drawn apart from the training ones) and fixed noise and times."""
    triples = source(2**31 - 1, 10_000, algo.heldout_triples)  # a step no run reaches
    batch = _batch(pipe, triples)
    g = torch.Generator().manual_seed(seed + 4242)
    shape = batch["layout"].shape
    batch["noise"] = [torch.randn(shape, generator=g).to(batch["layout"]) for _ in range(2)]
    batch["times"] = [torch.linspace(0.05, 0.95, shape[0]).to(batch["layout"]) for _ in range(2)]
    return batch


@torch.no_grad()
def heldout_losses(pipe, batch: dict, phase: int) -> dict:
    """L_reason and L_render (on the ground-truth layout) on the held-out triples, same noise every epoch."""
    (m0, z0), (t, s) = batch["noise"], batch["times"]
    scene, layout, target, text, size = batch["scene"], batch["layout"], batch["target"], batch["text"], batch["size"]
    v = pipe.flow("skeletal", flow_interpolate(m0, layout, t), t, scene, text, size)
    u = pipe.flow("appearance", flow_interpolate(z0, target, s), s, layout, text, size)
    return {
        "heldout_reason_loss": reasoning_loss(v, m0, layout).item(),
        "heldout_render_loss": rendering_loss(u, z0, target).item(),
    }


@torch.no_grad()
def sample_grid(pipe, batch: dict, num_steps: int, limit: int) -> np.ndarray:
    """One picture ``[1, H', W', 3]``: a row per held-out triple (at most ``limit // 6 + 1``) of scene,
    ground-truth layout, planned layout, target, rendered from the ground truth, rendered from the plan."""
    from armature.platform.tracking import image_grid

    triples = batch["triples"][: max(1, math.ceil(limit / 6))]
    scenes = np.stack([t.scene for t in triples])
    prompts = [t.prompt for t in triples]
    truth = np.stack([t.layout for t in triples])
    masks = [t.person_mask for t in triples]
    planned = pipe.plan(scenes, prompts, seed=0, num_steps=num_steps)
    from_truth = pipe.render(scenes, truth, prompts, masks, seed=0, num_steps=num_steps)
    from_plan = pipe.render(scenes, planned, prompts, masks, seed=0, num_steps=num_steps)
    rows = np.stack([scenes, truth, planned, np.stack([t.target for t in triples]), from_truth, from_plan], 1)
    return image_grid(rows.reshape(-1, *rows.shape[2:]), columns=6)[None]


if __name__ == "__main__":  # = `armature train algo=skeleguide model=tiny_skeleguide [overrides]`
    import sys

    from armature.platform.config import ConfigError, compose

    try:
        composed = compose("train", ["algo=skeleguide", "model=tiny_skeleguide", *sys.argv[1:]])
    except ConfigError as err:
        sys.exit(f"armature: {err}")
    result = run(composed)
    print(
        f"[armature] done: epoch {int(result.get('epoch', -1)) + 1}, held-out reason "
        f"{result.get('heldout_reason_loss', float('nan')):.4f} render {result.get('heldout_render_loss', float('nan')):.4f}",
        flush=True,
    )
