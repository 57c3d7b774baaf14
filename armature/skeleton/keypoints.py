"""Keypoint JSON: COCO-17 skeletons of one or several people, validated with messages that say
what to fix.

The JSON form (x, y in pixels of a ``width`` x ``height`` canvas, floats; pixel ``(i, j)`` is the
point ``x = i, y = j``, so valid coordinates lie in ``[0, width - 1] x [0, height - 1]``;
``v`` is a visibility in [0, 1], 0 = absent)::

    {"format": "coco17", "width": 64, "height": 64,
     "people": [{"keypoints": {"nose": [31.0, 12.5, 1.0], ..., "right_ankle": [27.0, 58.0, 1.0]}}]}

Every person names all 17 joints (an absent joint is ``[0, 0, 0]``; an absent joint's
coordinates are not checked). Left and right are the person's own (a person facing the camera
has the left shoulder on the image's right). In memory a :class:`Skeleton` is its canvas size
and one float array ``[P, 17, 3]`` (people, joints in :data:`COCO17` order, (x, y, v)).

numpy only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

FORMAT = "coco17"
COCO17 = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
INDEX = {name: i for i, name in enumerate(COCO17)}
# COCO's 19 limbs (joint index pairs), legs first, then torso, arms and face
EDGES = (
    (15, 13),
    (13, 11),
    (16, 14),
    (14, 12),
    (11, 12),
    (5, 11),
    (6, 12),
    (5, 6),
    (5, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (1, 2),
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
)


@dataclass(eq=False)
class Skeleton:
    """People's COCO-17 keypoints on a ``width`` x ``height`` canvas; ``array`` is ``[P, 17, 3]``."""

    width: int
    height: int
    array: np.ndarray

    def __post_init__(self):
        self.width, self.height = int(self.width), int(self.height)
        self.array = np.asarray(self.array, dtype=np.float64).reshape(-1, len(COCO17), 3)

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, width: int, height: int, people: int = 1) -> Skeleton:
        return cls(width, height, np.zeros((people, len(COCO17), 3)))

    @classmethod
    def from_json(cls, obj) -> Skeleton:
        """Parse and validate the JSON form (a dict or a JSON string); raises ValueError naming the
        field and the fix."""
        if isinstance(obj, (str, bytes)):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"pose: not valid JSON ({err}); expected an object like "
                    '{"format": "coco17", "width": W, "height": H, "people": [...]}'
                ) from None
        if not isinstance(obj, dict):
            raise ValueError(f"pose: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"format", "width", "height", "people"})
        if unknown:
            raise ValueError(f"pose: unknown field(s) {unknown}; allowed: format, width, height, people")
        if obj.get("format", FORMAT) != FORMAT:
            raise ValueError(f'format: {obj.get("format")!r} is not supported; use "coco17"')
        size = []
        for key in ("width", "height"):
            value = obj.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
                raise ValueError(f"{key}: expected a positive integer (the canvas size in pixels), got {value!r}")
            size.append(int(value))
        width, height = size
        people = obj.get("people")
        if not isinstance(people, list):
            raise ValueError(
                f'people: expected a list of {{"keypoints": {{...}}}} objects, got {type(people).__name__}'
            )
        array = np.zeros((len(people), len(COCO17), 3))
        for p, person in enumerate(people):
            where = f"people[{p}]"
            if not isinstance(person, dict) or not isinstance(person.get("keypoints"), dict):
                raise ValueError(
                    f'{where}: expected an object with a "keypoints" object mapping joint names to [x, y, visibility]'
                )
            extra = sorted(set(person) - {"keypoints"})
            if extra:
                raise ValueError(f'{where}: unknown field(s) {extra}; a person has only "keypoints"')
            keypoints = person["keypoints"]
            for name in keypoints:
                if name not in INDEX:
                    raise ValueError(
                        f"{where}.keypoints.{name}: unknown joint name; COCO-17 names are {', '.join(COCO17)}"
                    )
            for j, name in enumerate(COCO17):
                field = f"{where}.keypoints.{name}"
                if name not in keypoints:
                    raise ValueError(f"{field}: missing; every person lists all 17 joints (an absent one as [0, 0, 0])")
                value = keypoints[name]
                if (
                    not isinstance(value, (list, tuple))
                    or len(value) != 3
                    or not all(
                        isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in value
                    )
                ):
                    raise ValueError(f"{field}: expected [x, y, visibility] (three finite numbers), got {value!r}")
                x, y, v = (float(c) for c in value)
                if not 0.0 <= v <= 1.0:
                    raise ValueError(f"{field}: visibility {v:g} is outside [0, 1] (0 = absent, 1 = visible)")
                if v > 0 and not (0.0 <= x <= width - 1 and 0.0 <= y <= height - 1):
                    raise ValueError(
                        f"{field}: ({x:g}, {y:g}) is outside the {width}x{height} canvas; x must be "
                        f"in [0, {width - 1}] and y in [0, {height - 1}], or set visibility 0 if the "
                        "joint is not in the picture"
                    )
                array[p, j] = (x, y, v)
        return cls(width, height, array)

    def to_json(self) -> dict:
        """The JSON form as a dict (``json.dumps`` it, or use :meth:`dumps`)."""
        people = [
            {"keypoints": {name: [float(x), float(y), float(v)] for name, (x, y, v) in zip(COCO17, person)}}
            for person in self.array
        ]
        return {"format": FORMAT, "width": self.width, "height": self.height, "people": people}

    def dumps(self, **kwargs) -> str:
        return json.dumps(self.to_json(), **kwargs)

    # ------------------------------------------------------------------ views
    @property
    def num_people(self) -> int:
        return len(self.array)

    @property
    def visible(self) -> np.ndarray:
        """``[P, 17]`` bool: the joints present (v > 0)."""
        return self.array[..., 2] > 0

    def joint(self, name: str, person: int = 0) -> np.ndarray:
        """``(x, y, v)`` of one joint."""
        return self.array[person, INDEX[name]]

    def pixels(self) -> np.ndarray:
        """``[P, 17, 2]`` int: the pixel each joint is drawn on (x, y rounded half up)."""
        return np.floor(self.array[..., :2] + 0.5).astype(np.int64)

    def quantized(self) -> Skeleton:
        """What a rendered layout keeps: pixel coordinates, visibility 1 (present) or 0 (absent,
        coordinates 0). :func:`~armature.skeleton.parse.parse_layout` gives this back exactly."""
        present = self.visible[..., None]
        xy = np.where(present, self.pixels(), 0)
        return Skeleton(self.width, self.height, np.concatenate([xy, present], -1).astype(np.float64))

    def resized(self, width: int, height: int) -> Skeleton:
        """The same skeleton on another canvas (coordinates scaled, pixel centres kept aligned)."""
        array = self.array.copy()
        array[..., 0] *= (width - 1) / max(self.width - 1, 1)
        array[..., 1] *= (height - 1) / max(self.height - 1, 1)
        return Skeleton(width, height, array)

    def equals(self, other: Skeleton, atol: float = 1e-9) -> bool:
        return (
            (self.width, self.height) == (other.width, other.height)
            and self.array.shape == other.array.shape
            and bool(np.allclose(self.array, other.array, atol=atol))
        )

    def __repr__(self) -> str:
        return f"Skeleton({self.width}x{self.height}, {self.num_people} people, {int(self.visible.sum())} joints)"
