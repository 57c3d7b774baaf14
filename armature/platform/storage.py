"""Job storage: a local folder or a URI (``s3://``, ``gs://``, ...) through pyarrow.fs.

Ray Train keeps checkpoints under ``<storage_path>/<run name>``; Armature keeps a small JSON
file beside them naming the run's MLflow run, so that a rerun finds it.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["normalize_storage_path", "read_json", "write_json"]


def normalize_storage_path(path: str) -> str:
    """An absolute local path, or the URI unchanged (``Path`` would mangle ``s3://``)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _fs(path: str):
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def read_json(path: str) -> dict | None:
    """The JSON object at ``path``, or None when there is none."""
    import pyarrow.fs

    fs, p = _fs(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return json.loads(f.read().decode())


def write_json(path: str, value: dict) -> None:
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(json.dumps(value).encode())
