"""Model files that rewards need but that are not on a model hub: fetched once, cached.

``armature assets pose`` fetches the MediaPipe BlazePose models used by the ``pose``
reward. They ship inside the ``mediapipe`` 0.10.14 wheel on PyPI; that wheel's own
dependencies conflict with Ray's protobuf, so it is never installed: ``pip download
--no-deps`` fetches the manylinux x86-64 CPython 3.11 wheel (whatever this machine is;
the model files inside are the same in every wheel), and only the ``.tflite`` files are
extracted into the cache (``$ARMATURE_CACHE/pose``, else ``~/.cache/armature/pose``).
They run with ``ai-edge-litert``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEDIAPIPE_VERSION = "0.10.14"

# cache file name -> member of the mediapipe wheel
POSE_FILES = {
    "pose_detection.tflite": "mediapipe/modules/pose_detection/pose_detection.tflite",
    "pose_landmark_full.tflite": "mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
    "hand_landmark_full.tflite": "mediapipe/modules/hand_landmark/hand_landmark_full.tflite",
}

FETCH_COMMAND = "armature assets pose"


class MissingAssetsError(FileNotFoundError):
    """Model files are not in the cache; the message names the command that fetches them."""


def cache_root() -> Path:
    """``$ARMATURE_CACHE`` if set, else ``~/.cache/armature``."""
    root = os.environ.get("ARMATURE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "armature"


def pose_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the pose models: ``cache_dir`` if given, else ``cache_root()/pose``."""
    return Path(cache_dir).expanduser() if cache_dir else cache_root() / "pose"


def missing_pose_files(cache_dir: str | os.PathLike | None = None) -> list[str]:
    folder = pose_dir(cache_dir)
    return [name for name in POSE_FILES if not (folder / name).is_file()]


def require_pose_files(cache_dir: str | os.PathLike | None = None) -> Path:
    """The pose model folder, or :class:`MissingAssetsError` naming the fetch command."""
    folder = pose_dir(cache_dir)
    missing = missing_pose_files(folder)
    if missing:
        option = f" --cache-dir {folder}" if cache_dir else ""
        raise MissingAssetsError(
            f"the pose reward needs the MediaPipe BlazePose models, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {folder}; fetch them once with "
            f"`{FETCH_COMMAND}{option}` (downloads the mediapipe=={MEDIAPIPE_VERSION} wheel from PyPI "
            "and keeps only its .tflite files), or set the reward's `cache_dir` / $ARMATURE_CACHE "
            "to where they are"
        )
    return folder


def download_mediapipe_wheel(dest: str | os.PathLike) -> Path:
    """``pip download`` the mediapipe wheel (no dependencies, binary only) into ``dest``."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--platform",
        "manylinux_2_17_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        f"mediapipe=={MEDIAPIPE_VERSION}",
        "--dest",
        os.fspath(dest),
        "--disable-pip-version-check",
        "--quiet",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr.strip()[-2000:]}")
    wheels = sorted(Path(dest).glob(f"mediapipe-{MEDIAPIPE_VERSION}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download finished but no mediapipe wheel is in {dest}")
    return wheels[0]


def extract_pose_files(wheel: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Copy the :data:`POSE_FILES` members of ``wheel`` into the pose folder (atomically per file)."""
    folder = pose_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for filename, member in POSE_FILES.items():
            if member not in names:
                raise RuntimeError(f"{member} is not in {wheel}")
            tmp = folder / f".{filename}.part"
            with archive.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, folder / filename)
    return folder


def fetch_pose_assets(
    cache_dir: str | os.PathLike | None = None, force: bool = False, wheel: str | os.PathLike | None = None
) -> Path:
    """Make sure the pose models are in the cache; returns their folder.

    ``wheel``: an already downloaded mediapipe wheel to extract instead of downloading.
    """
    if not force and not missing_pose_files(cache_dir):
        return pose_dir(cache_dir)
    if wheel is not None:
        return extract_pose_files(wheel, cache_dir)
    with tempfile.TemporaryDirectory(prefix="armature-mediapipe-") as tmp:
        return extract_pose_files(download_mediapipe_wheel(tmp), cache_dir)


def run(args) -> int:
    try:
        folder = fetch_pose_assets(args.cache_dir, force=args.force, wheel=args.wheel)
    except (RuntimeError, OSError, zipfile.BadZipFile) as err:
        print(f"armature: fetching the pose models failed: {err}", file=sys.stderr)
        return 1
    for name in POSE_FILES:
        print(f"{folder / name}  ({(folder / name).stat().st_size / 1e6:.1f} MB)")
    return 0
