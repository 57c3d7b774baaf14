"""SkeleGuide in the anatomy gym: does planning an explicit skeleton first lower the error rate?

    python benchmarks/skeleguide.py                         # the default budget: a few minutes on 2 cores
    python benchmarks/skeleguide.py --budget 3000 --eval 128 --lora-targets all --lora-rank 16

Three policies on the same tiny random FLUX-Kontext-style backbone (``SkeleGuidePipeline``: the
same transformer, VAE, text encoders, LoRA rank and targets), the same gym triples
(``armature.skeleton.scenes.triples``: prompt, scene, layout, target, person mask), the same
minibatch order, time draws and sampling seeds, and the same number of optimizer steps
(``--budget``, batch ``--batch``, AdamW at ``--lr``). Only LoRA weights train, as in the paper.
The backbone is random, unless ``--backbone-steps`` pretrains it first (full fine-tuning on text
to image and scene + text to image, no layouts: a tiny stand-in for FLUX Kontext's pretraining;
``--transformer-layers/-heads``, ``--head-dim`` size it), once, shared by all three and outside
the budget. The tiny VAE is
trained as an autoencoder, once, shared by all three and outside the budget: the gym base policy's
(``armature gym pretrain``: an ``AutoencoderTiny``, which keeps the figures' flat colours), or, with
``--vae pretrain`` or when there is none, an ``AutoencoderKL`` pretrained here on the training
images (``--vae-steps``; ``--vae-cache DIR`` keeps it, ``--vae DIR`` reuses it; at this size it
loses the flat colours: the ceiling row below is then all severe). A random VAE does not
reconstruct images at all.

a. **text-to-image**: the appearance adapter, flow matching (eq. 5) from the prompt alone to the
   target image (the condition tokens are a blank image: no scene, no layout).
b. **reason-then-render**: the paper's three phases (``--phases`` shares of the budget), each
   step the training job's own ``armature.jobs.skeleguide.phase_loss`` (run here in-process, no
   Ray, as ``benchmarks/learners.py`` does): the reasoning loss (eq. 4) on the skeletal adapter;
   the joint loss (0.5 reasoning + 1 rendering, the renderer conditioned on the one-step layout
   M_hat from the noise, eq. 6); the rendering loss on the ground-truth layouts.
c. **reason-then-render + RL**: (b)'s schedule on ``1 - --rl-share`` of the budget, then
   DiffusionNFT (``armature.losses.nft``) on stage 1 for the rest: each step plans ``--group``
   layouts per scene, scores them with the ``skeleton`` reward (joint angles, bone ratios,
   symmetry, completeness of the parsed plan), turns the rewards into optimality probabilities
   within each scene's group and takes one on-policy NFT step (the sampling policy is the current
   one, so v_old = v_theta detached) on the skeletal adapter.

Evaluation on ``--eval`` held-out triples (seeds apart from the training ones), each policy
sampling ``--steps`` Euler steps per stage from the same seeds, *without* a person mask (with one,
the pipeline pastes the scene back outside it and background consistency is exact by
construction; without, it measures what the model itself keeps):

* severe / any error: the gym's pixel oracle (``armature.gym.oracle.AnatomyOracle``) on the
  image: severity 3 (a missing, extra or detached head, torso or limb bone) / any defect;
* background PSNR (dB) and SSIM (scikit-image, the SSIM map averaged) outside the person mask,
  against the target (which equals the scene there);
* CLIP score: ``armature.rewards.clip_score`` with a **tiny random CLIP** (``build_tiny_clip``;
  no weights are downloaded), so it exercises the metric, it does not measure text alignment;
* plan reward: the ``skeleton`` reward of the planned layouts (stage 1's own quality);
* wall time: training + evaluation sampling, in this process (``--threads`` torch threads; the
  tiny model runs fastest on one). Encoding the triples (frozen VAE and text encoders) is done
  once and not counted.

Two reference rows: the targets themselves (the oracle passes every one), and the targets
encoded and decoded by the VAE -- the best any of the policies could reach through that VAE: when
the oracle fails those, the comparison says nothing about anatomy yet. The table is Markdown.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from armature.gym.oracle import AnatomyOracle
from armature.losses.nft import nft_loss, optimality_probability
from armature.losses.skeleguide import flow_interpolate, flow_target, rendering_loss
from armature.policies.skeleguide import SkeleGuidePipeline
from armature.skeleton.scenes import triples

METHODS = {"t2i": "text-to-image", "rtr": "reason-then-render", "rtr_rl": "reason-then-render + RL"}


# ----------------------------------------------------------------------------- data
class Encoded:
    """Triples with their latents and prompt embeddings, encoded once (frozen VAE and text encoders)."""

    def __init__(self, pipe: SkeleGuidePipeline, items, chunk: int = 32):
        self.items = items
        self.prompts = [t.prompt for t in items]
        enc = lambda images: torch.cat(
            [
                pipe.encode_images(images[i : i + chunk])  # noqa: E731
                for i in range(0, len(images), chunk)
            ]
        )
        self.scene = enc([t.scene for t in items])
        self.layout = enc([t.layout for t in items])
        self.target = enc([t.target for t in items])
        texts = [pipe.encode_prompts(self.prompts[i : i + chunk]) for i in range(0, len(items), chunk)]
        self.text = {k: torch.cat([t[k] for t in texts]) for k in texts[0]}
        self.blank = pipe.encode_images(np.zeros((1,) + items[0].scene.shape, np.uint8))
        self.size = items[0].scene.shape[:2]

    def __len__(self) -> int:
        return len(self.items)

    def text_of(self, idx) -> dict:
        return {k: v[idx] for k, v in self.text.items()}


def build(args, vae: str | None = None, backbone: dict | None = None) -> SkeleGuidePipeline:
    """A fresh pipeline (the same random weights every time) with the trained VAE folder ``vae``
    and, when given, the pretrained transformer weights ``backbone`` (LoRA adapters fresh)."""
    tiny = {
        "vae_channels": list(args.vae_channels),
        "latent_channels": args.latent_channels,
        "transformer_layers": args.transformer_layers,
        "transformer_heads": args.transformer_heads,
        "head_dim": args.head_dim,
    }
    pipe = SkeleGuidePipeline.build(
        {
            "lora_rank": args.lora_rank,
            "lora_alpha": float(args.lora_rank),
            "lora_targets": args.lora_targets,
            "num_steps": args.steps,
            "tiny": tiny,
            "vae": vae,
        }
    )
    if backbone is not None:
        load_backbone(pipe.transformer, backbone)
    return pipe


def backbone_of(transformer) -> dict:
    """The transformer's own (non-LoRA) weights under the plain module names: peft's
    ``.base_layer`` dropped, so the same backbone fits pipelines with any ``--lora-targets``."""
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in transformer.state_dict().items()
        if ".lora_" not in k
    }


def load_backbone(transformer, backbone: dict) -> None:
    """Load ``backbone`` (plain names, as :func:`backbone_of` gives) into ``transformer``,
    whatever its LoRA targets; a backbone of other ``--transformer-*`` flags is refused."""
    names = {k.replace(".base_layer", ""): k for k in transformer.state_dict() if ".lora_" not in k}
    plain = {k.replace(".base_layer", ""): v for k, v in backbone.items()}  # files of older runs too
    if set(plain) != set(names):
        raise KeyError(
            f"the backbone's weights do not fit this transformer (missing {sorted(set(names) - set(plain))[:3]}, "
            f"unexpected {sorted(set(plain) - set(names))[:3]}): pass the --transformer-* flags it was made with"
        )
    transformer.load_state_dict({names[k]: v for k, v in plain.items()}, strict=False)


def pretrain_backbone(pipe: SkeleGuidePipeline, data: "Encoded", args) -> dict:
    """The shared backbone, when ``--backbone-steps`` > 0: the transformer's own weights (not
    the LoRA adapters) fully trained, Kontext-style, on the two generic tasks of an image editor
    and generator: text to image (a blank condition) and scene + text to image (the person
    inserted, no layout given), alternating step by step, flow matching (eq. 5). The counterpart
    of FLUX Kontext's pretraining for this tiny model: nothing here teaches layouts, which is
    what the compared methods add; the same for every policy and not part of the budget. Both
    adapters' LoRA B start at zero, so they add nothing while the base trains. With
    ``--backbone-ema`` d > 0 the weights returned are the exponential moving average
    (``ema = d * ema + (1 - d) * w`` after every step), as the gym base policy's UNet is sampled.
    Returns the transformer's non-LoRA weights under plain names (:func:`backbone_of`)."""
    base = [p for n, p in pipe.transformer.named_parameters() if ".lora_" not in n]
    pipe.set_trainable([])
    for p in base:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(base, lr=args.backbone_lr, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / max(args.backbone_steps, 1))
    ema = [p.detach().clone() for p in base] if args.backbone_ema > 0 else None
    losses = []
    for i in range(args.backbone_steps):
        g = torch.Generator().manual_seed(args.seed * 31_337 + 2_000_000 + i)
        idx = torch.randint(len(data), (args.backbone_batch,), generator=g)
        z = data.target[idx]
        cond = data.blank.expand(len(idx), -1, -1) if i % 2 == 0 else data.scene[idx]
        noise, t = torch.randn(z.shape, generator=g), torch.rand(len(idx), generator=g)
        v = pipe.flow("appearance", flow_interpolate(noise, z, t), t, cond, data.text_of(idx), data.size)
        losses.append(_step(opt, base, rendering_loss(v, noise, z)))
        decay.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in base], 1 - args.backbone_ema)
        if (i + 1) % max(1, args.backbone_steps // 10) == 0:
            k = max(1, args.backbone_steps // 10)
            print(
                f"[skeleguide] backbone step {i + 1}/{args.backbone_steps}: loss {np.mean(losses[-k:]):.4f}", flush=True
            )
    for p, average in zip(base, ema or []):
        p.data.copy_(average)
    for p in base:
        p.requires_grad_(False)
    return backbone_of(pipe.transformer)


def pretrain_vae(items, args, folder: str) -> str:
    """The shared autoencoder, when ``--vae`` names none: the tiny model's VAE trained on the
    training triples' images (L1 + MSE, a tiny KL term), its latents then scaled to unit variance
    (as SD's 0.18215, measured), saved to ``folder``. A random VAE does not reconstruct images
    at all (about 11 dB), so without one no policy could draw a figure; it is the same for every
    policy and not part of the compared budget."""
    images = np.concatenate([np.stack([getattr(t, k) for t in items]) for k in ("target", "scene", "layout")])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = build(args).vae
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / max(args.vae_steps, 1))  # linear to 0
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.vae_steps):
        x = pixels[torch.randint(len(pixels), (args.vae_batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 64]).latent_dist.mode() for i in range(0, len(pixels), 64)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()), shift_factor=float(latents.mean()))
    vae.save_pretrained(folder)
    return folder


class Draws:
    """The minibatch and the noise generator of optimizer step i: the same for every method."""

    def __init__(self, data: Encoded, args):
        self.data, self.batch, self.seed = data, args.batch, args.seed

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Generator]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        return torch.randint(len(self.data), (self.batch,), generator=g), g


# ----------------------------------------------------------------------------- training
def _step(opt, params, loss) -> float:
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def train_t2i(pipe, data: Encoded, draws: Draws, steps: int, args, losses: list) -> None:
    pipe.set_trainable(["appearance"])
    params = pipe.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr)
    for i in range(steps):
        idx, g = draws(i)
        z = data.target[idx]
        noise, t = torch.randn(z.shape, generator=g), torch.rand(len(idx), generator=g)
        blank = data.blank.expand(len(idx), -1, -1)
        v = pipe.flow("appearance", flow_interpolate(noise, z, t), t, blank, data.text_of(idx), data.size)
        losses.append(_step(opt, params, rendering_loss(v, noise, z)))


def train_phases(pipe, data: Encoded, draws: Draws, steps: int, args, losses: list) -> None:
    """The paper's three phases on ``steps`` optimizer steps split by ``args.phases``; each step is
    the training job's own ``phase_loss`` (``armature.jobs.skeleguide``, eq. 6 from the noise)."""
    from armature.jobs.skeleguide import PHASE_ADAPTERS, phase_loss

    algo = {"layout_estimate": "noise", "lambda_reason": 0.5, "lambda_render": 1.0}
    shares = np.asarray(args.phases, dtype=float)
    ends = np.round(np.cumsum(shares / shares.sum()) * steps).astype(int)
    current, opt, params = None, None, None
    for i in range(steps):
        phase = int(np.searchsorted(ends, i, side="right")) + 1
        if phase != current:  # each phase trains its own adapters, with a fresh optimizer
            current = phase
            pipe.set_trainable(PHASE_ADAPTERS[phase])
            params = pipe.trainable_parameters()
            opt = torch.optim.AdamW(params, lr=args.lr)
        idx, g = draws(i)
        batch = {
            "scene": data.scene[idx],
            "layout": data.layout[idx],
            "target": data.target[idx],
            "text": data.text_of(idx),
            "size": data.size,
        }
        loss, _ = phase_loss(pipe, batch, phase, algo, g)
        losses.append(_step(opt, params, loss))


def train_rl(pipe, data: Encoded, steps: int, args, reward, log: list) -> None:
    """On-policy DiffusionNFT on stage 1 (the skeletal adapter) with the skeleton reward."""
    pipe.set_trainable(["skeletal"])
    params = pipe.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr)
    scenes_per_step = max(1, args.batch // args.group)
    height, width = data.size
    for i in range(steps):
        g = torch.Generator().manual_seed(args.seed * 7_919 + 500_000 + i)
        chosen = torch.randint(len(data), (scenes_per_step,), generator=g)
        idx = chosen.repeat_interleave(args.group)
        text, scene = data.text_of(idx), data.scene[idx]
        with torch.no_grad():
            planned = pipe.sample(
                "skeletal",
                scene,
                text,
                data.size,
                seed=args.seed * 10_007 + 900_000 + i * len(idx),
                num_steps=args.rl_sample_steps,
            )
        layouts = pipe.decode(planned, height, width)
        rewards = np.asarray(reward([Image.fromarray(x) for x in layouts], [data.prompts[j] for j in idx]))
        log.append(float(rewards.mean()))
        r = torch.as_tensor(optimality_probability(rewards, idx.tolist()))
        noise, t = torch.randn(planned.shape, generator=g), torch.rand(len(idx), generator=g)
        v = pipe.flow("skeletal", flow_interpolate(noise, planned, t), t, scene, text, data.size)
        loss, _ = nft_loss(v, v.detach(), flow_target(noise, planned), r, args.nft_beta)
        _step(opt, params, loss)


# ----------------------------------------------------------------------------- evaluation
def sample(method: str, pipe, data: Encoded, args) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (and planned layouts) for the evaluation triples, the same seeds for every method."""
    images, layouts = [], []
    height, width = data.size
    for start in range(0, len(data), args.eval_batch):
        idx = torch.arange(start, min(start + args.eval_batch, len(data)))
        seed = args.seed * 1_000_003 + 77_777 + start
        if method == "t2i":
            blank = data.blank.expand(len(idx), -1, -1)
            with torch.no_grad():
                z = pipe.sample("appearance", blank, data.text_of(idx), data.size, seed, args.steps)
            images.append(pipe.decode(z, height, width))
            continue
        items = [data.items[j] for j in idx.tolist()]
        with torch.no_grad():
            out = pipe([t.scene for t in items], [t.prompt for t in items], seed=seed, num_steps=args.steps)
        images.append(out.images)
        layouts.append(out.layouts)
    return np.concatenate(images), (np.concatenate(layouts) if layouts else None)


def psnr_ssim_outside(image: np.ndarray, target: np.ndarray, person: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    outside = ~person
    diff = image.astype(np.float64)[outside] - target.astype(np.float64)[outside]
    mse = float((diff**2).mean())
    psnr = 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)  # 99: identical
    _, ssim_map = structural_similarity(image, target, channel_axis=2, data_range=255, full=True)
    return psnr, float(ssim_map[outside].mean())


def metrics(images: np.ndarray, layouts, evalset, clip, skeleton_reward) -> dict:
    oracle = AnatomyOracle()
    verdicts = [oracle(x) for x in images]
    bg = [psnr_ssim_outside(x, t.target, t.person_mask) for x, t in zip(images, evalset)]
    clip_scores = clip([Image.fromarray(x) for x in images], [t.prompt for t in evalset])
    out = {
        "severe": float(np.mean([v.severity == 3 for v in verdicts])),
        "any": float(np.mean([not v.ok for v in verdicts])),
        "psnr": float(np.mean([b[0] for b in bg])),
        "ssim": float(np.mean([b[1] for b in bg])),
        "clip": float(np.mean(clip_scores)),
        "plan": None,
    }
    if layouts is not None:
        out["plan"] = float(
            np.mean(skeleton_reward([Image.fromarray(x) for x in layouts], [t.prompt for t in evalset]))
        )
    return out


def table(rows: list[tuple[str, dict, float | None]], args, n_eval: int) -> str:
    lines = [
        f"SkeleGuide gym benchmark: {args.budget} optimizer steps of batch {args.batch} per policy, "
        f"{args.train} training triples, {n_eval} evaluation triples, {args.steps} sampling steps a stage, "
        f"LoRA {args.lora_targets} rank {args.lora_rank}; transformer {args.transformer_layers} layers x "
        f"{args.transformer_heads} heads x {args.head_dim}, "
        + (
            f"backbone pretrained {args.backbone_steps} steps of {args.backbone_batch}"
            + (f", EMA {args.backbone_ema}" if args.backbone_ema else "")
            if args.backbone_steps
            else "random backbone"
        ),
        "",
        "| policy | severe-error rate | any-error rate | background PSNR (dB) | background SSIM | "
        "CLIP score (tiny random CLIP) | plan skeleton reward | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m, wall in rows:
        plan = "—" if m["plan"] is None else f"{m['plan']:.3f}"
        lines.append(
            f"| {name} | {m['severe']:.1%} | {m['any']:.1%} | {m['psnr']:.2f} | {m['ssim']:.3f} | "
            f"{m['clip']:.3f} | {plan} | {'—' if wall is None else f'{wall:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=600, help="optimizer steps per policy (equal for all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train", type=int, default=512, help="gym training triples")
    parser.add_argument("--eval", type=int, default=64, help="held-out evaluation triples")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per stage")
    parser.add_argument(
        "--phases", type=float, nargs=3, default=[0.4, 0.4, 0.2], help="shares of the budget of the paper's phases 1-3"
    )
    parser.add_argument("--rl-share", type=float, default=0.25, help="(c): share of the budget spent on RL")
    parser.add_argument("--group", type=int, default=4, help="(c): layouts planned per scene in an RL step")
    parser.add_argument("--rl-sample-steps", type=int, default=6)
    parser.add_argument("--nft-beta", type=float, default=1.0)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-targets", default="qkv", choices=["qkv", "all"])
    parser.add_argument("--vae-steps", type=int, default=400, help="shared VAE pretraining steps (not in the budget)")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32, 64], help="of a pretrained VAE")
    parser.add_argument("--latent-channels", type=int, default=8, help="of a pretrained VAE")
    parser.add_argument(
        "--vae",
        default="auto",
        help="a trained AutoencoderKL / AutoencoderTiny folder (or a pipeline folder with vae/); auto: "
        "the gym base policy's (armature gym pretrain) if there is one, else pretrain an "
        "AutoencoderKL (--vae-steps); pretrain: always that",
    )
    parser.add_argument("--vae-cache", default=None, help="where to save the pretrained VAE (default: a temp folder)")
    parser.add_argument("--transformer-layers", type=int, default=2, help="of the tiny transformer")
    parser.add_argument("--transformer-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=8)
    parser.add_argument(
        "--backbone-steps",
        type=int,
        default=0,
        help="shared backbone pretraining, full fine-tuning (not in the budget); 0: a random backbone",
    )
    parser.add_argument("--backbone-batch", type=int, default=16)
    parser.add_argument("--backbone-lr", type=float, default=1e-3)
    parser.add_argument(
        "--backbone-cache",
        default=None,
        help="a .safetensors file: load the pretrained backbone from it when it exists (the same "
        "--backbone-*/--transformer-* flags are yours to keep), else save it there",
    )
    parser.add_argument(
        "--backbone-ema",
        type=float,
        default=0.0,
        help="EMA decay of the pretrained backbone's weights (e.g. 0.999); 0: the last weights",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--save", default=None, help="save each trained pipeline to SAVE/<method> (keep the VAE with --vae-cache)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from armature.policies.tiny import build_char_tokenizer
    from armature.rewards import load
    from armature.rewards.clip_score import build_tiny_clip

    clip_dir = tempfile.mkdtemp(prefix="tiny_clip_")
    clip = load("clip_score", path=build_tiny_clip(clip_dir, build_char_tokenizer(48), image_size=64))
    skeleton_reward = load("skeleton")

    start = time.perf_counter()
    train_items = triples(args.train, seed=args.seed)
    evalset = triples(args.eval, seed=args.seed + 1_000_000)
    vae = args.vae
    if vae == "auto":  # the gym base policy's VAE (`armature gym pretrain`), when there is one
        try:
            from armature.gym.base_policy import policy_path

            vae = str(policy_path())
            print(f"[skeleguide] VAE of the gym base policy {vae}", flush=True)
        except (ImportError, FileNotFoundError):
            vae = None
    if vae == "pretrain":
        vae = None
    if vae is None:
        vae = pretrain_vae(train_items, args, args.vae_cache or tempfile.mkdtemp(prefix="skeleguide_vae_"))
        print(
            f"[skeleguide] VAE pretrained, {args.vae_steps} steps, in {time.perf_counter() - start:.1f} s "
            f"(saved to {vae}: pass --vae {vae} to reuse it)",
            flush=True,
        )
    start = time.perf_counter()
    first = build(args, vae)
    train = Encoded(first, train_items)
    eval_data = Encoded(first, evalset)
    print(
        f"[skeleguide] {len(train)} + {len(evalset)} triples encoded in {time.perf_counter() - start:.1f} s", flush=True
    )
    draws = Draws(train, args)
    backbone = None
    if args.backbone_steps and args.backbone_cache and os.path.isfile(args.backbone_cache):
        from safetensors.torch import load_file

        backbone = load_file(args.backbone_cache)  # made by an earlier run with the same --transformer-* flags
        load_backbone(first.transformer, backbone)
        print(f"[skeleguide] backbone loaded from {args.backbone_cache}", flush=True)
    elif args.backbone_steps:
        t0 = time.perf_counter()
        backbone = pretrain_backbone(first, train, args)
        print(
            f"[skeleguide] backbone pretrained, {args.backbone_steps} steps of {args.backbone_batch}, in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        if args.backbone_cache:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in backbone.items()}, args.backbone_cache)
            print(f"[skeleguide] backbone saved to {args.backbone_cache} (--backbone-cache reuses it)", flush=True)

    targets = np.stack([t.target for t in evalset])
    layouts = np.stack([t.layout for t in evalset])
    roundtrip = np.concatenate(
        [first.decode(eval_data.target[i : i + 64], *eval_data.size) for i in range(0, len(evalset), 64)]
    )
    rows = [
        ("ground truth (the targets)", metrics(targets, layouts, evalset, clip, skeleton_reward), None),
        ("the targets through the VAE (ceiling)", metrics(roundtrip, None, evalset, clip, skeleton_reward), None),
    ]
    for method in args.methods:
        pipe = first if method == args.methods[0] else build(args, vae, backbone)  # identical weights: same seeds
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        rl_log: list[float] = []
        losses: list[float] = []
        if method == "t2i":
            train_t2i(pipe, train, draws, args.budget, args, losses)
        elif method == "rtr":
            train_phases(pipe, train, draws, args.budget, args, losses)
        else:
            rl_steps = int(round(args.rl_share * args.budget))
            train_phases(pipe, train, draws, args.budget - rl_steps, args, losses)
            train_rl(pipe, train, rl_steps, args, skeleton_reward, rl_log)
        trained = time.perf_counter() - t0
        if args.save:  # e.g. for RL through the learners: model=skeleguide_stage model.pretrained=<save>/rtr
            pipe.save_pretrained(os.path.join(args.save, method), base=backbone is not None)
        images, layouts = sample(method, pipe, eval_data, args)
        wall = time.perf_counter() - t0
        result = metrics(images, layouts, evalset, clip, skeleton_reward)
        rows.append((METHODS[method], result, wall))
        k = max(1, len(losses) // 10)
        extra = f"; flow-matching loss, first/last {k} steps: {np.mean(losses[:k]):.3f} -> {np.mean(losses[-k:]):.3f}"
        if rl_log:
            k = max(1, len(rl_log) // 4)
            extra += f"; RL plan reward, first/last {k} steps: {np.mean(rl_log[:k]):.3f} -> {np.mean(rl_log[-k:]):.3f}"
        print(
            f"[skeleguide] {METHODS[method]}: trained in {trained:.1f} s, sampled in {wall - trained:.1f} s{extra}",
            flush=True,
        )
    print()
    print(table(rows, args, len(evalset)))


if __name__ == "__main__":
    main()
