"""Skeletons for skeleton-guided generation (SkeleGuide): COCO-17 keypoint JSON, colour-coded
layout images (on black or over a scene) and their exact parser, skeletons from gym figures and
photos, human-in-place training triples.

* :mod:`~armature.skeleton.keypoints`: :class:`Skeleton`, the JSON schema and its validation;
* :mod:`~armature.skeleton.render`: :func:`render_layout` (the encoding is documented there);
* :mod:`~armature.skeleton.parse`: :func:`parse_layout`, exact for drawn layouts, tolerant for noisy ones;
* :mod:`~armature.skeleton.extract`: :func:`from_figure`, :func:`from_figure_image`, :func:`from_photo`;
* :mod:`~armature.skeleton.scenes`: :class:`Triple`, :func:`sample_triple`, :func:`triples`,
  :func:`photo_triples`, :func:`write_triples`, :func:`read_triples`.

numpy, scipy and PIL only (the photo path runs the pose model its caller passes: no reward is imported).
"""

from .extract import from_figure, from_figure_image, from_photo
from .keypoints import COCO17, EDGES, Skeleton
from .parse import canonical, parse_layout
from .render import JOINT_COLOURS, LIMB_COLOURS, render_layout
from .scenes import Triple, photo_triples, read_triples, sample_triple, triples, write_triples

__all__ = [
    "COCO17",
    "EDGES",
    "JOINT_COLOURS",
    "LIMB_COLOURS",
    "Skeleton",
    "canonical",
    "from_figure",
    "from_figure_image",
    "from_photo",
    "parse_layout",
    "photo_triples",
    "read_triples",
    "render_layout",
    "sample_triple",
    "triples",
    "Triple",
    "write_triples",
]
