"""Reward-gradient fine-tuning on Ray: AlignProp, DRaFT-K and ReFL, one learner.

The objective is the reward itself, maximised by backpropagation through the sampler
(``armature/policies/grad_sampling.py`` has the math)::

    loss = -reward_scale * mean_b r(D(x_0^b), c_b)

* ``algo=alignprop`` (Prabhudesai et al., 2023): gradients through the last K denoising steps,
  K drawn per micro-batch uniformly from ``[algo.truncation_min, algo.truncation_max]``
  (randomized truncated backpropagation), each UNet call checkpointed
  (``algo.gradient_checkpointing``).
* ``algo=draft`` (DRaFT-K, Clark et al., 2023): the same with a fixed K (equal bounds).
* ``algo=refl`` (ReFL, Xu et al., 2023): ``algo.predict_x0=true``: the chain stops at the K-th
  step from the end and the reward scores that step's one-step prediction of x_0.

The reward runs inside the learner process, frozen (its weights get no gradient); it must be
differentiable (``reward=brightness``, ``colorfulness``, ``aesthetic``), which the driver checks
before starting anything. There are no sampler or reward actors: sampling is the forward pass.

Read top to bottom: ``run`` (the driver) checks the reward, connects to Ray, opens the MLflow
run and hands ``TorchTrainer`` the learner loop. ``train_loop`` (each Ray Train worker) builds
the policy and the reward, wraps the trainable weights (the LoRA adapter) with DeepSpeed,
restores the last checkpoint if there is one, then per epoch runs ``algo.batches_per_epoch``
micro-batches of sample-with-gradients / reward / backward, logs the epoch to MLflow (rank 0)
and reports a checkpoint. A rerun with the same ``tracking.run_name`` resumes.

DDPO's helpers (prompts, all-reduce, checkpoint and restore, gradient norm) are reused from
``armature/jobs/ddpo.py``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from armature.jobs.ddpo import _all_reduce_mean, _prompt_list
from armature.platform.checkpoints import commit_epoch, restore_checkpoint
from armature.platform.engine import deepspeed_engine, grad_norm


def build_reward(c: dict):
    """The job's reward, refused with a message naming ``reward.components`` if not differentiable."""
    from armature.rewards import load_weighted, require_differentiable

    reward = load_weighted(c["reward"]["components"])
    return require_differentiable(reward, "reward.components", f"algo={c['algo']['name']}")


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Run an AlignProp / DRaFT-K / ReFL job as configured; returns the last epoch's metrics."""
    from ray.train.torch import TorchTrainer

    from armature.platform.launch import fit, open_run, trainer_kwargs

    # Fail now, before Ray starts, if the reward cannot be backpropagated.
    build_reward(OmegaConf.to_container(cfg, resolve=True))
    job = open_run(cfg, cfg.trainer.num_workers * cfg.trainer.cpus_per_worker)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": job.cfg, "run_id": job.run_id, "tracking_uri": job.tracking_uri,
                           "threads": job.threads},
        **trainer_kwargs(job),
    )
    return fit(trainer, job)


# ============================================================================ learner
def train_loop(config: dict) -> None:
    import ray.train

    from armature.platform.tracking import RunLogger
    from armature.policies import build_policy
    from armature.policies.grad_sampling import decode_with_grad, sample_with_grad

    c = config["cfg"]
    algo, trainer_cfg = c["algo"], c["trainer"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(trainer_cfg["seed"] + rank)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])

    policy = build_policy(c["model"], c["sampling"], seed=trainer_cfg["seed"])
    reward = build_reward(c)  # frozen: its weights have requires_grad=False
    micro = algo["batch_size"]
    engine, optimizer, params = deepspeed_engine(policy, algo, trainer_cfg, algo["gradient_accumulation_batches"],
                                                 micro_batch=micro)
    policy.denoiser = engine  # the sampler's UNet calls go through DeepSpeed

    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    start_epoch, _, _ = restore_checkpoint(engine, logger)
    prompts = _prompt_list(c["prompts"])
    unlogged: list[tuple[int, dict]] = []
    for epoch in range(start_epoch, algo["num_epochs"]):
        t_epoch = time.perf_counter()
        engine.module.train()
        rng = np.random.default_rng([trainer_cfg["seed"], epoch, rank])
        generator = torch.Generator(device=policy.device).manual_seed(int(rng.integers(2**31)))
        rewards, sampled_rewards, losses, ks, grad_norms, images = [], [], [], [], [], []
        for _ in range(algo["batches_per_epoch"]):
            batch_prompts = [prompts[i] for i in rng.integers(len(prompts), size=micro)]
            k = int(rng.integers(algo["truncation_min"], algo["truncation_max"] + 1))
            cond = policy.encode(batch_prompts)
            noise = torch.randn((micro,) + policy.latent_shape, generator=generator, device=policy.device,
                                dtype=policy.unet.dtype) * policy.scheduler.init_noise_sigma
            sample = sample_with_grad(
                policy, cond, noise, k, checkpoint=algo["gradient_checkpointing"],
                predict_x0=algo["predict_x0"], complete=algo["predict_x0"], generator=generator,
            )
            scores = reward.score_tensor(sample.images, batch_prompts)
            loss = -algo["reward_scale"] * scores.mean()
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            norm = grad_norm(params) if boundary else None
            engine.step()
            if boundary:
                grad_norms.append(engine.get_global_grad_norm() or norm)
            rewards.append(scores.detach().cpu())
            losses.append(loss.item())
            ks.append(k)
            final = sample.images.detach()
            if sample.final_latents is not None:  # ReFL: also the reward of the full chain's images
                with torch.no_grad():
                    final = decode_with_grad(policy, sample.final_latents)
                    sampled_rewards.append(reward.score_tensor(final, batch_prompts).cpu())
            images.append(final.cpu())

        scores = torch.cat(rewards).numpy()
        sampled = torch.cat(sampled_rewards).numpy() if sampled_rewards else scores
        local = {"reward_mean": float(scores.mean()), "sampled_reward_mean": float(sampled.mean()),
                 "loss": float(np.mean(losses)), "backprop_steps": float(np.mean(ks))}
        metrics = {
            "epoch": epoch,
            **_all_reduce_mean(local),
            "reward_std": float(scores.std()),
            "grad_norm": float(np.nanmean(grad_norms)) if grad_norms else float("nan"),
            "learning_rate": optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        metrics["samples_per_s"] = algo["batches_per_epoch"] * micro / metrics["epoch_time_s"]
        if logger is not None:
            every = c["tracking"]["log_images_every"]
            if every and epoch % every == 0:
                grid = (torch.cat(images).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
                logger.log_images(grid[: c["tracking"]["images_per_grid"]], f"samples/epoch_{epoch:04d}.png")
            print(f"[armature] {algo['name']} epoch {epoch + 1}/{algo['num_epochs']}  reward "
                  f"{metrics['reward_mean']:+.4f} ± {metrics['reward_std']:.4f}  sampled "
                  f"{metrics['sampled_reward_mean']:+.4f}  K {metrics['backprop_steps']:.1f}  "
                  f"{metrics['epoch_time_s']:.1f}s", flush=True)
        last = epoch + 1 == algo["num_epochs"]
        checkpoint = last or (epoch + 1) % trainer_cfg["checkpoint_every"] == 0
        unlogged = commit_epoch(engine, logger, epoch, metrics, unlogged, rank, checkpoint)

    if logger is not None:
        with tempfile.TemporaryDirectory() as tmp:
            policy.save_trainable(Path(tmp) / "adapter", metadata={"model": c["model"], "sampling": c["sampling"]})
            logger.log_artifacts(Path(tmp) / "adapter", "adapter")
            logger.log_text(json.dumps(c, indent=2, default=str), "config.json")
