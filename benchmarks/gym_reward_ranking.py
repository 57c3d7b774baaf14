"""How well a learned reward ranks the gym base policy's own samples, and what that caps.

``--adapter`` samples a trained policy instead (a LoRA folder a learner wrote, e.g. a bench stage's
``adapters/<learner>/adapter``): whether the reward still ranks what the policy draws after RL.

Best-of-N (and RL) can cut the oracle's severe-error rate only as far as the learned reward
orders the policy's samples the way the oracle does. This samples a pool of ``--per-prompt``
figures for each gym prompt from the base policy (fixed seeds from ``--seed``, a range apart from
the ones ``armature gym bench`` evaluates on), judges each with the oracle, scores each with the
reward, and prints:

* the oracle's most common defect sets among the severe samples (what the reward must catch);
* ranking: AUC, the chance that a severe sample scores below a sample without a severe error
  (0.5: no better than chance; 1: every severe sample ranked last), per prompt and overall; the
  same against intact samples only, and the mean reward at each severity (does the reward know
  a missing hand from a missing forearm?);
* the severe-error rate of Best-of-N for each N under three selectors: the learned reward, a
  random pick (the base rate) and the oracle itself (the ceiling: the least severe candidate).
  Each is the exact expectation over all N-subsets of a prompt's pool (no resampling noise;
  :func:`armature.losses.evaluation.best_of_n_expectation`).

    python benchmarks/gym_reward_ranking.py --scorer gym-bench/ray/bench-reward/scorer
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's armature, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from armature.losses.evaluation import best_of_n_expectation, ranking_auc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scorer",
        required=True,
        nargs="+",
        help="a learned reward's scorer/ folder (e.g. the bench's); several: their mean (an ensemble)",
    )
    parser.add_argument(
        "--per-prompt",
        type=int,
        default=64,
        help="pool size per prompt; for N >= 16 use 256 (from a pool of 64 the best of 16 "
        "rests on a few figures a prompt)",
    )
    parser.add_argument("--seed", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (the bench's 20, eta 1)")
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter", help="a trained LoRA of the base policy to sample from instead of the base")
    args = parser.parse_args()
    if args.per_prompt < 1 or not all(1 <= n <= args.per_prompt for n in args.ns):
        parser.error(
            f"--ns {args.ns} with --per-prompt {args.per_prompt}: each N must lie in 1..--per-prompt "
            "(the pool Best-of-N draws from); raise --per-prompt or drop the larger N"
        )
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        parser.error(f"--adapter {args.adapter}: no adapter_config.json there; give a learner's adapter/ folder")
    for scorer in args.scorer:
        if ":/" not in scorer and not os.path.isfile(os.path.join(scorer, "scorer.json")):  # runs:/ URIs resolve later
            parser.error(
                f"--scorer {scorer}: no scorer.json there; give the scorer/ folder of a reward-model run, "
                "e.g. gym-bench/ray/bench-reward/scorer from `armature gym bench`"
            )

    import torch

    from armature.gym.base_policy import policy_path
    from armature.gym.figures import POSES
    from armature.gym.oracle import AnatomyOracle
    from armature.policies import SamplingParams, load_policy
    from armature.rewards import load

    torch.set_num_threads(args.threads)
    reward = load("learned", path=args.scorer if len(args.scorer) > 1 else args.scorer[0])
    policy = load_policy("sd", str(policy_path()), SamplingParams(num_steps=args.steps, guidance_scale=1.0, eta=1.0))
    if args.adapter:
        policy.load_adapter(args.adapter)
    oracle = AnatomyOracle()
    start = time.perf_counter()
    rows, severe_defects = [], Counter()
    for k, (prompt, _, _) in enumerate(POSES.values()):
        severity, score = [], []
        for b in range(0, args.per_prompt, 32):
            count = min(32, args.per_prompt - b)
            gens = [torch.Generator().manual_seed(args.seed + 1000 * k + b + i) for i in range(count)]
            with torch.no_grad():
                images = policy.rollout([prompt] * count, gens).images  # [B, H, W, 3] uint8
                pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
                score += reward.score_tensor(pixels, [prompt] * count).tolist()
            verdicts = [oracle(image) for image in images]
            severity += [v.severity for v in verdicts]
            severe_defects.update(
                ", ".join(f"{kind} {part}" for kind, part in v.defects) for v in verdicts if v.severity == 3
            )
        rows.append((prompt, np.array(severity), np.array(score)))
    seconds = time.perf_counter() - start

    severe = {p: (s == 3).astype(float) for p, s, _ in rows}
    all_s = np.concatenate([s for _, s, _ in rows])
    all_r = np.concatenate([r for _, _, r in rows])
    per_prompt_auc = [ranking_auc(r, s == 3) for _, s, r in rows]
    print(
        f"policy: {args.adapter or 'the base'}; "
        f"{len(all_s)} samples ({args.per_prompt} per prompt, {len(rows)} prompts) in {seconds:.0f} s; "
        f"severe {np.mean(all_s == 3):.3f}, mean severity {all_s.mean():.2f}"
    )
    print(
        f"AUC (severe below the rest): within prompts {np.nanmean(per_prompt_auc):.3f} "
        f"(min {np.nanmin(per_prompt_auc):.3f}, max {np.nanmax(per_prompt_auc):.3f}); pooled {ranking_auc(all_r, all_s == 3):.3f}"
    )
    # a reward that scores a moderate error (most are a missing hand) as low as a severe one
    # separates severe from intact and still cannot rank severe below the rest
    none_or_severe = (all_s == 0) | (all_s == 3)
    print(
        f"AUC severe vs intact (severity 0) only: {ranking_auc(all_r[none_or_severe], all_s[none_or_severe] == 3):.3f}; "
        "mean reward by the oracle's severity: "
        + ", ".join(
            f"{level}: {all_r[all_s == level].mean():+.2f} ({np.sum(all_s == level)})"
            for level in range(4)
            if np.any(all_s == level)
        )
    )
    print(
        "most common defect sets of the severe samples: "
        + "; ".join(f"[{found}] {count}" for found, count in severe_defects.most_common(3))
    )
    rng = np.random.default_rng(0)
    print("\n| N | severe: learned reward | severe: random pick | severe: oracle pick (ceiling) | cut by the reward |")
    print("|---|---|---|---|---|")
    for n in args.ns:
        by_reward = np.mean([best_of_n_expectation(r, severe[p], n) for p, _, r in rows])
        by_chance = np.mean([severe[p].mean() for p, _, _ in rows])
        # the oracle prefers the least severe; the jitter only orders candidates of equal severity
        by_oracle = np.mean([best_of_n_expectation(-s + 1e-3 * rng.random(len(s)), severe[p], n) for p, s, _ in rows])
        print(
            f"| {n} | {by_reward:.3f} | {by_chance:.3f} | {by_oracle:.3f} | {by_chance / max(by_reward, 1e-9):.2f}x |"
        )


if __name__ == "__main__":
    main()
