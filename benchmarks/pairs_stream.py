"""Preference pairs per second into a training loop: the Ray Data pipeline vs a torch DataLoader.

Both read the same Parquet files of JPEG pairs, check and decode every record (bad ones left
out), resize to the model's size and hand the loop VAE latents of both images, on the same
cores, for several epochs. The loop's step is ``--step none`` (it only takes the latents: the
data path alone, as when a GPU learner waits on CPU data) or ``--step dpo`` (the DPO learner's
``pair_errors`` + loss + backward + AdamW on the tiny model with a LoRA adapter, on the same CPUs
as the data path):

* ``dataloader``: a map-style Dataset over the file, decoded in DataLoader worker processes;
  the training loop VAE-encodes both images of every pair, every epoch (what a learner does
  without a pipeline in front of it);
* ``ray``: ``armature.data.stream``: validate/decode/resize tasks and a VAE actor, materialized
  once; every epoch the loop streams cached latents (iter_torch_batches);
* ``ray-nocache`` (``--nocache``): the pipeline streaming pixels, the loop VAE-encoding them.

The figure is the ratio of pairs/s, wall time from the first read to the last step (Ray's
start is outside it; the pipeline's own work, actor start included, is inside), the median
over ``--repeats`` alternated runs. Target: >= 2. The defaults are a small dataset (1024 pairs)
for the DPO job's default 4 epochs: the pipeline's fixed cost (tasks, the VAE actor's start) is
paid once, so far fewer pairs or epochs favour the DataLoader (256 pairs, 3 epochs measured
about even on 2 cores).

    python benchmarks/pairs_stream.py [--step none|dpo] [--pairs 1024] [--source-size 512]
                                      [--epochs 4] [--cpus 2] [--repeats 3] [--nocache]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's armature, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MODEL = {
    "family": "tiny",
    "lora": {
        "enabled": True,
        "rank": 8,
        "alpha": 8.0,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
    },
}
SIZE = 32


def make_files(folder: Path, n: int, source_size: int, shards: int = 8) -> None:
    """``n`` synthetic pairs at ``source_size`` pixels, images as JPEG, in ``shards`` Parquet
    files (as stored datasets are)."""
    import numpy as np
    from PIL import Image

    from armature.data.pairs import decode_image, write_pairs
    from armature.data.synthetic import make_pair, procedural_sources

    def jpeg(data: bytes) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(decode_image(data)).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    records = []
    for i, source in enumerate(procedural_sources(n, size=source_size, seed=0)):
        pair = make_pair(source, np.random.default_rng(i))
        records.append({**pair, "image_w": jpeg(pair["image_w"]), "image_l": jpeg(pair["image_l"])})
    for k in range(shards):
        write_pairs(records[k::shards], folder / f"pairs-{k:05d}.parquet")


class Learner:
    """The DPO learner's step on the tiny model, plain torch (no DeepSpeed) for both loaders."""

    def __init__(self, threads: int, train: bool):
        import torch

        from armature.policies import build_policy

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.policy = build_policy(MODEL, {"num_steps": 10, "guidance_scale": 1.0})
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3)
        self.train = train

    def step(self, batch: dict) -> int:
        import torch

        from armature.data.stream import vae_encode
        from armature.jobs.dpo import pair_errors
        from armature.losses import diffusion_dpo_loss

        if "latents_w" not in batch:  # what the learner does without cached latents
            vae = self.policy.pipe.vae
            batch = {
                **batch,
                "latents_w": vae_encode(vae, batch["pixels_w"]),
                "latents_l": vae_encode(vae, batch["pixels_l"]),
            }
        if not self.train:
            return int(batch["latents_w"].shape[0] + 0 * float(batch["latents_l"].sum()))
        errs = pair_errors(self.policy, self.policy.unet, batch, 0.0, "epsilon")
        loss, _ = diffusion_dpo_loss(*errs, beta=5000.0)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return len(batch["prompt"])


# ------------------------------------------------------------------------------ DataLoader
class PairFile:
    """A map-style torch Dataset over a Parquet folder of pairs: check, decode, resize per item."""

    def __init__(self, path: Path):
        self.path, self.table = path, None
        import pyarrow.parquet as pq

        self.length = pq.read_table(path, columns=["pair_id"]).num_rows

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        import pyarrow.parquet as pq

        from armature.data.pairs import check_record, fit_pair

        if self.table is None:  # opened in each worker process
            self.table = pq.read_table(self.path)
        record = self.table.slice(i, 1).to_pylist()[0]
        reason, decoded = check_record(record)
        if reason is not None:
            return None
        fitted = fit_pair(decoded, SIZE)
        return record["prompt"], fitted


def collate(items):
    import numpy as np
    import torch

    items = [it for it in items if it is not None]
    zeros = np.zeros((SIZE, SIZE), np.float32)
    return {
        "prompt": [p for p, _ in items],
        "pixels_w": torch.from_numpy(np.stack([f["image_w"] for _, f in items])),
        "pixels_l": torch.from_numpy(np.stack([f["image_l"] for _, f in items])),
        "mask": torch.from_numpy(np.stack([f["mask"] if f["mask"] is not None else zeros for _, f in items])),
    }


def run_dataloader(path: Path, args) -> float:
    import torch

    learner = Learner(args.cpus, args.step == "dpo")
    loader = torch.utils.data.DataLoader(
        PairFile(path),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.cpus,
        collate_fn=collate,
        drop_last=True,
        persistent_workers=True,
    )
    start, pairs = time.perf_counter(), 0
    for _ in range(args.epochs):
        for batch in loader:
            pairs += learner.step(batch)
    return pairs / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ Ray Data
def run_ray(path: Path, args, cache: bool) -> float:
    from armature.data import stream

    learner = Learner(args.cpus, args.step == "dpo")
    start, pairs = time.perf_counter(), 0
    with tempfile.TemporaryDirectory() as quarantine:
        # decode tasks of half a logical CPU beside a quarter-CPU VAE actor: both cores stay busy, and
        # the unequal requests keep Ray from fusing the decode into the (single) actor
        ds = stream.prepare(stream.read_dataset(path), SIZE, quarantine, batch_size=32, num_cpus=0.5)
        if cache:
            ds = stream.encode_latents(ds, MODEL, num_actors=1, num_cpus=0.25, batch_size=32, threads=1)
            ds = ds.materialize()
        for epoch in range(args.epochs):
            batches = ds.iter_torch_batches(
                batch_size=args.batch,
                collate_fn=stream.collate,
                drop_last=True,
                local_shuffle_buffer_size=4 * args.batch,
                local_shuffle_seed=epoch,
            )
            for batch in batches:
                pairs += learner.step(batch)
    return pairs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--source-size", type=int, default=512, help="stored image size (pixels)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--step", choices=["none", "dpo"], default="none", help="the training loop's step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nocache", action="store_true", help="also time the pipeline without latent caching")
    args = parser.parse_args()

    import statistics

    import ray
    import ray.data

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs"
        make_files(path, args.pairs, args.source_size)
        print(
            f"{args.pairs} pairs of {args.source_size}px JPEGs -> {SIZE}px latents, {args.epochs} epochs, "
            f"batch {args.batch}, {args.cpus} CPUs, step: {args.step}",
            flush=True,
        )
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        runs = {"dataloader": lambda: run_dataloader(path, args), "ray": lambda: run_ray(path, args, cache=True)}
        if args.nocache:
            runs["ray-nocache"] = lambda: run_ray(path, args, cache=False)
        results = {name: [] for name in runs}
        for r in range(args.repeats):
            for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:  # alternated order
                results[name].append(runs[name]())
                print(f"  repeat {r + 1}: {name:12s} {results[name][-1]:8.1f} pairs/s", flush=True)
        ray.shutdown()
    base = results["dataloader"]
    print(f"dataloader   {statistics.median(base):8.1f} pairs/s (median)")
    for name in list(runs)[1:]:
        ratios = [x / b for x, b in zip(results[name], base)]
        print(
            f"{name:12s} {statistics.median(results[name]):8.1f} pairs/s   ratio {statistics.median(ratios):.2f} "
            f"(per repeat: {', '.join(f'{x:.2f}' for x in ratios)})"
        )


if __name__ == "__main__":
    main()
