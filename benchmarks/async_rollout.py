"""The same DDPO job with the samplers in step with the learner and one epoch ahead of it.

    python benchmarks/async_rollout.py                   # tiny SD, compressibility, 32 samples x 20 steps
    python benchmarks/async_rollout.py --epochs 6 --samples 16 --steps 10
    python benchmarks/async_rollout.py -- trainer.cpus_per_worker=2   # extra overrides for both runs

Runs ``armature train`` twice, one after the other, on a local Ray started by each run:
``trainer.rollout_ahead=0`` (sample, then train: the samplers idle while the learner trains)
and ``trainer.rollout_ahead=1`` (epoch k+1 rolled out with the weights before epoch k's update
while the learner trains on epoch k; samplers and learner each use their own CPU share). Same
seed, model, prompts, reward and hyper-parameters (the DDPO paper's: learning rate 3e-4, clip
range 1e-4). Reads each run's metrics back from MLflow and prints, per mode, the epoch time
(mean over the epochs after the first, which has nothing to overlap with; and over all), the
learner's and the samplers' idle shares, the staleness and the reward per epoch, then the
ratio of the epoch times (asynchronous / synchronous), so that speed and learning are compared
together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KEYS = ["reward_mean", "epoch_time_s", "learner_idle_share", "sampler_idle_share", "staleness", "clipfrac"]


def train(mode: int, args, tmp: Path) -> dict[str, list[float]]:
    name = f"ahead{mode}"
    command = [
        sys.executable,
        "-m",
        "armature.cli",
        "train",
        "model=tiny",
        "reward=compressibility",
        "prompts.file=null",
        f"sampling.num_steps={args.steps}",
        f"algo.num_epochs={args.epochs}",
        f"algo.samples_per_epoch={args.samples}",
        "algo.learning_rate=3e-4",
        "algo.clip_range=1e-4",
        "algo.final_eval_per_prompt=0",
        f"trainer.seed={args.seed}",
        f"trainer.rollout_ahead={mode}",
        "tracking.registered_model=null",
        "tracking.log_images_every=0",
        f"trainer.storage_path={tmp / 'ray'}",
        f"tracking.local_dir={tmp / 'track'}",
        f"tracking.run_name={name}",
        *args.overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"rollout_ahead={mode} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    from mlflow.tracking import MlflowClient

    info = json.loads((tmp / "ray" / name / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    history = {
        key: [m.value for m in sorted(client.get_metric_history(info["mlflow_run_id"], key), key=lambda m: m.step)]
        for key in KEYS
    }
    history["job_s"] = [time.perf_counter() - start]
    print(f"rollout_ahead={mode}: " + json.dumps(history), file=sys.stderr, flush=True)  # partial results
    return history


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32, help="samples per epoch")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="more `armature train` overrides for both runs")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch has nothing to overlap with")

    with tempfile.TemporaryDirectory() as tmp:
        runs = {mode: train(mode, args, Path(tmp)) for mode in (0, 1)}
    print(
        f"DDPO, model tiny, reward compressibility, {args.samples} samples x {args.steps} steps an epoch, "
        f"{args.epochs} epochs, seed {args.seed}, {os.cpu_count()} cores; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(
        f"{'mode':<24}{'epoch s (2nd on)':>17}{'epoch s (all)':>14}{'learner idle':>13}{'sampler idle':>13}"
        f"{'staleness':>10}{'job s':>8}"
    )
    label = {0: "sync (rollout_ahead=0)", 1: "async (rollout_ahead=1)"}
    for mode, h in runs.items():
        print(
            f"{label[mode]:<24}{mean(h['epoch_time_s'][1:]):>17.2f}{mean(h['epoch_time_s']):>14.2f}"
            f"{mean(h['learner_idle_share'][1:]):>13.2f}{mean(h['sampler_idle_share'][1:]):>13.2f}"
            f"{max(h['staleness']):>10.0f}{h['job_s'][0]:>8.0f}"
        )
    print("reward per epoch (mean of the epoch's samples, drawn before its update):")
    for mode, h in runs.items():
        print(f"  {label[mode]:<24}" + " ".join(f"{r:+.4f}" for r in h["reward_mean"]))
    print("clip fraction per epoch:")
    for mode, h in runs.items():
        print(f"  {label[mode]:<24}" + " ".join(f"{r:.3f}" for r in h["clipfrac"]))
    ratio = mean(runs[1]["epoch_time_s"][1:]) / mean(runs[0]["epoch_time_s"][1:])
    print(f"async / sync epoch time (epochs 2-{args.epochs}): {ratio:.2f}")


if __name__ == "__main__":
    main()
