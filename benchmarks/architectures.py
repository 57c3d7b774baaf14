"""The supported families at their published architectures (random weights, nothing downloaded)
through Armature's code paths on CPU, one family at a time, each in its own process:

    python benchmarks/architectures.py                          # sd15 full depth, the others depth 1
    python benchmarks/architectures.py --families sd15 sdxl --depth sdxl=2 --size 128

Per family: build the pipeline from ``armature/policies/arch/<name>.json``; one rollout with
log-probs (``--batch`` samples of one prompt); one learner step with LoRA on the family's default
target modules (``configs/model/<name>.yaml``): DDPO for the UNet families, GRPO for the flow
ones, over every stored transition; one Diffusion-DPO step on a pair made of two rollout samples;
one image through the Serve app's generator (``armature.serve.generation.generate``). The table
gives the parameters, the LoRA parameters, seconds of each step and the process's peak resident
memory. A failure names the family and the step, and the other families still run.

``--depth NAME=N`` keeps N blocks in each repeated stack at full width (see
``armature.policies.architectures``); ``--max-sequence-length`` shortens the T5 prompt of the flow
families (the pipelines' defaults: 256 for SD3, 512 for FLUX), which dominates their CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

FAMILIES = ("sd15", "sdxl", "sd3", "flux")
DEFAULT_DEPTH = {"sd15": None, "sdxl": 1, "sd3": 1, "flux": 1}
PROMPT = "a photo of a person waving, full body"
CLIP_RANGE, ADV_CLIP_MAX, DPO_BETA = 1e-4, 5.0, 2500.0


# ------------------------------------------------------------------ the steps (gpu.py uses them too)
def advantages(policy, rewards: np.ndarray) -> torch.Tensor:
    """GRPO's group advantages (one prompt: one group) for the flow families, DDPO's normalised
    rewards for the UNet families."""
    from armature.losses import group_advantages, normalize_rewards

    if policy.is_flow:
        return torch.as_tensor(group_advantages(rewards, [0] * len(rewards)))
    return torch.as_tensor(normalize_rewards(rewards))


def policy_gradient_losses(policy, traj, adv: torch.Tensor):
    """DDPO's (UNet) or GRPO's (flow) clipped loss at each stored transition of ``traj``, with
    gradients, one step at a time (the learners' order)."""
    from armature.losses import ddpo_loss, grpo_loss

    loss_fn = grpo_loss if policy.is_flow else ddpo_loss
    for j in range(traj.log_probs.shape[1]):
        log_prob = policy.step_log_prob(traj.cond, traj.latents[:, j], traj.timesteps[:, j], traj.latents[:, j + 1])
        device = log_prob.device
        yield loss_fn(log_prob, traj.log_probs[:, j].to(device), adv.to(device), CLIP_RANGE, ADV_CLIP_MAX)[0]


@contextlib.contextmanager
def unguided(policy):
    """``policy.predict`` without classifier-free guidance (a DPO forward pass), for the duration."""
    scale = policy.sampling.guidance_scale
    policy.sampling.guidance_scale = 1.0
    try:
        yield
    finally:
        policy.sampling.guidance_scale = scale


def _flow_pair_errors(policy, x_w, x_l, prompts, generator, frozen=None):
    """Diffusion-DPO's errors for a rectified flow (the DPO job handles the UNet families only):
    x_t = (1 - t) x0 + t noise, the velocity noise - x0 as target, one t and noise per pair."""
    from armature.losses import forward_process, weighted_denoising_error

    n = len(x_w)
    t = torch.rand(n, generator=generator).clamp(1e-3, 1.0)
    noise = torch.randn(x_w.shape, generator=generator)
    x_t, target = forward_process(torch.cat([x_w, x_l]), torch.cat([noise, noise]), torch.cat([t, t]))
    x_t, target = x_t.to(policy.device, policy.unet.dtype), target.to(policy.device)
    cond = {k: torch.cat([v, v]) for k, v in policy.encode(prompts).items()}
    timesteps = torch.cat([t, t]).to(policy.device) * 1000
    with unguided(policy):
        with torch.no_grad(), policy.reference(frozen):
            ref = weighted_denoising_error(policy.predict(cond, x_t, timesteps).float(), target)
        pol = weighted_denoising_error(policy.predict(cond, x_t, timesteps).float(), target)
    return pol[:n], pol[n:], ref[:n], ref[n:]


def dpo_loss(policy, x_w, x_l, prompts, generator, frozen=None) -> torch.Tensor:
    """Diffusion-DPO's loss for pairs of clean latents (preferred ``x_w``, rejected ``x_l``):
    the DPO job's ``pair_errors`` for the UNet families, ``_flow_pair_errors`` for the flow ones.
    ``frozen``: the reference network of a fully fine-tuned policy (else the adapter is switched off)."""
    from armature.jobs.dpo import pair_errors
    from armature.losses import diffusion_dpo_loss

    if policy.is_flow:
        errors = _flow_pair_errors(policy, x_w, x_l, prompts, generator, frozen)
    else:
        batch = {
            "latents_w": x_w,
            "latents_l": x_l,
            "prompt": prompts,
            "mask": torch.zeros((len(x_w),) + tuple(x_w.shape[-2:])),
        }
        errors = pair_errors(
            policy, policy.denoiser, batch, 0.0, policy.scheduler.config.prediction_type, frozen, generator
        )
    return diffusion_dpo_loss(*errors, beta=DPO_BETA)[0]


def serve_image(policy, size: int, steps: int, seed: int = 0) -> np.ndarray:
    """One image through the Serve app's generator (per-image seed, fixed-shape pass)."""
    from armature.serve.generation import ImageJob, PassShape, generate

    shape = PassShape(
        steps=steps,
        height=size,
        width=size,
        guidance_scale=policy.sampling.guidance_scale,
        eta=policy.sampling.eta if not policy.is_flow else policy.sampling.noise_level,
    )
    return generate(policy, [ImageJob(PROMPT, "", seed)], shape, pass_size=1)


def rewards_of(images: np.ndarray) -> np.ndarray:
    """A stand-in reward (mean brightness): the steps are timed, not the reward."""
    return images.reshape(len(images), -1).mean(axis=1).astype(np.float32) / 255.0


def count(params) -> int:
    return sum(p.numel() for p in params)


# ------------------------------------------------------------------ one family (child process)
def run_family(name: str, depth: int | None, args) -> dict:
    from armature.policies import SamplingParams
    from armature.policies.architectures import architecture_policy, default_lora

    torch.manual_seed(0)
    row = {"family": name, "depth": depth, "size": args.size, "steps": args.steps, "batch": args.batch}
    sampling = SamplingParams(num_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size)
    step = "build"
    try:
        t = time.perf_counter()
        policy = architecture_policy(name, depth=depth, sampling=sampling)
        if policy.is_flow:
            policy.max_sequence_length = min(policy.max_sequence_length, args.max_sequence_length)
        lora = default_lora(name)
        policy.add_lora(lora)
        row["build_s"] = time.perf_counter() - t
        components = [m for m in policy.pipe.components.values() if isinstance(m, torch.nn.Module)]
        row["params"] = count(p for m in components for p in m.parameters())
        row["denoiser_params"] = count(p for n, p in policy.unet.named_parameters() if "lora_" not in n)
        row["lora_params"] = count(policy.trainable_parameters())
        row["lora_targets"] = lora.target_modules

        step = "rollout"
        t = time.perf_counter()
        gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        traj = policy.rollout([PROMPT] * args.batch, gens)
        row["rollout_s"] = time.perf_counter() - t
        if not torch.isfinite(traj.log_probs).all():
            raise FloatingPointError(f"non-finite log-probs {traj.log_probs.tolist()}")

        step = "grpo" if policy.is_flow else "ddpo"
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
        adv = advantages(policy, rewards_of(traj.images))
        t = time.perf_counter()
        policy.unet.train()
        for loss in policy_gradient_losses(policy, traj, adv):
            (loss / args.steps).backward()
        optimizer.step()
        optimizer.zero_grad()
        row["learner_s"] = time.perf_counter() - t
        row["learner"] = step

        step = "dpo"
        t = time.perf_counter()
        x0 = traj.latents[:, -1]
        loss = dpo_loss(policy, x0[:1], x0[1:2], [PROMPT], torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        row["dpo_s"] = time.perf_counter() - t
        policy.unet.eval()

        step = "serve"
        t = time.perf_counter()
        image = serve_image(policy, args.size, args.steps)
        row["serve_s"] = time.perf_counter() - t
        if image.shape != (1, args.size, args.size, 3):
            raise ValueError(f"served image of shape {image.shape}")
        row["status"] = "ok"
    except Exception as err:  # noqa: BLE001 -- reported per family and step, the others still run
        row["status"] = f"FAILED at {step}: {type(err).__name__}: {err}"
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


# ------------------------------------------------------------------ the table (parent process)
def parse_depths(items: list[str]) -> dict:
    depths = dict(DEFAULT_DEPTH)
    for item in items:
        name, _, value = item.partition("=")
        if name not in FAMILIES or not value:
            raise SystemExit(f"--depth {item!r}: use NAME=N or NAME=full, NAME one of {', '.join(FAMILIES)}")
        depths[name] = None if value == "full" else int(value)
    return depths


def fmt(row: dict, key: str, scale: float = 1.0, spec: str = ".1f") -> str:
    return format(row[key] / scale, spec) if key in row else "-"


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nimage {args.size} px, {args.steps} steps, batch {args.batch} (DPO: 1 pair), guidance {args.guidance}, "
        f"T5 prompt <= {args.max_sequence_length} tokens, float32, {torch.get_num_threads()} threads"
    )
    head = (
        "family",
        "depth",
        "params B",
        "denoiser B",
        "LoRA M",
        "build s",
        "rollout s",
        "learner s",
        "DPO s",
        "serve s",
        "peak RSS GB",
        "status",
    )
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        learner = f"{fmt(r, 'learner_s')} ({r.get('learner', '-')})"
        print(
            " | ".join(
                [
                    r["family"],
                    "full" if r["depth"] is None else str(r["depth"]),
                    fmt(r, "params", 1e9, ".2f"),
                    fmt(r, "denoiser_params", 1e9, ".2f"),
                    fmt(r, "lora_params", 1e6, ".2f"),
                    fmt(r, "build_s"),
                    fmt(r, "rollout_s"),
                    learner,
                    fmt(r, "dpo_s"),
                    fmt(r, "serve_s"),
                    fmt(r, "peak_rss_gb", spec=".2f"),
                    r["status"],
                ]
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--depth", nargs="*", default=[], help="NAME=N or NAME=full (default: sd15 full, others 1)")
    parser.add_argument("--size", type=int, default=64, help="image pixels (a multiple of 16)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="rollout samples (>= 2: the DPO pair)")
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--max-sequence-length", type=int, default=77)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one family, its row as JSON on the last line
    args = parser.parse_args()
    if args.batch < 2:
        raise SystemExit("--batch must be >= 2: the DPO step pairs two rollout samples")
    torch.set_num_threads(args.threads)
    depths = parse_depths(args.depth)
    if args.child:
        print(json.dumps(run_family(args.child, depths[args.child], args)))
        return
    rows = []
    for name in args.families:
        cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            row = {"family": name, "depth": depths[name], "status": f"FAILED (exit {proc.returncode}): {tail}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
