"""HPS-style preference-prefix LoRA tuning (Wu et al., 2023, "Human Preference Score", sec. 6,
"Adapting Stable Diffusion", fig. 5): ``armature train algo=hps_prefix``.

1. **Data.** For each prompt (``prompts.*``, ``algo.repeats`` times) the sampler actors draw
   ``algo.candidates`` images and the reward actors score them (``reward.components``). The best
   image of a group is kept as *preferred* and the worst as *non-preferred* when they pass HPS's
   selectivity test ``softmax(scale * score) > alpha / n`` (``algo.alpha``, ``algo.score_scale``;
   :func:`armature.rewards.selection.hps_select`).
2. **Training.** LoRA with the plain denoising loss (DDPM's epsilon objective)::

       L = E_{x0, c, t, eps} || eps - eps_theta( sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c ) ||^2

   where the caption ``c`` of a preferred image is its prompt and that of a non-preferred image
   is ``algo.identifier + " " + prompt``: the adapter learns what the identifier means.
3. **Inference.** The identifier becomes the negative prompt of classifier-free guidance
   (``algo.eval_guidance_scale``), steering samples away from non-preferred images. The job
   samples every prompt ``algo.eval_repeats`` times with the same seeds with and without it and
   logs the reward of both (``reward_with_identifier``, ``reward_without_identifier``), before
   training (``base_*``) and after.

Runs on the learner core (``armature.platform.learner``) like the other learners.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from omegaconf import DictConfig

from armature.platform.algorithms import Algorithm, register
from armature.platform.config import OptimizerConfig, TrainConfig
from armature.platform.engine import all_reduce_mean
from armature.platform.learner import LoopInputs, Worker, prompt_list, run_learner, stop_actors


# ============================================================================ config
@dataclass
class HPSPrefixConfig(OptimizerConfig):
    """HPS-style preference-prefix LoRA tuning (armature/jobs/hps_prefix.py): `algo=hps_prefix`."""

    name: str = "hps_prefix"
    identifier: str = "Weird image."  # prefix of non-preferred captions; the negative prompt at inference
    candidates: int = 4  # images per prompt group (HPS's n)
    repeats: int = 16  # groups per prompt of prompts.*
    alpha: float = 2.0  # selectivity: keep the best (worst) if softmax(score_scale * score) > alpha / n
    score_scale: float = 100.0  # reward -> logit scale of the softmax
    num_epochs: int = 20
    train_batch_size: int = 16
    gradient_accumulation_batches: int = 1
    adam_weight_decay: float = 1e-2
    eval_repeats: int = 8  # evaluation samples per prompt, with and without the identifier
    eval_guidance_scale: float = 5.0  # classifier-free guidance at evaluation (the identifier needs it > 1)
    eval_seed: int = 1234


def check(cfg: DictConfig) -> list[str]:
    """The selection's sizes and strength; an identifier that guidance can steer away from."""
    algo, errors = cfg.algo, []
    if algo.candidates < 2 or algo.repeats < 1 or algo.eval_repeats < 2 or algo.alpha <= 0:
        errors.append(
            f"algo.candidates={algo.candidates}, algo.repeats={algo.repeats}, algo.eval_repeats="
            f"{algo.eval_repeats}, algo.alpha={algo.alpha}: need candidates >= 2, repeats >= 1, "
            "eval_repeats >= 2, alpha > 0"
        )
    if not algo.identifier.strip() or algo.eval_guidance_scale <= 1:
        errors.append(
            f"algo.identifier={algo.identifier!r}, algo.eval_guidance_scale={algo.eval_guidance_scale}: "
            "the identifier must be non-empty and the guidance scale > 1 (it is the negative prompt)"
        )
    return errors


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Build the reward-labelled set, train the adapter, compare sampling with and without the
    identifier as negative prompt; returns the last metrics."""
    cluster, reward = cfg.cluster, cfg.reward
    # the actors are gone before training starts: the local Ray holds the larger of the two
    required = max(
        cfg.trainer.num_workers * cfg.trainer.cpus_per_worker,
        cluster.num_samplers * cluster.sampler_num_cpus + reward.num_actors * reward.num_cpus,
    )
    return run_learner(
        cfg, train_loop, actors=True, required_cpus=required, prepare=_prepare, actor_sampling={"guidance_scale": 1.0}
    )  # the data: the base model's own samples


register(Algorithm("hps_prefix", HPSPrefixConfig, run, check))


def _prepare(job, samplers: list, rewards: list) -> LoopInputs:
    """Sample and score the candidates, keep HPS's preferred and non-preferred images."""
    from armature.actors.best_of_n import best_of_n
    from armature.rewards.selection import hps_select

    c, algo = job.cfg, job.cfg.algo
    try:
        groups = best_of_n(
            samplers,
            rewards,
            prompt_list(c.prompts) * algo.repeats,
            algo.candidates,
            seed=c.trainer.seed,
            batch_size=c.sampling.batch_size,
            keep_latents=True,
        )
    finally:
        stop_actors(samplers + rewards)
    preferred, rejected = hps_select(groups.scores, algo.alpha, algo.score_scale)
    # The sampled latents themselves are the training targets: no VAE round trip (which a random
    # tiny VAE does not invert, and which is near the identity for a real one).
    latents, captions, labels = [], [], []
    for i, prompt in enumerate(groups.prompts):
        if preferred[i] >= 0:
            latents.append(groups.latents[i, preferred[i]]), captions.append(prompt), labels.append(1)
        if rejected[i] >= 0:
            latents.append(groups.latents[i, rejected[i]]), captions.append(f"{algo.identifier} {prompt}")
            labels.append(0)
    if len(latents) < c.trainer.num_workers * algo.train_batch_size:
        raise ValueError(
            f"algo.alpha={algo.alpha}, algo.score_scale={algo.score_scale}: only {len(latents)} images passed "
            "HPS's selectivity test; lower algo.alpha, raise algo.score_scale or algo.repeats"
        )
    data = {"latents": np.stack(latents), "captions": captions, "labels": np.array(labels)}
    print(
        f"[armature] hps_prefix: {sum(labels)} preferred and {len(labels) - sum(labels)} non-preferred images "
        f"of {groups.scores.size} candidates",
        flush=True,
    )

    return LoopInputs(
        {
            "data": data,
            "data_metrics": {
                "data_preferred": float(sum(labels)),
                "data_non_preferred": float(len(labels) - sum(labels)),
                "data_candidates": float(groups.scores.size),
                "data_reward_mean": float(groups.scores.mean()),
            },
        }
    )


# ============================================================================ learner
def train_loop(config: dict) -> None:
    from armature.rewards import load_weighted

    w = Worker(config)
    c, data, algo, rank, world = w.c, config["data"], w.algo, w.rank, w.world
    policy = w.build_policy(replace(c.sampling, guidance_scale=1.0))
    reward = load_weighted(c.reward.components)
    micro = algo.train_batch_size
    engine = w.start(policy, algo.gradient_accumulation_batches)

    # This worker's shard: x0 = the sampled latents, c = the caption embeddings (encoded once).
    shard = np.arange(rank, len(data["captions"]), world)
    latents = torch.from_numpy(data["latents"][shard]).to(policy.device, policy.unet.dtype)
    with torch.no_grad():
        cond = policy.encode([data["captions"][i] for i in shard])

    if w.start_epoch == 0 and w.logger is not None:
        w.logger.log_metrics({**config["data_metrics"], **_compare(policy, reward, c, prefix="base_")}, step=0)
    for epoch in range(w.start_epoch, algo.num_epochs):
        t_epoch = time.perf_counter()
        engine.module.train()
        g = torch.Generator().manual_seed(w.seed * 100003 + epoch * 101 + rank)
        losses = []
        for mb in torch.randperm(len(shard), generator=g).split(micro):
            x0 = latents[mb]
            noise = torch.randn(x0.shape, generator=g).to(x0)
            t = torch.randint(0, policy.scheduler.config.num_train_timesteps, (len(mb),), generator=g).to(policy.device)
            noisy = policy.scheduler.add_noise(x0, noise, t)
            batch_cond = {k: v[mb] for k, v in cond.items()}
            loss = torch.nn.functional.mse_loss(policy.predict(batch_cond, noisy, t).float(), noise.float())
            w.step(loss)
            losses.append(loss.item())
        metrics = {
            "epoch": epoch,
            **all_reduce_mean({"loss": float(np.mean(losses))}),
            **w.optimizer_metrics(),
            "epoch_time_s": time.perf_counter() - t_epoch,
        }
        last = epoch + 1 == algo.num_epochs
        if last and rank == 0:
            metrics.update(_compare(policy, reward, c))
            metrics["reward_mean"] = metrics["reward_with_identifier"]
        if w.end_epoch(epoch, metrics, progress=_print_progress):
            break  # trainer.time_budget_s spent

    w.finish(policy, negative_prompt=algo.identifier)


def _print_progress(epoch: int, total: int, m: dict) -> None:
    extra = (
        (
            f"  reward with identifier {m['reward_with_identifier']:+.4f}, with identifier + prompt "
            f"{m['reward_with_identifier_prompt']:+.4f}, without {m['reward_without_identifier']:+.4f}"
        )
        if "reward_with_identifier" in m
        else ""
    )
    print(f"[armature] hps_prefix epoch {epoch + 1}/{total}  loss {m['loss']:.4f}{extra}", flush=True)


@torch.no_grad()
def _compare(policy, reward, c: TrainConfig, prefix: str = "") -> dict[str, float]:
    """Mean reward of samples with the identifier as negative prompt and without (empty negative
    prompt), the same prompts and seeds for each; and the mean paired difference.

    Two negatives are evaluated: the identifier alone (HPS's choice, ``reward_with_identifier``)
    and the identifier followed by the prompt (``reward_with_identifier_prompt``): exactly the
    captions the non-preferred images were trained with, which matters for a small text encoder.
    """
    from PIL import Image

    from armature.policies import SamplingParams

    algo, identifier = c.algo, c.algo.identifier
    negatives = {
        "without_identifier": lambda p: "",
        "with_identifier": lambda p: identifier,
        "with_identifier_prompt": lambda p: f"{identifier} {p}",
    }
    saved, out = policy.sampling, {name: [] for name in negatives}
    policy.unet.eval()
    try:
        for i, prompt in enumerate(prompt_list(c.prompts)):
            prompts = [prompt] * algo.eval_repeats
            for name, negative in negatives.items():
                policy.sampling = SamplingParams(
                    num_steps=c.sampling.num_steps,
                    eta=c.sampling.eta,
                    guidance_scale=algo.eval_guidance_scale,
                    negative_prompt=negative(prompt),
                )
                generator = torch.Generator(device=policy.device).manual_seed(algo.eval_seed + i)
                images = policy.rollout(prompts, generator).images
                out[name].append(reward([Image.fromarray(a) for a in images], prompts).astype(np.float64))
    finally:
        policy.sampling = saved
    out = {name: np.concatenate(v) for name, v in out.items()}
    metrics = {f"{prefix}reward_{name}": float(v.mean()) for name, v in out.items()}
    for name in ("with_identifier", "with_identifier_prompt"):
        diff = out[name] - out["without_identifier"]
        gain = name.replace("with_", "") + "_gain"
        metrics[f"{prefix}{gain}"] = float(diff.mean())
        metrics[f"{prefix}{gain}_se"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return metrics
