"""`armature gym pretrain`: the anatomy gym's base policy, trained from scratch on CPU.

The gym needs a text-to-image policy that draws its figures well enough for the oracle to read
them, and wrongly often enough for RL to have something to fix (issue 8 aims at a severe-error
rate of 15-40 %). This recipe makes one, in a few minutes per stage, with the tiny
Stable-Diffusion-shaped pipeline of :mod:`armature.policies.tiny` (real diffusers classes):

1. **Data**: ``images`` rendered figures (:mod:`armature.gym.figures`), the pose prompt of each;
   a share ``defect_share`` of them carries one injected defect (:mod:`armature.gym.defects`),
   so the policy learns anatomical mistakes at a known rate, as a model trained on web images
   learns them from the bad drawings among its data.
2. **VAE**: an ``AutoencoderTiny`` (TAESD's architecture: convolutions and ReLUs, one 2x
   downsampling) trained as an autoencoder on random 32 px crops (L1 + MSE on pixels, a small
   penalty on the latents' size), then its latent scale set to make the latents unit-variance,
   as SD's 0.18215 does. SD's ``AutoencoderKL`` at this size loses the figures' flat colours
   to its GroupNorm layers: none of its round trips passed the oracle after 700 steps, against
   72 % for this one after 1,500 (the earlier palette and oracle). With the colour-cube palette and
   4 px limbs of :mod:`armature.gym.figures`, this recipe's 2,000 steps pass 99 %.
3. **UNet**: the standard epsilon-prediction denoising loss (DDPM, the scheduler's betas) on the
   encoded dataset, prompts through the frozen tiny CLIP text encoder, 10 % of them dropped to
   the empty prompt (so classifier-free guidance works), an EMA of the weights kept and saved.
4. **Measure**: sample ``eval_per_prompt`` images per gym prompt with the sampler the RL jobs use
   (DDIM, ``eval_steps`` steps, ``eval_eta``) and judge them with the oracle.

The result is a diffusers folder (``StableDiffusionPipeline.save_pretrained``, weights stored in
float16 to stay small) that ``model=gym`` loads; ``stats.json`` beside it records the recipe and
the measured rates. Pure torch, in-process: it is one model on one machine's cores.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from armature.policies.tiny import TinySDConfig, build_tiny_sd_pipeline


@dataclass
class PretrainConfig:
    seed: int = 0
    images: int = 12000
    defect_share: float = 0.2  # share of training figures with one injected defect
    vae_steps: int = 2000
    vae_crop: int = 32  # train the autoencoder on random crops of this size (0: whole images)
    unet_steps: int = 4000
    batch_size: int = 32
    vae_lr: float = 3e-3
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    uncond_share: float = 0.1  # prompts dropped to "" (classifier-free guidance)
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    vae_kind: str = "taesd"  # AutoencoderTiny: no normalisation layers, flat colours survive
    vae_channels: list[int] = field(default_factory=lambda: [32, 32])  # one downsampling: 32x32 latents
    latent_channels: int = 4
    time_budget_s: float = 1800.0  # the UNet stage stops early to keep the whole run within it
    eval_per_prompt: int = 16
    eval_steps: int = 20
    eval_eta: float = 1.0
    threads: int = 0  # torch threads; 0 keeps torch's default


def tiny_config(cfg: PretrainConfig) -> TinySDConfig:
    from armature.gym.figures import SIZE

    return TinySDConfig(
        seed=cfg.seed,
        image_size=SIZE,
        unet_channels=tuple(cfg.unet_channels),
        vae_channels=tuple(cfg.vae_channels),
        latent_channels=cfg.latent_channels,
        vae_kind=cfg.vae_kind,
    )


def render_dataset(n: int, defect_share: float, seed: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``n`` figures as ``[n, 64, 64, 3]`` uint8, their prompts, and their true severities."""
    from armature.gym.defects import sample_defective, severity
    from armature.gym.figures import render, sample_figure

    rng = np.random.default_rng(seed)
    images, prompts, severities = [], [], []
    for _ in range(n):
        if rng.random() < defect_share:
            _, figure = sample_defective(rng)
        else:
            figure = sample_figure(rng)
        images.append(render(figure))
        prompts.append(figure.prompt)
        severities.append(severity(figure.defects))
    return np.stack(images), prompts, np.array(severities)


def _to_pixels(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, images: np.ndarray, cfg: PretrainConfig, log) -> float:
    """Autoencoder training; returns the final L1 in [0, 255] pixel units."""
    from armature.data.stream import encode_mean

    rng = np.random.default_rng(cfg.seed + 1)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    l1, crop = float("nan"), cfg.vae_crop or images.shape[1]
    for step in range(cfg.vae_steps):
        # Random crops (the autoencoder is convolutional, without attention or normalisation):
        # a quarter of the pixels per image at crop 32, four times the steps for the same time.
        y0, x0 = rng.integers(0, images.shape[1] - crop + 1, 2) // 2 * 2
        x = _to_pixels(images[rng.integers(len(images), size=cfg.batch_size)][:, y0 : y0 + crop, x0 : x0 + crop])
        # The mean, not a sample: the diffusion model is trained on the means, and the sampling
        # noise of an untrained posterior (std ~1) would teach the decoder to blur.
        latents = encode_mean(vae, x)
        recon = vae.decode(latents).sample
        l1_t = (recon - x).abs().mean()
        loss = l1_t + (recon - x).pow(2).mean() + 1e-4 * latents.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        l1 = l1_t.item() * 127.5
        if step % 200 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}: L1 {l1:.2f} / 255")
    vae.eval().requires_grad_(False)
    return l1


@torch.no_grad()
def encode_dataset(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The latents (posterior means) of every image, unscaled."""
    from armature.data.stream import encode_mean

    out = [encode_mean(vae, _to_pixels(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(out)


def train_unet(
    pipe,
    latents: torch.Tensor,
    prompt_ids: np.ndarray,
    embeddings: torch.Tensor,
    cfg: PretrainConfig,
    deadline: float,
    log,
) -> tuple[torch.nn.Module, dict]:
    """Epsilon-prediction denoising training; returns the EMA UNet and the loss trace."""
    unet, scheduler = pipe.unet, pipe.scheduler
    rng = np.random.default_rng(cfg.seed + 2)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    alphas = scheduler.alphas_cumprod.float()
    unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    warmup, start, budget = 200, time.monotonic(), max(deadline - time.monotonic(), 1.0)

    def lr_at(step: int) -> float:  # warm-up, then a cosine over the steps or the time left, whichever ends first
        progress = min(1.0, max(step / cfg.unet_steps, (time.monotonic() - start) / budget))
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    empty = len(embeddings) - 1  # the last embedding is the empty prompt's
    trace, window, step = [], [], 0
    for step in range(cfg.unet_steps):
        idx = rng.integers(len(latents), size=cfg.batch_size)
        x0 = latents[idx]
        ids = prompt_ids[idx].copy()
        ids[rng.random(cfg.batch_size) < cfg.uncond_share] = empty
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, embeddings[torch.from_numpy(ids)]).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        window.append(loss.item())
        if step % 250 == 0 or step == cfg.unet_steps - 1:
            trace.append((step, float(np.mean(window))))
            log(f"unet step {step}: loss {np.mean(window):.4f}")
            window = []
        if time.monotonic() > deadline:
            log(f"unet: time budget reached after {step + 1} steps")
            break
    unet.eval().requires_grad_(False)
    return ema, {"unet_steps_done": step + 1, "unet_loss": trace}


@torch.no_grad()
def round_trip(vae, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 figures through the VAE's encoder and decoder (the latent mean)."""
    from armature.data.stream import encode_mean

    out = []
    for i in range(0, len(images), batch):
        recon = vae.decode(encode_mean(vae, _to_pixels(images[i : i + batch]))).sample
        out.append(((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def load_round_trip(policy_path: str | Path):
    """The ``transform`` for :func:`armature.gym.agreement`: a round trip through a saved policy's VAE."""
    from armature.data.stream import load_vae

    vae = load_vae({"family": "gym", "pretrained": str(policy_path)})
    return lambda images: round_trip(vae, images)


def reconstruction_pass_rate(vae, seed: int, n: int = 100) -> float:
    """The share of intact figures the oracle still passes after an encode-decode round trip:
    the ceiling of what the policy can draw through this VAE."""
    from armature.gym.oracle import AnatomyOracle

    images, _, _ = render_dataset(n, 0.0, seed)
    oracle = AnatomyOracle()
    return float(np.mean([oracle(image).ok for image in round_trip(vae, images)]))


def measure(policy_path: str | Path, per_prompt: int, num_steps: int, eta: float, seed: int = 1234) -> dict:
    """Sample ``per_prompt`` images for each gym prompt and judge them with the oracle."""
    from armature.gym.figures import POSES
    from armature.gym.oracle import AnatomyOracle
    from armature.policies import SamplingParams, load_policy

    policy = load_policy("sd", str(policy_path), SamplingParams(num_steps=num_steps, guidance_scale=1.0, eta=eta))
    oracle = AnatomyOracle()
    severities, images = [], []
    for k, (prompt, _, _) in enumerate(p for p in POSES.values()):
        gens = [torch.Generator().manual_seed(seed + 1000 * k + i) for i in range(per_prompt)]
        with torch.no_grad():
            batch = policy.rollout([prompt] * per_prompt, gens).images
        severities += [oracle(image).severity for image in batch]
        images.append(batch)
    s = np.array(severities)
    return {
        "samples": int(len(s)),
        "severe_rate": float((s == 3).mean()),
        "any_error_rate": float((s > 0).mean()),
        "mean_severity": float(s.mean()),
        "images": np.concatenate(images),
    }


def pretrain(cfg: PretrainConfig, out: str | Path, log=print) -> dict:
    """Run the recipe; write the pipeline and ``stats.json`` to ``out``; return the stats."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    start = time.monotonic()
    torch.manual_seed(cfg.seed)
    images, prompts, true_severity = render_dataset(cfg.images, cfg.defect_share, cfg.seed)
    t_data = time.monotonic() - start
    log(
        f"data: {len(images)} figures ({(true_severity == 3).mean():.1%} severe, "
        f"{(true_severity > 0).mean():.1%} with a defect) in {t_data:.0f} s"
    )

    pipe = build_tiny_sd_pipeline(tiny_config(cfg))
    pipe.set_progress_bar_config(disable=True)
    vae_l1 = train_vae(pipe.vae, images, cfg, log)
    t_vae = time.monotonic() - start - t_data
    vae_pass = reconstruction_pass_rate(pipe.vae, cfg.seed + 7)
    log(f"vae: {vae_pass:.1%} of intact figures pass the oracle after a round trip (L1 {vae_l1:.1f} / 255)")
    latents = encode_dataset(pipe.vae, images)
    scale = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    latents = latents * scale

    vocabulary = sorted(set(prompts))
    prompt_ids = np.array([vocabulary.index(p) for p in prompts])
    with torch.no_grad():
        embeddings, _ = pipe.encode_prompt(vocabulary + [""], "cpu", 1, False)
    deadline = start + cfg.time_budget_s - 60.0  # a minute for saving and the measurement
    ema, trace = train_unet(pipe, latents, prompt_ids, embeddings, cfg, deadline, log)
    pipe.unet.load_state_dict(ema.state_dict())
    t_unet = time.monotonic() - start - t_data - t_vae

    out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)
    train_s = time.monotonic() - start
    stats = {
        "config": asdict(cfg),
        "vae_l1": vae_l1,
        "vae_oracle_pass": vae_pass,
        "latent_scale": scale,
        **trace,
        "data_severe_rate": float((true_severity == 3).mean()),
        "data_any_error_rate": float((true_severity > 0).mean()),
        "seconds": {"data": t_data, "vae": t_vae, "unet": t_unet, "total": train_s},
    }
    if cfg.eval_per_prompt:
        result = measure(out, cfg.eval_per_prompt, cfg.eval_steps, cfg.eval_eta)
        stats["eval"] = {k: v for k, v in result.items() if k != "images"}
        _save_grid(result["images"], out / "samples.png", per_row=cfg.eval_per_prompt)
        log(
            f"base policy: severe {stats['eval']['severe_rate']:.1%}, any error {stats['eval']['any_error_rate']:.1%} "
            f"over {stats['eval']['samples']} samples"
        )
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    log(f"pretrained in {train_s / 60:.1f} min -> {out}")
    return stats


def _save_grid(images: np.ndarray, path: Path, per_row: int) -> None:
    from PIL import Image

    rows = [np.concatenate(list(images[i : i + per_row]), axis=1) for i in range(0, len(images), per_row)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
