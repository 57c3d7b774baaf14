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

Runs under Ray Train + DeepSpeed like the other learners; DDPO's helpers are reused.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from armature.jobs.ddpo import _all_reduce_mean, _prompt_list
from armature.platform.checkpoints import commit_epoch, restore_checkpoint
from armature.platform.engine import deepspeed_engine


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Build the reward-labelled set, train the adapter, compare sampling with and without the
    identifier as negative prompt; returns the last metrics."""
    import ray
    from ray.train.torch import TorchTrainer

    from armature.actors import start_reward_actors, start_samplers
    from armature.actors.best_of_n import best_of_n
    from armature.platform.launch import fit, open_run, trainer_kwargs
    from armature.rewards.selection import hps_select

    cluster, reward = cfg.cluster, cfg.reward
    job = open_run(cfg, max(cfg.trainer.num_workers * cfg.trainer.cpus_per_worker,
                            cluster.num_samplers * cluster.sampler_num_cpus + reward.num_actors * reward.num_cpus))
    c, algo = job.cfg, job.cfg["algo"]
    sampling = {**c["sampling"], "guidance_scale": 1.0}  # the data: the base model's own samples
    samplers = start_samplers(
        cluster.num_samplers, c["model"], sampling, seed=c["trainer"]["seed"], num_cpus=cluster.sampler_num_cpus,
        num_gpus=cluster.sampler_num_gpus, max_restarts=cluster.max_restarts, threads=job.threads,
        resources=c["cluster"]["sampler_resources"], scheduling=cluster.actor_scheduling,
    )
    rewards = start_reward_actors(
        reward.num_actors, c["reward"]["components"], num_cpus=reward.num_cpus, num_gpus=reward.num_gpus,
        max_restarts=cluster.max_restarts, resources=c["reward"]["resources"], scheduling=cluster.actor_scheduling,
    )
    try:
        groups = best_of_n(samplers, rewards, _prompt_list(c["prompts"]) * algo["repeats"], algo["candidates"],
                           seed=c["trainer"]["seed"], batch_size=c["sampling"]["batch_size"], keep_latents=True)
    finally:
        for actor in samplers + rewards:
            ray.kill(actor)
    preferred, rejected = hps_select(groups.scores, algo["alpha"], algo["score_scale"])
    # The sampled latents themselves are the training targets: no VAE round trip (which a random
    # tiny VAE does not invert, and which is near the identity for a real one).
    latents, captions, labels = [], [], []
    for i, prompt in enumerate(groups.prompts):
        if preferred[i] >= 0:
            latents.append(groups.latents[i, preferred[i]]), captions.append(prompt), labels.append(1)
        if rejected[i] >= 0:
            latents.append(groups.latents[i, rejected[i]]), captions.append(f"{algo['identifier']} {prompt}")
            labels.append(0)
    if len(latents) < c["trainer"]["num_workers"] * algo["train_batch_size"]:
        raise ValueError(
            f"algo.alpha={algo['alpha']}, algo.score_scale={algo['score_scale']}: only {len(latents)} images passed "
            "HPS's selectivity test; lower algo.alpha, raise algo.score_scale or algo.repeats")
    data = {"latents": np.stack(latents), "captions": captions, "labels": np.array(labels)}
    print(f"[armature] hps_prefix: {sum(labels)} preferred and {len(labels) - sum(labels)} non-preferred images "
          f"of {groups.scores.size} candidates", flush=True)

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": c, "data": data, "run_id": job.run_id, "tracking_uri": job.tracking_uri,
                           "threads": job.threads,
                           "data_metrics": {"data_preferred": float(sum(labels)),
                                            "data_non_preferred": float(len(labels) - sum(labels)),
                                            "data_candidates": float(groups.scores.size),
                                            "data_reward_mean": float(groups.scores.mean())}},
        **trainer_kwargs(job),
    )
    return fit(trainer, job)


# ============================================================================ learner
def train_loop(config: dict) -> None:
    import ray.train

    from armature.platform.tracking import RunLogger
    from armature.policies import build_policy
    from armature.rewards import load_weighted

    c, data = config["cfg"], config["data"]
    algo, trainer_cfg = c["algo"], c["trainer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(trainer_cfg["seed"] + rank)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])

    policy = build_policy(c["model"], {**c["sampling"], "guidance_scale": 1.0}, seed=trainer_cfg["seed"])
    reward = load_weighted(c["reward"]["components"])
    micro = algo["train_batch_size"]
    engine, optimizer, params = deepspeed_engine(policy, algo, trainer_cfg, algo["gradient_accumulation_batches"])
    policy.denoiser = engine

    # This worker's shard: x0 = the sampled latents, c = the caption embeddings (encoded once).
    shard = np.arange(rank, len(data["captions"]), world)
    latents = torch.from_numpy(data["latents"][shard]).to(policy.device, policy.unet.dtype)
    with torch.no_grad():
        cond = policy.encode([data["captions"][i] for i in shard])

    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    start_epoch, _, _ = restore_checkpoint(engine, logger)
    if start_epoch == 0 and logger is not None:
        logger.log_metrics({**config["data_metrics"], **_compare(policy, reward, c, prefix="base_")}, step=0)
    unlogged: list[tuple[int, dict]] = []
    for epoch in range(start_epoch, algo["num_epochs"]):
        t_epoch = time.perf_counter()
        engine.module.train()
        g = torch.Generator().manual_seed(trainer_cfg["seed"] * 100003 + epoch * 101 + rank)
        losses = []
        for mb in torch.randperm(len(shard), generator=g).split(micro):
            x0 = latents[mb]
            noise = torch.randn(x0.shape, generator=g).to(x0)
            t = torch.randint(0, policy.scheduler.config.num_train_timesteps, (len(mb),), generator=g).to(policy.device)
            noisy = policy.scheduler.add_noise(x0, noise, t)
            batch_cond = {k: v[mb] for k, v in cond.items()}
            loss = torch.nn.functional.mse_loss(policy.predict(batch_cond, noisy, t).float(), noise.float())
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        metrics = {"epoch": epoch, **_all_reduce_mean({"loss": float(np.mean(losses))}),
                   "epoch_time_s": time.perf_counter() - t_epoch}
        last = epoch + 1 == algo["num_epochs"]
        if last and rank == 0:
            metrics.update(_compare(policy, reward, c))
            metrics["reward_mean"] = metrics["reward_with_identifier"]
        if logger is not None:
            extra = (f"  reward with identifier {metrics['reward_with_identifier']:+.4f}, with identifier + prompt "
                     f"{metrics['reward_with_identifier_prompt']:+.4f}, without {metrics['reward_without_identifier']:+.4f}"
                     ) if "reward_with_identifier" in metrics else ""
            print(f"[armature] hps_prefix epoch {epoch + 1}/{algo['num_epochs']}  loss {metrics['loss']:.4f}{extra}",
                  flush=True)
        checkpoint = last or (epoch + 1) % trainer_cfg["checkpoint_every"] == 0
        unlogged = commit_epoch(engine, logger, epoch, metrics, unlogged, rank, checkpoint)

    if logger is not None:
        with tempfile.TemporaryDirectory() as tmp:
            policy.save_trainable(Path(tmp) / "adapter", metadata={
                "model": c["model"], "sampling": c["sampling"], "negative_prompt": algo["identifier"]})
            logger.log_artifacts(Path(tmp) / "adapter", "adapter")
            logger.log_text(json.dumps(c, indent=2, default=str), "config.json")


@torch.no_grad()
def _compare(policy, reward, c: dict, prefix: str = "") -> dict[str, float]:
    """Mean reward of samples with the identifier as negative prompt and without (empty negative
    prompt), the same prompts and seeds for each; and the mean paired difference.

    Two negatives are evaluated: the identifier alone (HPS's choice, ``reward_with_identifier``)
    and the identifier followed by the prompt (``reward_with_identifier_prompt``): exactly the
    captions the non-preferred images were trained with, which matters for a small text encoder.
    """
    from PIL import Image

    from armature.policies import SamplingParams

    algo, identifier = c["algo"], c["algo"]["identifier"]
    negatives = {"without_identifier": lambda p: "", "with_identifier": lambda p: identifier,
                 "with_identifier_prompt": lambda p: f"{identifier} {p}"}
    saved, out = policy.sampling, {name: [] for name in negatives}
    policy.unet.eval()
    try:
        for i, prompt in enumerate(_prompt_list(c["prompts"])):
            prompts = [prompt] * algo["eval_repeats"]
            for name, negative in negatives.items():
                policy.sampling = SamplingParams(
                    num_steps=c["sampling"]["num_steps"], eta=c["sampling"]["eta"],
                    guidance_scale=algo["eval_guidance_scale"], negative_prompt=negative(prompt))
                generator = torch.Generator(device=policy.device).manual_seed(algo["eval_seed"] + i)
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
