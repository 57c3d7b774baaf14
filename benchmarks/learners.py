"""Reward reached against samples drawn: DDPO, GRPO (Flow-GRPO) and DiffusionNFT, same model,
reward and sample budget, in one process (no Ray: the algorithms, not the platform, are compared).

    python benchmarks/learners.py                      # tiny flow model, mean brightness
    python benchmarks/learners.py --reward compressibility --epochs 12 --prompts 8
    python benchmarks/learners.py --model tiny --algos ddpo grpo   # the tiny DDIM UNet (NFT: flow only)

Each algorithm starts from the same weights, draws the same prompts with the same per-sample
seeds each epoch (``prompts`` x ``group_size`` images), and takes the same number of optimizer
steps per epoch. The printed table is the mean reward of each epoch's samples (drawn before that
epoch's update), against the number of samples drawn so far; the last line is the reward of a
final evaluation batch (new seeds) after the last update.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from armature.losses import (
    PerPromptStatTracker,
    ddpo_loss,
    ema_update,
    forward_process,
    group_advantages,
    grpo_loss,
    nft_loss,
    optimality_probability,
)
from armature.platform.learner import epoch_plan
from armature.policies import Trajectory, build_policy
from armature.rewards import load_weighted

PROMPTS = ["a cat", "a dog", "a horse", "a rabbit"]


def rollout(policy, plan, batch, **kwargs) -> Trajectory:
    parts = []
    for s in range(0, len(plan.prompts), batch):
        gens = [torch.Generator().manual_seed(x) for x in plan.seeds[s : s + batch]]
        parts.append(policy.rollout(plan.prompts[s : s + batch], gens, **kwargs))
    return Trajectory.concat(parts)


def score(reward, traj) -> np.ndarray:
    from PIL import Image

    return np.asarray(reward([Image.fromarray(a) for a in traj.images], traj.prompts), dtype=np.float32)


def run(algo: str, args) -> list[float]:
    torch.manual_seed(0)
    model = {"family": "tiny_flow" if args.model == "tiny_flow" else "tiny", "lora": {"enabled": False}}
    policy = build_policy(model, {"num_steps": args.steps, "guidance_scale": 1.0})
    reward = load_weighted({args.reward: {"weight": 1.0}})
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr[algo], weight_decay=1e-4)
    tracker = PerPromptStatTracker(32, 8)
    old = copy.deepcopy(policy.unet).requires_grad_(False) if algo == "nft" else None
    old_state = policy.trainable_state_dict() if algo == "nft" else None
    means = []
    for epoch in range(args.epochs + 1):
        final = epoch == args.epochs  # evaluation batch on fresh seeds
        plan = epoch_plan(PROMPTS, 1000 + final, epoch, args.prompts, args.group_size, 0, 1)
        policy.unet.eval()
        if algo == "nft":
            trained = policy.trainable_state_dict()
            policy.load_trainable_state_dict(old_state)  # the samples come from the sampling policy
        with torch.no_grad():
            traj = rollout(policy, plan, args.batch, sde_window=(0, 0) if algo == "nft" else None)
        if algo == "nft":
            policy.load_trainable_state_dict(trained)
        rewards = score(reward, traj)
        means.append(float(rewards.mean()))
        if final:
            break
        policy.unet.train()
        n = len(rewards)
        if algo == "nft":
            r = torch.as_tensor(optimality_probability(rewards, plan.groups))
            x0 = traj.latents[:, -1]
            for mb in torch.randperm(n).split(args.micro):
                opt.zero_grad()
                for _ in range(args.steps):  # as many optimizer inputs as the others' steps
                    t = torch.rand(len(mb)).clamp(1e-3, 1.0)
                    x_t, target = forward_process(x0[mb], torch.randn(x0[mb].shape), t)
                    cond = {k: v[mb] for k, v in traj.cond.items()}
                    v_theta = policy.predict(cond, x_t, t * 1000)
                    with torch.no_grad(), policy.reference(old):
                        v_old = policy.predict(cond, x_t, t * 1000)
                    (nft_loss(v_theta, v_old, target, r[mb], args.nft_beta)[0] / args.steps).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            eta = min(0.1 * epoch, 0.5)
            old_state = ema_update(old_state, policy.trainable_state_dict(), eta)
            with torch.no_grad():
                for name, p in old.named_parameters():
                    p.copy_(old_state[name])
            continue
        if algo == "grpo":
            adv = torch.as_tensor(group_advantages(rewards, plan.groups))
        else:
            adv = torch.as_tensor(tracker.update(traj.prompts, rewards))
        for mb in torch.randperm(n).split(args.micro):
            opt.zero_grad()
            batch = traj.select(mb)
            for j in range(args.steps):
                lp = policy.step_log_prob(
                    batch.cond, batch.latents[:, j], batch.timesteps[:, j], batch.latents[:, j + 1]
                )
                fn = grpo_loss if algo == "grpo" else ddpo_loss
                loss, _ = fn(lp, batch.log_probs[:, j], adv[mb], args.clip, 5.0)
                (loss / args.steps).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=["ddpo", "grpo", "nft"])
    parser.add_argument("--model", default="tiny_flow", choices=["tiny_flow", "tiny"])
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--clip", type=float, default=0.05)
    parser.add_argument("--nft-beta", type=float, default=1.0)
    parser.add_argument("--lr-pg", type=float, default=1e-2, help="learning rate of DDPO and GRPO")
    parser.add_argument("--lr-nft", type=float, default=3e-2)
    args = parser.parse_args()
    args.lr = {"ddpo": args.lr_pg, "grpo": args.lr_pg, "nft": args.lr_nft}
    torch.set_num_threads(1)
    per_epoch = args.prompts * args.group_size
    results, times = {}, {}
    for algo in args.algos:
        start = time.perf_counter()
        results[algo] = run(algo, args)
        times[algo] = time.perf_counter() - start
    print(f"model {args.model}, reward {args.reward}, {per_epoch} samples an epoch, {args.steps} steps")
    print("samples drawn  " + "".join(f"{a:>12}" for a in args.algos))
    for e in range(args.epochs):
        print(f"{per_epoch * (e + 1):>13}  " + "".join(f"{results[a][e]:>12.4f}" for a in args.algos))
    print(f"{'final eval':>13}  " + "".join(f"{results[a][-1]:>12.4f}" for a in args.algos))
    print(f"{'gain':>13}  " + "".join(f"{results[a][-1] - results[a][0]:>+12.4f}" for a in args.algos))
    print(f"{'seconds':>13}  " + "".join(f"{times[a]:>12.1f}" for a in args.algos))


if __name__ == "__main__":
    main()
