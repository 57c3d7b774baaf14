"""Reward-gradient fine-tuning on Ray: AlignProp, DRaFT-K and ReFL, one learner.

The objective is the reward itself, maximised by backpropagation through the sampler
(``armature/policies/grad_sampling.py`` has the math)::

    loss = -reward_scale * mean_b r(D(x_0^b), c_b)  [+ beta * KL to the base policy]

* ``algo=alignprop`` (Prabhudesai et al., 2023): gradients through the last K denoising steps,
  K drawn per micro-batch uniformly from ``[algo.truncation_min, algo.truncation_max]``
  (randomized truncated backpropagation), each UNet call checkpointed
  (``algo.gradient_checkpointing``).
* ``algo=draft`` (DRaFT-K, Clark et al., 2023): the same with a fixed K (equal bounds).
* ``algo=refl`` (ReFL, Xu et al., 2023): ``algo.predict_x0=true``: the chain stops at the K-th
  step from the end and the reward scores that step's one-step prediction of x_0.
* ``refresh.every`` > 0: the on-policy reward refresh (``armature.feedback.refresh``), done in this
  process: the policy draws the pairs, the learned reward here is fine-tuned on their labels.
* ``algo.beta`` > 0: a KL penalty to the base policy, which these learners otherwise lack: at each
  backpropagated step the base network (the adapter switched off, or a frozen copy under full
  fine-tuning) predicts from the same latents, and ``beta`` times the mean squared gap of the
  two predictions (``armature.losses.noise_gap``, DPOK's per-step KL bound) joins the loss.

The reward runs inside the learner process, frozen (its weights get no gradient); it must be
differentiable (``reward=brightness``, ``colorfulness``, ``aesthetic``, ``learned``), which the
driver checks before starting anything. Components at weight 0 are monitors, as in every learner:
never backpropagated (so they need not be differentiable, e.g. the gym's oracle), scored on each
epoch's final images and logged (``reward_<name>_mean``; the over-optimisation curve at the end).
There are no sampler or reward actors: sampling is the forward pass.

Read top to bottom: ``run`` checks the reward, then hands the learner core's driver
(``armature.platform.learner``) the learner loop. ``train_loop`` (each Ray Train worker): a
``Worker`` builds the policy, wraps the trainable weights (the LoRA adapter) with DeepSpeed and
restores the last checkpoint if there is one; the job builds the reward, then per epoch runs
``algo.batches_per_epoch`` micro-batches of sample-with-gradients / reward / backward, and the
worker checkpoints, then logs. A rerun with the same ``tracking.run_name`` resumes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from armature.platform.algorithms import Algorithm, register
from armature.platform.config import OptimizerConfig, TrainConfig
from armature.platform.engine import all_reduce_mean
from armature.platform.learner import Worker, prompt_list, reward_metrics, run_learner
from armature.platform.overoptimisation import monitors


# ============================================================================ config
@dataclass
class AlignPropConfig(OptimizerConfig):
    """Reward-gradient learners (armature/jobs/alignprop.py): AlignProp, DRaFT-K and ReFL."""

    name: str = "alignprop"  # alignprop | draft | refl (one learner, three settings)
    num_epochs: int = 10
    batches_per_epoch: int = 4  # micro-batches per worker per epoch
    batch_size: int = 4  # images per micro-batch on one worker
    gradient_accumulation_batches: int = 1  # micro-batches per optimizer step
    # K, the steps the gradient passes through, drawn per micro-batch uniformly from
    # [truncation_min, truncation_max] (AlignProp); equal bounds: DRaFT-K's fixed K
    truncation_min: int = 1
    truncation_max: int = 10
    predict_x0: bool = False  # ReFL: reward on the predicted x0 of the K-th step from the end
    gradient_checkpointing: bool = True  # recompute each backpropagated UNet call
    reward_scale: float = 1.0  # loss = -reward_scale * reward
    # + beta * noise_gap to the base policy on the backpropagated steps, one more forward pass each (0: off)
    beta: float = 0.0


def check(cfg: DictConfig) -> list[str]:
    """K within the sampling steps; batch sizes."""
    algo, errors = cfg.algo, []
    if not 1 <= algo.truncation_min <= algo.truncation_max <= cfg.sampling.num_steps:
        errors.append(
            f"algo.truncation_min={algo.truncation_min}, algo.truncation_max={algo.truncation_max}: "
            f"need 1 <= truncation_min <= truncation_max <= sampling.num_steps={cfg.sampling.num_steps}"
        )
    if algo.batch_size < 1 or algo.batches_per_epoch < 1 or algo.gradient_accumulation_batches < 1:
        errors.append("algo.batch_size, algo.batches_per_epoch and algo.gradient_accumulation_batches must be >= 1")
    if algo.beta < 0:
        errors.append(f"algo.beta={algo.beta}: the KL penalty's weight must be >= 0 (0: off), e.g. 10")
    return errors


def build_reward(c: TrainConfig | DictConfig):
    """``(trained, monitors)``: the weighted sum of the components with a weight, refused with a
    message naming ``reward.components`` if not differentiable, and the weight-0 components (a
    reward whose ``components`` are logged; None when there are none)."""
    from armature.rewards import load_weighted, require_differentiable

    components = dict(c.reward.components)
    watched = monitors(components)
    trained = {name: options for name, options in components.items() if name not in watched}
    if not trained:
        raise ValueError(
            "reward.components: every component has weight 0 (a monitor); give the reward to train on a weight"
        )
    reward = require_differentiable(load_weighted(trained), "reward.components", f"algo={c.algo.name}")
    return reward, (load_weighted({name: components[name] for name in watched}) if watched else None)


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Run an AlignProp / DRaFT-K / ReFL job as configured; returns the last epoch's metrics."""
    # Fail now, before Ray starts, if the reward cannot be backpropagated.
    build_reward(cfg)
    return run_learner(cfg, train_loop)


register(*(Algorithm(name, AlignPropConfig, run, check, refresh=True) for name in ("alignprop", "draft", "refl")))


# ============================================================================ learner
def train_loop(config: dict) -> None:
    from armature.feedback.refresh import InProcess, attach_refresh
    from armature.policies.grad_sampling import decode_with_grad, sample_with_grad

    w = Worker(config)
    c, algo, rank = w.c, w.algo, w.rank
    policy = w.build_policy()
    reward, watch = build_reward(c)  # frozen: its weights have requires_grad=False
    micro = algo.batch_size
    # The KL reference (algo.beta > 0): the network with its adapter off, or a frozen full copy.
    reference = None
    if algo.beta > 0:
        frozen = copy.deepcopy(policy.unet).requires_grad_(False).eval() if policy.lora is None else None

        def reference(cond, x, t):
            with policy.reference(frozen):
                return policy.predict(cond, x, t)

    # refresh.* (off by default): the reward fine-tuned on the policy's own samples, here in-process
    attach_refresh(w, in_process=InProcess(policy, reward, c.sampling.batch_size))
    engine = w.start(policy, algo.gradient_accumulation_batches, micro_batch=micro)  # the sampler's calls too
    prompts = prompt_list(c.prompts)
    for epoch in range(w.start_epoch, algo.num_epochs):
        t_epoch = time.perf_counter()
        engine.module.train()
        rng = np.random.default_rng([w.seed, epoch, rank])
        generator = torch.Generator(device=policy.device).manual_seed(int(rng.integers(2**31)))
        rewards, sampled_rewards, losses, ks, kls, images, watched = [], [], [], [], [], [], []
        for _ in range(algo.batches_per_epoch):
            batch_prompts = [prompts[i] for i in rng.integers(len(prompts), size=micro)]
            k = int(rng.integers(algo.truncation_min, algo.truncation_max + 1))
            cond = policy.encode(batch_prompts)
            noise = (
                torch.randn(
                    (micro,) + policy.latent_shape, generator=generator, device=policy.device, dtype=policy.unet.dtype
                )
                * policy.scheduler.init_noise_sigma
            )
            sample = sample_with_grad(
                policy,
                cond,
                noise,
                k,
                checkpoint=algo.gradient_checkpointing,
                predict_x0=algo.predict_x0,
                complete=algo.predict_x0,
                generator=generator,
                reference=reference,
            )
            scores = reward.score_tensor(sample.images, batch_prompts)
            loss = -algo.reward_scale * scores.mean()
            if sample.kl is not None:
                loss = loss + algo.beta * sample.kl
                kls.append(sample.kl.item())
            w.step(loss)
            rewards.append(scores.detach().cpu())
            losses.append(loss.item())
            ks.append(k)
            final = sample.images.detach()
            if sample.final_latents is not None:  # ReFL: also the reward of the full chain's images
                with torch.no_grad():
                    final = decode_with_grad(policy, sample.final_latents)
                    sampled_rewards.append(reward.score_tensor(final, batch_prompts).cpu())
            images.append(final.cpu())
            if watch is not None:  # monitors: logged, never trained on
                watched.append(watch.components(to_pil(final), batch_prompts))

        scores = torch.cat(rewards).numpy()
        sampled = torch.cat(sampled_rewards).numpy() if sampled_rewards else scores
        local = {
            "reward_mean": float(scores.mean()),
            "sampled_reward_mean": float(sampled.mean()),
            "loss": float(np.mean(losses)),
            "backprop_steps": float(np.mean(ks)),
        }
        if kls:
            local["kl"] = float(np.mean(kls))
        if watched:
            local.update(reward_metrics({k: np.concatenate([s[k] for s in watched]) for k in watched[0]}))
        metrics = {
            "epoch": epoch,
            **all_reduce_mean(local),
            "reward_std": float(scores.std()),
            **w.optimizer_metrics(),
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        metrics["samples_per_s"] = algo.batches_per_epoch * micro / metrics["epoch_time_s"]
        grid = lambda images=images: (torch.cat(images).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # noqa: E731
        if w.end_epoch(epoch, metrics, grid, progress=_print_progress):
            break  # the over-optimisation guard (guard.*) or trainer.time_budget_s stopped the run

    w.finish(policy)


def to_pil(images: torch.Tensor) -> list:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> PIL images."""
    from PIL import Image

    arrays = (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def _print_progress(epoch: int, total: int, m: dict) -> None:
    print(
        f"[armature] epoch {epoch + 1}/{total}  reward {m['reward_mean']:+.4f} ± {m['reward_std']:.4f}  sampled "
        f"{m['sampled_reward_mean']:+.4f}  K {m['backprop_steps']:.1f}  {m['epoch_time_s']:.1f}s",
        flush=True,
    )
