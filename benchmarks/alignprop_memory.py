"""Peak memory of AlignProp's backward pass vs K, the number of backpropagated denoising steps,
with and without per-step gradient checkpointing of the UNet.

Each (K, checkpointing) runs in a fresh subprocess: build the tiny model (64 px images, batch 4,
20 DDIM steps), run one sampling pass without gradients (the baseline high-water mark: weights,
one UNet's inference activations, the decoder), then one sample-with-gradients + brightness reward
+ backward. The figure is the growth of the process's peak resident set size (``ru_maxrss``)
over the baseline: what the graph of the last K steps costs.

    python benchmarks/alignprop_memory.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's armature, installed or not

STEPS, BATCH, IMAGE = 20, 4, 64


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(k: int, checkpoint: bool) -> dict:
    import torch

    from armature.policies import build_policy
    from armature.policies.grad_sampling import sample_with_grad
    from armature.rewards import load

    torch.set_num_threads(1)
    model = {
        "family": "tiny",
        "tiny": {"seed": 0, "image_size": IMAGE},
        "lora": {"enabled": True, "rank": 4, "alpha": 4.0},
    }
    policy = build_policy(model, {"num_steps": STEPS, "guidance_scale": 1.0, "eta": 1.0})
    reward = load("brightness")
    prompts = ["a cat"] * BATCH
    cond = policy.encode(prompts)
    noise = torch.randn((BATCH,) + policy.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sample_with_grad(policy, cond, noise, STEPS, generator=torch.Generator().manual_seed(1))
    baseline = _peak_mib()
    sample = sample_with_grad(policy, cond, noise, k, checkpoint=checkpoint, generator=torch.Generator().manual_seed(1))
    (-reward.score_tensor(sample.images, prompts).mean()).backward()
    return {"k": k, "checkpoint": checkpoint, "baseline_mib": baseline, "growth_mib": max(0.0, _peak_mib() - baseline)}


def main() -> None:
    rows = []
    for checkpoint in (False, True):
        for k in (1, 5, 10, 20):
            # Large tensors mmapped: freed memory goes back to the OS, so the peak RSS is the
            # peak of live tensors rather than of what malloc happens to keep.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(k), str(int(checkpoint))],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"peak memory growth of one AlignProp backward pass (tiny model, {IMAGE} px, batch {BATCH}, "
        f"{STEPS} steps), MiB over the no-grad sampling baseline"
    )
    print(f"{'K':>4} | {'no checkpointing':>17} | {'checkpointing':>14} | ratio")
    by = {(r["k"], r["checkpoint"]): r["growth_mib"] for r in rows}
    for k in (1, 5, 10, 20):
        plain, ckpt = by[(k, False)], by[(k, True)]
        print(f"{k:>4} | {plain:>17.1f} | {ckpt:>14.1f} | {plain / max(ckpt, 1e-9):5.1f}x")
    for name, ck in (("no checkpointing", False), ("checkpointing", True)):
        slope = (by[(20, ck)] - by[(1, ck)]) / 19
        print(f"{name}: {slope:.2f} MiB per extra backpropagated step")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(measure(int(sys.argv[2]), bool(int(sys.argv[3])))))
    else:
        main()
