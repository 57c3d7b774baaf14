"""Preference pairs on Ray Data: read, validate, decode, resize, (VAE-encode), into the learner.

    read_dataset(path)                 Parquet file/folder, or an image folder with pairs.jsonl/.csv
      -> prepare(ds, size, quarantine) map_batches: validate + decode + resize (+ held-out flag)
      -> encode_latents(ds, model)     optional: VAE latents on an actor pool, so the learner
                                       never decodes an image
      -> split(ds)                     (train, held-out) by a hash of pair_id
      -> TorchTrainer(datasets=...)    each worker: ray.train.get_dataset_shard("train")
                                       .iter_torch_batches(collate_fn=collate)

A record that fails validation never stops the pipeline and is never dropped silently: it is
written, as it came, to the quarantine folder (Parquet, one file per batch that had any) with
``reason`` and ``code`` columns; :func:`quarantine_summary` counts them by code for MLflow.
Ties are kept (``label = tie``, the learner gives them a 50/50 target) or dropped by config;
dropped ones go to the quarantine folder too, with code ``tie_dropped``. Files are named by
their content, so a retried or re-executed batch rewrites its file rather than adding one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from armature.data.pairs import (
    check_record,
    fit_pair,
    index_file,
    normalize_table,
    orient,
    parquet_files,
    parquet_root,
    parse_index_lines,
)

__all__ = [
    "read_dataset",
    "prepare",
    "LatentEncoder",
    "encode_latents",
    "split",
    "quarantine_summary",
    "collate",
    "build_datasets",
]

TIE_DROPPED = "tie_dropped"


# --------------------------------------------------------------------------- read
def read_dataset(path: str | os.PathLike, allow_outside_root: bool = False) -> ray.data.Dataset:
    """The raw pair records as a Ray Dataset (nothing decoded or checked yet).

    Parquet is read as stored, after every file's footer is checked (a truncated file or a
    wrong-typed column is a ValueError naming both, before anything runs); an index
    (``pairs.jsonl`` / ``pairs.csv``) is read as lines and parsed one by one, so a malformed
    line becomes a record to quarantine, not a failed read. An image path outside the
    dataset's folder is quarantined too, unless ``allow_outside_root`` (``data.allow_outside_root``).
    """
    index = index_file(path)
    if index is None:
        return ray.data.read_parquet(parquet_files(path)).map_batches(
            normalize_table,
            fn_kwargs={"root": parquet_root(path), "allow_outside_root": allow_outside_root},
            batch_format="pyarrow",
        )
    fmt = "csv" if index.suffix == ".csv" else "jsonl"
    header = None
    if fmt == "csv":
        with open(index, newline="") as f:
            header = next(csv.reader(f), [])
    return ray.data.read_text(str(index)).map_batches(
        lambda batch: parse_index_lines(batch["text"].to_pylist(), fmt, str(index.parent), header, allow_outside_root),
        batch_format="pyarrow",
    )


# --------------------------------------------------------------------------- validate + decode
def _record_hash(record: dict) -> str:
    h = hashlib.sha1()
    for key in sorted(record):
        value = record[key]
        h.update(key.encode())
        h.update(value if isinstance(value, bytes) else repr(value).encode())
    return h.hexdigest()


def _quarantine(batch: pa.Table, rows: list[int], reasons: list[str], directory: str) -> None:
    """Write the rejected rows of ``batch``, as they came, with their reasons."""
    table = batch.take(pa.array(rows, type=pa.int64()))
    records = table.to_pylist()
    hashes = [_record_hash(r) for r in records]
    table = table.append_column("reason", pa.array(reasons, type=pa.string()))
    table = table.append_column("code", pa.array([r.split(":", 1)[0] for r in reasons], type=pa.string()))
    table = table.append_column("record_hash", pa.array(hashes, type=pa.string()))
    name = hashlib.sha1("".join(hashes).encode()).hexdigest()[:20]
    if "://" not in directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, f"{directory.rstrip('/')}/part-{name}.parquet")


PROBE_PREFIX = "probe-"


def is_heldout(pair_id: str, fraction: float) -> bool:
    """Whether a pair is in the held-out split: a stable hash of its id, not a random draw.
    A pair whose id starts with ``probe-`` is always held out (a fixed evaluation set)."""
    if str(pair_id).startswith(PROBE_PREFIX):
        return True
    return fraction > 0 and zlib.crc32(str(pair_id).encode()) % 10_000 < fraction * 10_000


def prepare_batch(
    batch: pa.Table, size: int, quarantine_dir: str, keep_ties: bool = True, heldout_fraction: float = 0.0
) -> dict[str, np.ndarray]:
    """``map_batches`` function: raw records in, checked and decoded pairs out.

    Output columns: ``pair_id``, ``prompt``, ``pixels_w`` / ``pixels_l`` (``[size, size, 3]``
    uint8, image_w preferred), ``mask`` (``[size, size]`` float32; zeros when the record has
    none, so a localized loss weighs that pair like plain DPO), ``has_mask``, ``tie``, ``heldout``.
    """
    good, bad_rows, reasons = [], [], []
    for i, record in enumerate(batch.to_pylist()):
        reason, decoded = check_record(record)
        if reason is None and record["label"] == "tie" and not keep_ties:
            reason = f"{TIE_DROPPED}: data.keep_ties=false"
        if reason is not None:
            bad_rows.append(i)
            reasons.append(reason)
            continue
        if record["label"] == "l":  # image_w is always the preferred one from here on
            decoded["image_w"], decoded["image_l"] = decoded["image_l"], decoded["image_w"]
            record = orient(record)
        fitted = fit_pair(decoded, size)
        good.append((record, fitted, decoded["mask"] is not None))
    if bad_rows:
        _quarantine(batch, bad_rows, reasons, quarantine_dir)
    zeros = np.zeros((size, size), np.float32)
    return {
        "pair_id": np.array([r["pair_id"] for r, _, _ in good], dtype=object),
        "prompt": np.array([r["prompt"] for r, _, _ in good], dtype=object),
        "pixels_w": np.stack([f["image_w"] for _, f, _ in good]) if good else np.zeros((0, size, size, 3), np.uint8),
        "pixels_l": np.stack([f["image_l"] for _, f, _ in good]) if good else np.zeros((0, size, size, 3), np.uint8),
        "mask": np.stack([f["mask"] if m else zeros for _, f, m in good]).astype(np.float32)
        if good
        else np.zeros((0, size, size), np.float32),
        "has_mask": np.array([m for _, _, m in good], dtype=bool),
        "tie": np.array([r["label"] == "tie" for r, _, _ in good], dtype=bool),
        "heldout": np.array([is_heldout(r["pair_id"], heldout_fraction) for r, _, _ in good], dtype=bool),
    }


def prepare(
    ds: ray.data.Dataset,
    size: int,
    quarantine_dir: str | os.PathLike,
    keep_ties: bool = True,
    heldout_fraction: float = 0.0,
    batch_size: int = 64,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """Validate, decode and resize every pair (Ray tasks); bad records go to quarantine.

    Blocks are first cut to ``batch_size`` rows (streaming, no shuffle): readers hand over few,
    large blocks of encoded images, and a block is the unit that runs in parallel."""
    return ds.repartition(target_num_rows_per_block=batch_size).map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=num_cpus,
        fn_kwargs={
            "size": size,
            "quarantine_dir": str(quarantine_dir),
            "keep_ties": keep_ties,
            "heldout_fraction": heldout_fraction,
        },
    )


# --------------------------------------------------------------------------- latents
def load_vae(model: dict):
    """The VAE of the model a job's ``model`` section describes, float32, frozen."""
    import torch

    if model.get("family", "tiny") == "tiny":
        from armature.policies.tiny import build_tiny_sd_pipeline, tiny_config

        vae = build_tiny_sd_pipeline(tiny_config(model.get("tiny") or {})).vae
    else:
        import diffusers

        pretrained = model.get("pretrained")
        if model["family"] == "gym":
            from armature.gym.base_policy import policy_path

            pretrained = pretrained or str(policy_path())
        # the class the folder was saved with (AutoencoderKL for SD, AutoencoderTiny for the gym)
        kind = "AutoencoderKL"
        index = os.path.join(str(pretrained), "model_index.json")
        if os.path.isfile(index):
            with open(index) as f:
                entry = json.load(f).get("vae") or [None, kind]
            kind = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
            if kind not in ("AutoencoderKL", "AutoencoderTiny"):
                raise ValueError(
                    f"model.pretrained={pretrained}: model_index.json names the vae {entry!r}; "
                    "the DPO jobs encode with AutoencoderKL or AutoencoderTiny (fix the folder, "
                    "or point model.pretrained at a diffusers pipeline saved with save_pretrained)"
                )
        vae = getattr(diffusers, kind).from_pretrained(
            pretrained,
            subfolder="vae",
            revision=model.get("revision"),
            variant=model.get("variant"),
            torch_dtype=torch.float32,
        )
    return vae.requires_grad_(False).eval()


def vae_encode(vae, pixels):
    """``[B, H, W, 3]`` uint8 images -> scaled latents ``[B, C, h, w]`` (the posterior mean, so
    a cached latent is the same every epoch)."""
    import torch

    with torch.no_grad():
        x = pixels.to(vae.device, vae.dtype).permute(0, 3, 1, 2) / 127.5 - 1.0
        return encode_mean(vae, x) * vae.config.scaling_factor


def encode_mean(vae, x):
    """The latent of ``x`` (in [-1, 1]): an AutoencoderKL's posterior mean, an AutoencoderTiny's latents."""
    encoded = vae.encode(x)
    return encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents


class LatentEncoder:
    """``map_batches`` callable class: one VAE per actor; pixels out, latents in."""

    def __init__(self, model: dict, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        device = model.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae = load_vae(model).to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from armature.losses import resize_mask

        both = torch.from_numpy(np.concatenate([batch["pixels_w"], batch["pixels_l"]]))
        latents = vae_encode(self.vae, both).float().cpu()
        n = len(batch["pixels_w"])
        out = {k: v for k, v in batch.items() if k not in ("pixels_w", "pixels_l", "mask")}
        out["latents_w"], out["latents_l"] = latents[:n].numpy(), latents[n:].numpy()
        out["mask"] = resize_mask(torch.from_numpy(batch["mask"]), tuple(latents.shape[-2:]))[:, 0].numpy()
        return out


def encode_latents(
    ds: ray.data.Dataset,
    model: dict,
    num_actors: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    batch_size: int = 32,
    threads: int | None = None,
) -> ray.data.Dataset:
    """Replace pixels by VAE latents (and the mask by its latent-grid version) on an actor pool."""
    return ds.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={"model": model, "threads": threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


# --------------------------------------------------------------------------- split, counts
def _select(batch: dict[str, np.ndarray], heldout: bool) -> dict[str, np.ndarray]:
    keep = batch["heldout"] == heldout
    return {k: v[keep] for k, v in batch.items()}


def split(ds: ray.data.Dataset) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(training pairs, held-out pairs) by the ``heldout`` column."""
    return (
        ds.map_batches(_select, fn_kwargs={"heldout": False}, batch_format="numpy"),
        ds.map_batches(_select, fn_kwargs={"heldout": True}, batch_format="numpy"),
    )


def quarantine_summary(directory: str | os.PathLike) -> dict[str, int]:
    """``{"quarantined": n, "<code>": n, ...}`` over the distinct records in the quarantine
    folder; ``quarantined`` counts invalid records only, ``tie_dropped`` the dropped ties."""
    files = sorted(Path(directory).glob("*.parquet")) if "://" not in str(directory) else []
    if "://" in str(directory):
        from pyarrow import fs

        filesystem, root = fs.FileSystem.from_uri(str(directory))
        infos = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
        files = [f"{str(directory).split('://')[0]}://{i.path}" for i in infos if i.path.endswith(".parquet")]
    seen: dict[str, str] = {}
    for f in files:
        table = pq.read_table(str(f), columns=["record_hash", "code"])
        seen.update(zip(table["record_hash"].to_pylist(), table["code"].to_pylist()))
    counts: dict[str, int] = {"quarantined": 0, TIE_DROPPED: 0}
    for code in seen.values():
        counts[code] = counts.get(code, 0) + 1
        if code != TIE_DROPPED:
            counts["quarantined"] += 1
    return counts


# --------------------------------------------------------------------------- into the learner
def collate(batch: dict[str, np.ndarray]) -> dict:
    """``iter_torch_batches`` collate_fn: numeric columns as tensors, text as lists."""
    import torch

    out = {}
    for key, value in batch.items():
        if value.dtype == object or value.dtype.kind in "USO":
            out[key] = [str(v) for v in value]
        else:
            out[key] = torch.tensor(value)  # a copy: Ray's batches are read-only
    return out


def build_datasets(
    data,
    model: dict,
    size: int,
    quarantine_dir: str | os.PathLike,
    pairs_path: str | os.PathLike | None = None,
    threads: int | None = None,
):
    """The job's pipeline from its ``data`` config section (``armature.platform.config.DataConfig``;
    ``model``: the ``model`` section as a dict): ``(train, heldout)`` datasets,
    materialized when ``data.materialize`` (then the decode and VAE run once, not per epoch)."""
    ds = read_dataset(pairs_path or data.pairs, allow_outside_root=data.allow_outside_root)
    ds = prepare(
        ds,
        size,
        quarantine_dir,
        keep_ties=data.keep_ties,
        heldout_fraction=data.heldout_fraction,
        batch_size=data.batch_size,
        num_cpus=data.decode_num_cpus,
    )
    if data.cache_latents:
        ds = encode_latents(
            ds,
            model,
            num_actors=data.encoder_actors,
            num_cpus=data.encoder_num_cpus,
            num_gpus=data.encoder_num_gpus,
            batch_size=data.batch_size,
            threads=threads,
        )
    if data.materialize:
        ds = ds.materialize()
    return split(ds)
