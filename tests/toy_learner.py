"""A learner kept outside the package, as a team would add one: its config, its loss (pure), its
update, registered by name. It fits the tiny policy's denoiser to one fixed batch of noise, which
a working learner core must make easier epoch after epoch.

Registered on import; `armature train` finds it through ``ARMATURE_ALGORITHMS=toy_learner`` and
its yaml through ``hydra.searchpath=[file://.../tests/toy_configs]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from armature.platform.algorithms import Algorithm, register
from armature.platform.config import OptimizerConfig
from armature.platform.learner import Worker, run_learner


@dataclass
class ToyConfig(OptimizerConfig):
    name: str = "toy"
    num_epochs: int = 2
    steps_per_epoch: int = 2
    train_batch_size: int = 4


def check(cfg: DictConfig) -> list[str]:
    if cfg.algo.steps_per_epoch < 1:
        return [f"algo.steps_per_epoch={cfg.algo.steps_per_epoch}: must be >= 1"]
    return []


def toy_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the denoiser's prediction (what ``losses/`` would hold)."""
    return (predicted.float() - target.float()).pow(2).mean()


def run(cfg: DictConfig) -> dict:
    return run_learner(cfg, train_loop)


def train_loop(config: dict) -> None:
    w = Worker(config)
    algo = w.algo
    policy = w.build_policy()
    engine = w.start(policy, accumulation=1)
    g = torch.Generator().manual_seed(w.seed)
    x = torch.randn((algo.train_batch_size,) + policy.latent_shape, generator=g)
    t = torch.full((algo.train_batch_size,), 500)
    with torch.no_grad():
        cond = policy.encode(["a toy"] * algo.train_batch_size)
    for epoch in range(w.start_epoch, algo.num_epochs):
        start, losses = time.perf_counter(), []
        engine.module.train()
        for _ in range(algo.steps_per_epoch):
            loss = toy_loss(policy.predict(cond, x, t), torch.zeros_like(x))
            w.step(loss)
            losses.append(loss.item())
        metrics = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            **w.optimizer_metrics(),
            "epoch_time_s": time.perf_counter() - start,
        }
        w.end_epoch(epoch, metrics, progress=lambda e, n, m: print(f"[toy] epoch {e + 1}/{n} loss {m['loss']:.5f}"))
    w.finish(policy)


register(Algorithm("toy", ToyConfig, run, check, result=lambda m: f"toy loss {m['loss']:.5f}"))
