"""Synthetic localized-degradation preference pairs (ASAP, Sec. 4.1), built as a Ray Data job.

From a good image and a region of it, the pair is (the intact image = preferred, the image with
that region geometrically broken = rejected, the region as the mask). The two images differ
only inside the mask, so the preference is attributable to the region alone. Degradations:

* ``duplicate``: a neighbouring part of the image is copied into the region (a part twice);
* ``mirror``: the region's content is flipped (left-right or up-down);
* ``warp``: a smooth random displacement field bends the region (local elastic warp);
* ``remove``: the region is filled in from its surroundings (a part missing);
* ``shift``: the region's content is displaced by a quarter of its size (a dislocated part).

The region comes from a given mask, a box ``[x0, y0, x1, y1]`` or pose keypoints (the box
around them, padded); a source with none of these gets a random box. Sources are records
``{id, prompt, image, mask?, box?, keypoints?}`` (images as bytes, arrays or paths), e.g. a
``sources.jsonl`` next to the images. Command line (writes a Parquet folder of pairs)::

    python -m armature.data.synthetic SOURCES_DIR_OR_JSONL OUT [--kinds mirror,warp] [--seed 0]
    python -m armature.data.synthetic --procedural 256 OUT   # built-in drawings, nothing to download

Only :func:`build_pairs` imports Ray; the degradations are numpy.
"""

from __future__ import annotations

import argparse
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEGRADATIONS",
    "box_mask",
    "keypoint_box",
    "region_mask",
    "degrade",
    "make_pair",
    "synthesize_batch",
    "procedural_sources",
    "build_pairs",
]

DEGRADATIONS = ("duplicate", "mirror", "warp", "remove", "shift")


# --------------------------------------------------------------------------- regions
def box_mask(shape: tuple[int, int], box) -> np.ndarray:
    """``[H, W]`` bools, True inside ``box = (x0, y0, x1, y1)`` (pixels, end-exclusive, clipped)."""
    h, w = shape
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask = np.zeros((h, w), dtype=bool)
    mask[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = True
    return mask


def keypoint_box(keypoints, shape: tuple[int, int], pad: float = 0.08, min_confidence: float = 0.0):
    """The box around pose keypoints ``[[x, y], ...]`` or ``[[x, y, confidence], ...]``, padded by
    ``pad`` (a fraction of the image's shorter side, or pixels when >= 1). Points under
    ``min_confidence`` are left out. Returns ``(x0, y0, x1, y1)``."""
    points = np.asarray(keypoints, dtype=np.float64).reshape(-1, np.asarray(keypoints).shape[-1])
    if points.shape[1] >= 3:
        points = points[points[:, 2] >= min_confidence]
    if len(points) == 0:
        raise ValueError("keypoints: no point above min_confidence")
    margin = pad if pad >= 1 else pad * min(shape)
    (x0, y0), (x1, y1) = points[:, :2].min(0) - margin, points[:, :2].max(0) + margin
    return (np.floor(x0), np.floor(y0), np.ceil(x1) + 1, np.ceil(y1) + 1)


def region_mask(source: dict, shape: tuple[int, int], rng: np.random.Generator, pad: float = 0.08) -> np.ndarray:
    """The region of a source: its ``mask``, else its ``box``, else its ``keypoints``, else random."""
    from armature.data.pairs import decode_image, load_bytes

    if source.get("mask") is not None:
        mask = source["mask"]
        mask = np.asarray(mask) if isinstance(mask, np.ndarray) else decode_image(load_bytes(mask), "L")
        return mask > (0.5 if mask.dtype.kind == "f" or mask.dtype == bool else 127)
    if source.get("box") is not None:
        return box_mask(shape, source["box"])
    if source.get("keypoints") is not None:
        return box_mask(shape, keypoint_box(source["keypoints"], shape, pad))
    h, w = shape
    bh, bw = max(2, h // 4), max(2, w // 4)
    y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    return box_mask(shape, (x, y, x + bw, y + bh))


# --------------------------------------------------------------------------- degradations
def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[y, x] = image[y - dy, x - dx]``, edges repeated."""
    h, w = image.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return image[ys][:, xs]


def _bilinear(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``image`` sampled at float coordinates (clamped to the image)."""
    h, w = image.shape[:2]
    ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    img = image.astype(np.float64)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _smooth_noise(rng, shape, cells: int = 3) -> np.ndarray:
    """A smooth random field in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    h, w = shape
    grid = rng.uniform(-1, 1, size=(cells, cells, 1))
    ys = np.linspace(0, cells - 1, h)[:, None].repeat(w, 1)
    xs = np.linspace(0, cells - 1, w)[None, :].repeat(h, 0)
    return _bilinear(grid, ys, xs)[..., 0]


def _fill_from_surroundings(image: np.ndarray, mask: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Harmonic inpainting: masked pixels relax to the average of their neighbours (worked on
    the region's bounding box plus a one-pixel ring, the only pixels that matter)."""
    y0, y1, x0, x1 = _bbox(mask)
    y0, x0 = max(0, y0 - 1), max(0, x0 - 1)
    y1, x1 = min(mask.shape[0], y1 + 1), min(mask.shape[1], x1 + 1)
    out = image.astype(np.float64)
    crop, region = out[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    crop[region] = crop[~region].mean(axis=0) if (~region).any() else crop.mean(axis=(0, 1))
    for _ in range(iterations):
        padded = np.pad(crop, ((1, 1), (1, 1), (0, 0)), mode="edge")
        average = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4
        crop[region] = average[region]
    return out


def degrade(image: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` (``[H, W, 3]`` uint8) with the region ``mask`` broken by ``kind``; every pixel
    outside the mask is the source's own."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("degrade: the mask is empty")
    y0, y1, x0, x1 = _bbox(mask)
    bh, bw = y1 - y0, x1 - x0
    h, w = image.shape[:2]
    if kind == "duplicate":  # the neighbour one box away, pasted in (toward the image centre)
        horizontal = rng.random() < 0.5
        if horizontal:
            dy, dx = 0, (bw if x0 + bw / 2 > w / 2 else -bw)
        else:
            dy, dx = (bh if y0 + bh / 2 > h / 2 else -bh), 0
        source = _shifted(image, dy, dx)
    elif kind == "mirror":
        source = image.copy()
        box = image[y0:y1, x0:x1]
        source[y0:y1, x0:x1] = box[:, ::-1] if (bw >= bh) == (rng.random() < 0.75) else box[::-1]
    elif kind == "shift":
        dy, dx = (int(rng.choice([-1, 1]) * max(1, round(s / 4))) for s in (bh, bw))
        source = _shifted(image, dy, dx)
    elif kind == "warp":
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
        amp = 0.3 * min(bh, bw)
        local = (slice(y0, y1), slice(x0, x1))
        # zero at the region's border so the warp is smooth and stays inside it
        ty = np.sin(np.linspace(0, np.pi, bh))[:, None]
        tx = np.sin(np.linspace(0, np.pi, bw))[None, :]
        ys[local] += amp * ty * tx * _smooth_noise(rng, (bh, bw))
        xs[local] += amp * ty * tx * _smooth_noise(rng, (bh, bw))
        source = np.clip(np.round(_bilinear(image, ys, xs)), 0, 255).astype(np.uint8)
    elif kind == "remove":
        source = np.clip(np.round(_fill_from_surroundings(image, mask)), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"degradation {kind!r}: expected one of {DEGRADATIONS}")
    out = image.copy()
    out[mask] = source[mask]
    return out


def make_pair(source: dict, rng: np.random.Generator, kinds=DEGRADATIONS, pad: float = 0.08) -> dict | None:
    """One pair record from one source, with a degradation drawn from ``kinds`` (another is
    tried when one leaves the region unchanged, e.g. mirroring a flat patch); None if none
    changes it."""
    from armature.data.pairs import decode_image, encode_image, load_bytes

    image = source["image"]
    image = image if isinstance(image, np.ndarray) else decode_image(load_bytes(image), "RGB")
    mask = region_mask(source, image.shape[:2], rng, pad)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"source {source.get('id')}: mask {mask.shape} does not fit image {image.shape[:2]}")
    for kind in rng.permutation(list(kinds)):
        degraded = degrade(image, mask, str(kind), rng)
        if not np.array_equal(degraded, image):
            return {
                "pair_id": f"{source.get('id')}:{kind}",
                "prompt": source.get("prompt") or "",
                "image_w": encode_image(image),  # PNG: lossless, so "only inside the mask" holds on disk
                "image_l": encode_image(degraded),
                "label": "w",
                "mask": encode_image(mask.astype(np.uint8) * 255),
                "severity_w": 0,
                "severity_l": None,  # not rated
                "source": f"synthetic:{kind}",
            }
    return None


def _record_rng(seed: int, source_id: Any) -> np.random.Generator:
    """Randomness per source, the same whatever the batching."""
    return np.random.default_rng([seed, zlib.crc32(str(source_id).encode())])


def synthesize_batch(batch, kinds=DEGRADATIONS, seed: int = 0, pad: float = 0.08):
    """Ray Data ``map_batches`` function (pyarrow batches): sources in, pairs out (schema of
    :mod:`armature.data.pairs`). A source that yields no pair is left out."""
    import pyarrow as pa

    from armature.data.pairs import schema

    records = []
    for source in batch.to_pylist():
        pair = make_pair(source, _record_rng(seed, source.get("id")), kinds, pad)
        if pair is not None:
            records.append(pair)
    return pa.Table.from_pylist(records, schema=schema())


# --------------------------------------------------------------------------- sources
COLORS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (220, 200, 40),
    "purple": (140, 50, 170),
    "orange": (230, 130, 30),
}


def procedural_sources(n: int, size: int = 32, seed: int = 0) -> list[dict]:
    """``n`` drawings of a stick figure (head, body, two arms ending in hands) on a graded
    background, with a prompt naming its colour and the keypoints of one hand: good images
    with a 'hand' region, for jobs and tests that download nothing."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    names = list(COLORS)
    scale = max(1, 128 // size)  # small images are drawn large, then downsampled: smooth edges
    sources = []
    for i in range(n):
        s = size * scale
        top, bottom = rng.integers(120, 256, 3), rng.integers(60, 200, 3)
        ramp = np.linspace(0, 1, s)[:, None, None]
        background = (top * (1 - ramp) + bottom * ramp).repeat(s, 1).astype(np.uint8)
        image = Image.fromarray(background)
        draw = ImageDraw.Draw(image)
        name = names[int(rng.integers(len(names)))]
        color = COLORS[name]
        cx = s * rng.uniform(0.4, 0.6)
        head_y, hip_y = s * rng.uniform(0.2, 0.3), s * rng.uniform(0.6, 0.7)
        r = s * 0.09
        draw.ellipse([cx - r, head_y - r, cx + r, head_y + r], fill=color)
        draw.line([cx, head_y + r, cx, hip_y], fill=color, width=int(s * 0.07))
        shoulder = head_y + 2 * r
        hands = []
        for side in (-1, 1):
            hand = (cx + side * s * rng.uniform(0.25, 0.35), shoulder + s * rng.uniform(-0.15, 0.2))
            draw.line([cx, shoulder, *hand], fill=color, width=int(s * 0.05))
            hr = s * 0.045
            draw.ellipse([hand[0] - hr, hand[1] - hr, hand[0] + hr, hand[1] + hr], fill=(90, 60, 40))
            hands.append(hand)
        for side in (-1, 1):  # legs
            draw.line([cx, hip_y, cx + side * s * 0.15, s * 0.95], fill=color, width=int(s * 0.05))
        image = image.resize((size, size), Image.LANCZOS)
        hand = hands[int(rng.integers(2))]
        sources.append(
            {
                "id": f"figure-{seed}-{i}",
                "prompt": f"a {name} figure waving",
                "image": np.asarray(image),
                "keypoints": [[hand[0] / scale, hand[1] / scale]],
            }
        )
    return sources


# --------------------------------------------------------------------------- the Ray Data job
def build_pairs(
    sources, out: str | os.PathLike, kinds=DEGRADATIONS, seed: int = 0, pad: float = 0.08, batch_size: int = 32
) -> int:
    """Build pairs from ``sources`` with Ray Data and write them to the Parquet folder ``out``.

    ``sources``: a list of source dicts, a ``sources.jsonl`` file or a folder holding one
    (image and mask paths relative to it), or a Ray Dataset of sources. Returns the pair count.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from armature.data.pairs import encode_image

    if isinstance(sources, (str, os.PathLike)):
        index = Path(sources)
        index = index / "sources.jsonl" if index.is_dir() else index
        ds = ray.data.read_json(str(index)).map(_resolve, fn_kwargs={"root": str(index.parent)})
    elif isinstance(sources, list):
        rows = [
            {k: encode_image(v) if isinstance(v, np.ndarray) and k in ("image", "mask") else v for k, v in s.items()}
            for s in sources
        ]
        ds = ray.data.from_arrow(pa.Table.from_pylist(rows))
    else:
        ds = sources
    pairs = ds.map_batches(
        synthesize_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_kwargs={"kinds": tuple(kinds), "seed": seed, "pad": pad},
    )
    pairs.write_parquet(str(out))
    return pq.read_table(str(out), columns=["pair_id"]).num_rows


def _resolve(row: dict, root: str) -> dict:
    """Image and mask paths of a source, made absolute against the index's folder."""
    row = dict(row)
    for key in ("image", "mask"):
        value = row.get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            row[key] = str(Path(root) / value)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="?", help="sources.jsonl, or a folder holding one")
    parser.add_argument("out", help="output Parquet folder")
    parser.add_argument("--procedural", type=int, default=0, help="use N built-in drawings as sources")
    parser.add_argument("--size", type=int, default=32, help="image size of the built-in drawings")
    parser.add_argument("--kinds", default=",".join(DEGRADATIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pad", type=float, default=0.08, help="keypoint box padding")
    args = parser.parse_args(argv)
    if not args.procedural and not args.sources:
        parser.error("give SOURCES or --procedural N")
    sources = procedural_sources(args.procedural, args.size, args.seed) if args.procedural else args.sources
    n = build_pairs(sources, args.out, kinds=args.kinds.split(","), seed=args.seed, pad=args.pad)
    print(f"wrote {n} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
