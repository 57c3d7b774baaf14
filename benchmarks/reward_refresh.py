"""The default gym job (DDPO, the gym policy with LoRA, the five shipped anatomy scorers, the oracle
at weight 0) with and without the on-policy reward refresh, at the same epochs and seed.

    python benchmarks/reward_refresh.py                    # 4 epochs of 32 samples, refresh after each of the first 3
    python benchmarks/reward_refresh.py --epochs 6 --samples 64 --pairs 32
    python benchmarks/reward_refresh.py -- refresh.noise=0.2   # extra overrides for both runs
    python benchmarks/reward_refresh.py --every 1          # one of the two runs (the other's cells: nan)

Runs ``armature train`` twice, one after the other, each on its own local Ray: ``refresh.every=0``
and ``refresh.every=1`` (``--pairs`` pairs of the policy's own samples labelled by two simulated
oracle annotators, 10% flips and 5% ties, then the scorers fine-tuned). Reads both runs' metrics
back from MLflow and prints per epoch the oracle's severe-error rate and mean (the yardstick), the
trained reward (after a refresh it is the refreshed scorers' score, so it does not compare across
the two runs), and per refresh the reward's accuracy on the new labels before and after it, and
its seconds. Epoch 1 is the same in both runs: the first refresh comes after it.
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

EPOCH_KEYS = ["reward_gym_oracle_severe_rate", "reward_gym_oracle_mean", "reward_gym_anatomy_mean", "epoch_time_s"]
REFRESH_KEYS = ["refresh_acc_before", "refresh_acc_after", "refresh_agreement", "refresh_ties", "refresh_seconds"]


def train(every: int, args, tmp: Path) -> dict[str, dict[int, float]]:
    name = f"refresh{every}"
    command = [sys.executable, "-m", "armature.cli", "train", f"algo.num_epochs={args.epochs}"]
    command += [f"algo.samples_per_epoch={args.samples}", "algo.final_eval_per_prompt=0", f"trainer.seed={args.seed}"]
    command += [f"refresh.every={every}", f"refresh.pairs={args.pairs}", "tracking.registered_model=null"]
    command += ["tracking.log_images_every=0", f"trainer.storage_path={tmp / 'ray'}"]
    command += [f"tracking.local_dir={tmp / 'track'}", f"tracking.run_name={name}", *args.overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"refresh.every={every} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    from mlflow.tracking import MlflowClient

    info = json.loads((tmp / "ray" / name / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    history = {
        key: {m.step: m.value for m in client.get_metric_history(info["mlflow_run_id"], key)}
        for key in EPOCH_KEYS + REFRESH_KEYS
    }
    history["job_s"] = {0: time.perf_counter() - start}
    print(f"refresh.every={every}: " + json.dumps(history), file=sys.stderr, flush=True)  # partial results
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, nargs="+", choices=(0, 1), default=[0, 1], help="the runs to make")
    parser.add_argument("overrides", nargs="*", help="extra overrides for both runs (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {every: train(every, args, Path(tmp)) for every in args.every}
    empty = {key: {} for key in EPOCH_KEYS + REFRESH_KEYS + ["job_s"]}
    runs = {every: runs.get(every, empty) for every in (0, 1)}
    print("epoch | severe rate (off / refresh) | oracle mean (off / refresh) | trained reward (off / refresh)")
    for epoch in range(args.epochs):
        cells = [
            " / ".join(f"{runs[every][key].get(epoch, float('nan')):.3f}" for every in (0, 1)) for key in EPOCH_KEYS[:3]
        ]
        print(f"{epoch + 1} | " + " | ".join(cells))
    print("refresh after epoch | accuracy before -> after | agreement | ties | seconds")
    for epoch in sorted(runs[1]["refresh_acc_before"]):
        r = {k: runs[1][k][epoch] for k in REFRESH_KEYS}
        print(
            f"{epoch + 1} | {r['refresh_acc_before']:.3f} -> {r['refresh_acc_after']:.3f} | "
            f"{r['refresh_agreement']:.2f} | {r['refresh_ties']:.0f} | {r['refresh_seconds']:.1f}"
        )
    seconds = [f"{runs[every]['job_s'].get(0, float('nan')):.0f}" for every in (0, 1)]
    print(f"job seconds: off {seconds[0]}, refresh {seconds[1]}")


if __name__ == "__main__":
    main()
