"""The learners' DeepSpeed engine: AdamW over the policy's trainable weights (the LoRA adapter,
or the whole denoiser when fully fine-tuned), gradient clipping and accumulation, ZeRO stage."""

from __future__ import annotations

import torch

from armature.platform.config import OptimizerConfig, TrainerConfig


def deepspeed_engine(
    policy, algo: OptimizerConfig, trainer_cfg: TrainerConfig, accumulation: int, micro_batch: int | None = None
):
    """``(engine, optimizer, params)`` from ``algo.learning_rate``, ``adam_*``, ``max_grad_norm``
    and ``trainer.zero_stage``; ``micro_batch`` defaults to ``algo.train_batch_size``."""
    import deepspeed

    params = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(
        params,
        lr=algo.learning_rate,
        betas=(algo.adam_beta1, algo.adam_beta2),
        weight_decay=algo.adam_weight_decay,
        eps=algo.adam_epsilon,
    )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=policy.unet,
        model_parameters=params,
        optimizer=optimizer,
        config={
            "train_micro_batch_size_per_gpu": micro_batch or algo.train_batch_size,
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": algo.max_grad_norm,
            "zero_optimization": {"stage": trainer_cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        },
    )
    return engine, optimizer, params


def grad_norm(params) -> float:
    """Norm of the accumulated (all-reduced) gradient held on the parameters, before clipping."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else float("nan")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the Ray Train workers (unchanged with one worker)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}


def all_reduce_sum(value: float) -> float:
    """A value summed over the Ray Train workers (unchanged with one worker)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)
