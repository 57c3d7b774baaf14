"""Images per second of each reward on CPU, at batch 1 and 16, in-process vs in a Ray reward actor.

The learned models are the tiny random stand-ins the tests use (the real CLIP-H / BLIP / VLM
weights are not downloaded here), so the figures measure the plumbing at tiny-model cost; the
pose reward runs the real BlazePose models (skipped unless `armature assets pose` fetched them).
Images: 128x128 crops of scikit-image's astronaut photo (a person, so the pose reward runs
its landmark model too). One actor with 1 CPU; the actor figure includes serialising the batch
and the Ray round trip.

    python benchmarks/rewards.py [--seconds 2] [--only pose,pickscore]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def specs(root: str) -> dict[str, dict]:
    """name -> reward spec (as in reward.components), building the tiny models under ``root``."""
    from armature.jobs.reward_model import Scorer, save_scorer
    from armature.policies.tiny import build_char_tokenizer
    from armature.rewards.aesthetic import build_tiny_aesthetic
    from armature.rewards.assets import missing_pose_files
    from armature.rewards.clip_score import build_tiny_clip
    from armature.rewards.image_reward import build_tiny_image_reward
    from armature.rewards.judge import build_tiny_vlm

    tok = build_char_tokenizer(32)
    clip = build_tiny_clip(f"{root}/clip", tok)
    out = {
        "compressibility": {"compressibility": {}},
        "aesthetic (tiny)": {"aesthetic": {"path": build_tiny_aesthetic(f"{root}/aesthetic")}},
        "clip_score (tiny)": {"clip_score": {"path": clip}},
        "pickscore (tiny)": {"pickscore": {"path": clip, "processor": None}},
        "image_reward (tiny)": {"image_reward": {"path": build_tiny_image_reward(f"{root}/ir", tok)}},
        "mllm_judge (tiny, 2 questions)": {"mllm_judge": {"path": build_tiny_vlm(f"{root}/vlm"), "max_new_tokens": 4}},
        "learned (tiny)": {
            "learned": {
                "path": str(
                    save_scorer(
                        Scorer(clip, None),
                        __import__("pathlib").Path(f"{root}/scorer"),
                        clip,
                        {"processor": None, "severity_weight": 0.0, "loss": "bradley_terry"},
                    )
                )
            }
        },
    }
    if not missing_pose_files():
        out["pose (BlazePose)"] = {"pose": {}}
    return out


def images(n: int) -> np.ndarray:
    from skimage import data

    photo = data.astronaut()
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(n):
        y, x = rng.integers(0, 512 - 256, 2)
        crops.append(photo[y : y + 256 : 2, x : x + 256 : 2])
    return np.stack(crops)


def rate(fn, batch: int, seconds: float) -> float:
    """Images per second of ``fn()`` scoring ``batch`` images, after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per cell")
    parser.add_argument("--only", default="", help="comma-separated substrings of the rewards to run")
    args = parser.parse_args()
    import ray
    import torch
    from PIL import Image

    from armature.actors import start_reward_actors
    from armature.rewards import load_weighted

    torch.set_num_threads(1)
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    pool = images(16)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name, spec in specs(root).items():
            if args.only and not any(k in name for k in args.only.split(",")):
                continue
            local = load_weighted(spec)
            (actor,) = start_reward_actors(1, spec, num_cpus=1, num_gpus=0, max_restarts=0)
            row = [name]
            for batch in (1, 16):
                arrays, prompts = pool[:batch], ["an astronaut holding a helmet"] * batch
                pil = [Image.fromarray(a) for a in arrays]
                in_process = rate(lambda: local(pil, prompts), batch, args.seconds)  # noqa: B023 (called at once)
                in_actor = rate(lambda: ray.get(actor.score.remote(arrays, prompts)), batch, args.seconds)  # noqa: B023
                row += [in_process, in_actor]
            ray.kill(actor)
            rows.append(row)
            print(f"{name}: " + ", ".join(f"{v:.1f}" for v in row[1:]), flush=True)
    ray.shutdown()
    print(
        "\n| reward | batch 1 in-process | batch 1 actor | batch 16 in-process | batch 16 actor | actor / in-process (16) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, p1, a1, p16, a16 in rows:
        print(f"| {name} | {p1:.1f} | {a1:.1f} | {p16:.1f} | {a16:.1f} | {a16 / p16:.2f} |")
    print("\nimages/s on CPU (torch threads 1 in-process; the actor has 1 CPU).")


if __name__ == "__main__":
    main()
