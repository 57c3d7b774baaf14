"""Human-in-place training triples: (scene without the person, layout, scene with the person).

A :class:`Triple` holds

==============  =====================================================================
``prompt``      the text (the gym pose class's prompt, or a photo's caption)
``scene``       ``[H, W, 3]`` uint8: the picture without the person
``layout``      ``[H, W, 3]`` uint8: :func:`~armature.skeleton.render.render_layout` of the
                skeleton over the scene (the paper's scene-aware layout, stage 1's target)
``target``      ``[H, W, 3]`` uint8: the scene with the person (stage 2's target)
``person_mask`` ``[H, W]`` bool: the person's pixels grown by ``grow`` px (1 in the gym); outside
                it ``target == scene``
``skeleton``    the :class:`~armature.skeleton.keypoints.Skeleton`
``source``      ``gym`` or the photo's file name
==============  =====================================================================

* **Gym** (:func:`sample_triple`, :func:`triples`): an intact figure on a drawn background;
  the scene is the background, the target the rendered figure, the skeleton
  :func:`~armature.skeleton.extract.from_figure` (exact, from the renderer).
* **Photos** (:func:`photo_triples`): a folder of ``NAME.png`` (or .jpg) with ``NAME.mask.png``
  (the person, white on black) and optionally ``NAME.txt`` (the prompt). The skeleton comes from
  the pose function the caller gives, e.g. :func:`~armature.skeleton.extract.from_photo` with
  BlazePose; the scene is the photo with the
  grown mask *filled*: every masked pixel takes the colour of the nearest unmasked pixel, then
  the filled region is blurred (Gaussian, sigma = 1 % of the image's shorter side, at least 1 px)
  so that no silhouette of the person is left as a hard edge. This is a cheap stand-in for a
  real inpainting model: the region is a smooth smear of its surroundings, not a plausible
  background. Photos in which the pose model finds no one are skipped (with a warning).

:func:`write_triples` / :func:`read_triples` store triples as one Parquet file, images as PNG
bytes (lossless), the skeleton as its JSON text, in the style of :mod:`armature.data.pairs`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from armature.gym.figures import label_map, render, sample_figure
from armature.images import decode_image, encode_image

from .extract import from_figure
from .keypoints import Skeleton
from .render import render_layout

COLUMNS = ("triple_id", "prompt", "scene", "layout", "target", "person_mask", "skeleton", "source")


@dataclass(eq=False)
class Triple:
    prompt: str
    scene: np.ndarray
    layout: np.ndarray
    target: np.ndarray
    person_mask: np.ndarray
    skeleton: Skeleton
    source: str = "gym"


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` dilated by ``pixels`` (8-connected steps)."""
    mask = np.asarray(mask, dtype=bool)
    return ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=pixels) if pixels > 0 else mask


# ----------------------------------------------------------------------------- the gym
def sample_triple(rng: np.random.Generator, pose: str | None = None, grow: int = 1) -> Triple:
    """One gym triple: a random intact figure (of pose class ``pose``) on a random scene."""
    figure = sample_figure(rng, pose)
    skeleton = from_figure(figure)
    scene = figure.background
    return Triple(
        prompt=figure.prompt,
        scene=scene,
        layout=render_layout(skeleton, scene),
        target=render(figure),
        person_mask=grow_mask(label_map(figure.parts) > 0, grow),
        skeleton=skeleton,
    )


def triples(n: int, seed: int = 0, pose: str | None = None) -> list[Triple]:
    """``n`` gym triples, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_triple(rng, pose) for _ in range(n)]


# ----------------------------------------------------------------------------- photos
def fill_region(image: np.ndarray, mask: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """``image`` with ``mask`` filled by the nearest unmasked colours, blurred inside the mask."""
    image, mask = np.asarray(image), np.asarray(mask, dtype=bool)
    if not mask.any():
        return image.copy()
    if mask.all():
        return np.broadcast_to(image.reshape(-1, 3).mean(0).astype(np.uint8), image.shape).copy()
    _, (rows, cols) = ndimage.distance_transform_edt(mask, return_indices=True)
    filled = image[rows, cols].astype(np.float64)
    sigma = sigma if sigma is not None else max(1.0, 0.01 * min(mask.shape))
    blurred = np.stack([ndimage.gaussian_filter(filled[..., c], sigma) for c in range(3)], -1)
    out = image.copy()
    out[mask] = np.clip(np.round(blurred[mask]), 0, 255).astype(np.uint8)
    return out


def photo_triples(folder: str | os.PathLike, pose, prompt: str = "a person", grow: int = 3) -> list[Triple]:
    """Triples from a folder of photos with person masks (see the module docstring).

    ``pose``: a function image -> :class:`Skeleton`, e.g. BlazePose's:
    ``lambda image: from_photo(image, armature.rewards.pose.BlazePose(min_detection_score=0.3))``
    (build the model once, outside the function).
    """
    if pose is None:
        raise ValueError(
            "photo_triples: pose=None; pass a function image -> Skeleton, e.g. from_photo with "
            "an armature.rewards.pose.BlazePose(min_detection_score=0.3) estimator"
        )
    from PIL import Image

    folder = Path(folder)
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg") or path.stem.endswith(".mask"):
            continue
        mask_path = path.with_name(path.stem + ".mask.png")
        if not mask_path.is_file():
            continue
        image = np.array(Image.open(path).convert("RGB"))
        mask = np.array(Image.open(mask_path).convert("L")) > 127
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"{mask_path.name}: mask is {mask.shape[::-1]}, the photo {image.shape[1::-1]}; "
                "a mask must have its photo's size"
            )
        skeleton = pose(image)
        if skeleton.num_people == 0 or not skeleton.visible.any():
            warnings.warn(f"{path.name}: the pose model found no one; skipped", stacklevel=2)
            continue
        text = path.with_suffix(".txt")
        person = grow_mask(mask, grow)
        scene = fill_region(image, person)
        out.append(
            Triple(
                prompt=text.read_text().strip() if text.is_file() else prompt,
                scene=scene,
                layout=render_layout(skeleton, scene),
                target=image,
                person_mask=person,
                skeleton=skeleton,
                source=path.name,
            )
        )
    return out


# ----------------------------------------------------------------------------- Parquet
def schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("triple_id", pa.string()),
            ("prompt", pa.string()),
            ("scene", pa.binary()),
            ("layout", pa.binary()),
            ("target", pa.binary()),
            ("person_mask", pa.binary()),
            ("skeleton", pa.string()),
            ("source", pa.string()),
        ]
    )


def write_triples(items, path: str | os.PathLike) -> int:
    """Write triples to one Parquet file (images as PNG bytes); returns the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "triple_id": f"{i:06d}",
            "prompt": t.prompt,
            "scene": encode_image(t.scene),
            "layout": encode_image(t.layout),
            "target": encode_image(t.target),
            "person_mask": encode_image(np.asarray(t.person_mask, dtype=bool)),
            "skeleton": t.skeleton.dumps(),
            "source": t.source,
        }
        for i, t in enumerate(items)
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema()), str(path))
    return len(rows)


def read_triples(path: str | os.PathLike) -> list[Triple]:
    """The triples of a Parquet file written by :func:`write_triples`."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a triples file, columns {missing} are missing (expected {list(COLUMNS)})")
    out = []
    for row in table.to_pylist():
        out.append(
            Triple(
                prompt=row["prompt"],
                scene=decode_image(row["scene"]),
                layout=decode_image(row["layout"]),
                target=decode_image(row["target"]),
                person_mask=decode_image(row["person_mask"], "L") > 127,
                skeleton=Skeleton.from_json(json.loads(row["skeleton"])),
                source=row["source"] or "",
            )
        )
    return out
