"""The preference-pair format: one schema, a writer, a reader and a validator. No Ray here.

A pair is one record (one Parquet row):

=============  ========  =================================================================
column         type      meaning
=============  ========  =================================================================
pair_id        string    unique id of the pair (required)
prompt         string    the text both images answer (required)
image_w        binary    encoded image (PNG, JPEG, WebP, ...) of the preferred image, or a
               | string  path / URI to one (relative paths: from the index's folder)
image_l        same      the rejected image
label          string    which image the rater preferred: ``w`` (image_w, the usual case),
                         ``l`` (image_l; readers swap the two so that downstream image_w is
                         always the preferred one) or ``tie`` (rated equal)
mask           binary    optional: the region the two images differ in (where the error is),
               | string  a single-channel PNG of image_w's size (or its path); 0 = outside
severity_w/_l  int8      optional: anatomical-error severity of each image, 0 none, 1 minor,
                         2 moderate, 3 severe (BACON's four levels)
source         string    optional: where the pair comes from (``synthetic:mirror``, a dataset)
=============  ========  =================================================================

Written by :func:`write_pairs` as Parquet (images as bytes). :func:`read_pairs` also reads a
folder of images indexed by ``pairs.jsonl`` or ``pairs.csv`` (the same columns, images as
paths; one record a line, a CSV's first line naming the columns). :func:`check_record` says
what is wrong with a record, as ``"<code>: <detail>"`` (codes: :data:`REASON_CODES`).

Reading is bounded, since a pair dataset may come from anyone: an image path must lie inside the
dataset's folder once symlinks are resolved (``../``, absolute paths elsewhere and URIs are
refused unless ``data.allow_outside_root``); only regular files of at most
:data:`MAX_FILE_BYTES` are read; an image's size is checked from its header, before decoding,
against :data:`MAX_IMAGE_PIXELS` and :data:`MAX_ASPECT_RATIO`. A Parquet file that cannot be read
(truncated, or a column of the wrong type) is refused as a whole, naming the file and the column.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from armature.images import (
    ImageSizeError,
    decode_image,
    encode_image,
)

__all__ = [
    "COLUMNS",
    "LABELS",
    "REASON_CODES",
    "SEVERITY_LEVELS",
    "schema",
    "encode_image",
    "decode_image",
    "ImageSizeError",
    "load_bytes",
    "write_pairs",
    "read_pairs",
    "index_file",
    "normalize_table",
    "column_problem",
    "parquet_files",
    "parquet_root",
    "parse_index_lines",
    "text_schema",
    "check_record",
    "validate_pairs",
    "orient",
    "fit_pair",
]

COLUMNS = ("pair_id", "prompt", "image_w", "image_l", "label", "mask", "severity_w", "severity_l", "source")
REQUIRED = ("pair_id", "prompt", "image_w", "image_l", "label")
LABELS = ("w", "l", "tie")
SEVERITY_LEVELS = (0, 1, 2, 3)
INDEX_FILES = ("pairs.jsonl", "pairs.csv")
# The first word of every reason check_record gives.
REASON_CODES = (
    "corrupt_record",
    "missing_field",
    "unknown_label",
    "unreadable_image",
    "corrupt_image",
    "mask_size",
    "severity_range",
    "path_outside_root",
    "image_too_large",
    "image_aspect",
)
MAX_FILE_BYTES = 64 * 2**20  # an image file larger than this is not read
OUTSIDE_ROOT_FLAG = "data.allow_outside_root"  # the config flag that lets image paths leave the dataset's folder


def schema():
    """The Parquet schema :func:`write_pairs` writes."""
    import pyarrow as pa

    return pa.schema(
        [
            ("pair_id", pa.string()),
            ("prompt", pa.string()),
            ("image_w", pa.binary()),
            ("image_l", pa.binary()),
            ("label", pa.string()),
            ("mask", pa.binary()),
            ("severity_w", pa.int8()),
            ("severity_l", pa.int8()),
            ("source", pa.string()),
        ]
    )


# --------------------------------------------------------------------------- images
def load_bytes(value: Any, root: str | os.PathLike | None = None, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of an image column value: bytes as they are, else read from a path or URI.

    Only a regular file of at most ``max_bytes`` is read: a FIFO, a device or a directory is
    refused without being read (a FIFO is opened non-blocking, so it cannot hang the reader)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    value = str(value)
    if "://" in value:
        from pyarrow import fs

        filesystem, path = fs.FileSystem.from_uri(value)
        info = filesystem.get_file_info(path)
        if info.type != fs.FileType.File:
            raise ValueError(f"{value}: not a regular file ({info.type.name}); only regular files are read")
        _check_file_size(value, info.size, max_bytes)
        with filesystem.open_input_stream(path) as stream:
            data = stream.read(max_bytes + 1)
    else:
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(
                    f"{path}: not a regular file ({_file_kind(info.st_mode)}); only regular files are read"
                )
            _check_file_size(path, info.st_size, max_bytes)
            with open(fd, "rb", closefd=False) as f:
                data = f.read(max_bytes + 1)
        finally:
            os.close(fd)
    _check_file_size(value, len(data), max_bytes)  # a file that grew while being read
    return data


def _check_file_size(name, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ValueError(f"{name}: {size:,} bytes, over the {max_bytes:,} an image file may have")


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


# --------------------------------------------------------------------------- writing
def _normalize(record: dict) -> dict:
    out = {k: record.get(k) for k in COLUMNS}
    for key in ("image_w", "image_l"):
        if out[key] is not None and not isinstance(out[key], (str, bytes)):
            out[key] = encode_image(out[key])
    if out["mask"] is not None and not isinstance(out["mask"], (str, bytes)):
        out["mask"] = encode_image(np.asarray(out["mask"]))
    return out


def write_pairs(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Write pairs (dicts with the columns above) to one Parquet file; returns the count.

    Images may be bytes, PIL images or uint8 arrays (stored as PNG, losslessly); masks may be
    arrays (bool, 0/1 floats or uint8). Paths are read and stored as bytes. Nothing is
    validated here: run :func:`validate_pairs` first to refuse bad records.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for record in records:
        row = _normalize(record)
        for key in ("image_w", "image_l", "mask"):
            if isinstance(row[key], str):
                row[key] = load_bytes(row[key])
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=schema())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))
    return len(rows)


# --------------------------------------------------------------------------- reading
def index_file(path: str | os.PathLike) -> Path | None:
    """The ``pairs.jsonl`` / ``pairs.csv`` index of a folder of images (or the file itself)."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json", ".csv") and path.is_file():
        return path
    for name in INDEX_FILES:
        if (path / name).is_file():
            return path / name
    return None


def normalize_table(table, root: str | os.PathLike | None = None, allow_outside_root: bool = False):
    """Every schema column present (absent optional ones as nulls, ids as strings); relative
    image paths made absolute against ``root`` (the dataset's folder); plus ``_error``: why a
    record may not be read (an image path outside ``root``, unless ``allow_outside_root``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for field in table.schema:
        problem = column_problem(field.name, field.type)
        if problem:
            raise ValueError(problem)
    target = schema()
    for name in COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(len(table), type=target.field(name).type))
    table = table.select(list(COLUMNS))
    for name in ("pair_id", "prompt", "label", "source"):
        if table.schema.field(name).type != pa.string():
            table = table.set_column(COLUMNS.index(name), name, pc.cast(table[name], pa.string()))
    errors = [None] * len(table)
    for name in ("image_w", "image_l", "mask"):
        column = table[name]
        if pa.types.is_null(column.type):
            column = pc.cast(column, pa.binary())
        elif (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) and root is not None:
            paths = column.to_pylist()
            column = pa.array([_absolute(v, root) for v in paths], type=pa.string())
            for i, (path, resolved) in enumerate(zip(paths, column.to_pylist())):
                errors[i] = errors[i] or _path_error(name, path, resolved, root, allow_outside_root)
        table = table.set_column(COLUMNS.index(name), name, column)
    return table.append_column("_error", pa.array(errors, type=pa.string()))


def column_problem(name: str, type) -> str | None:
    """What is wrong with a pair column of this Arrow type (``None``: it can be read)."""
    import pyarrow as pa

    t = pa.types
    if name in ("image_w", "image_l", "mask"):
        ok = t.is_binary(type) or t.is_large_binary(type) or t.is_string(type) or t.is_large_string(type)
        wanted = "binary (the encoded image) or string (its path)"
    elif name in ("severity_w", "severity_l"):
        ok = t.is_integer(type) or t.is_floating(type) or t.is_string(type) or t.is_large_string(type)
        wanted = "an integer (0, 1, 2 or 3)"
    elif name in COLUMNS:
        text = t.is_string(type) or t.is_large_string(type)
        ok = (
            text
            or t.is_integer(type)
            or t.is_floating(type)
            or (t.is_dictionary(type) and t.is_string(type.value_type))
        )
        wanted = "one string per pair" + (" (w, l or tie)" if name == "label" else "")
    else:
        return None
    return None if ok or t.is_null(type) else f"column {name!r} is {type}, expected {wanted}"


def parquet_files(path: str | os.PathLike) -> list[str]:
    """The Parquet files of a pair dataset (the file, or a folder's ``*.parquet`` at any depth),
    each checked from its footer: a file that does not open (truncated, not Parquet) or has a
    pair column of the wrong type is a ValueError naming the file and the column."""
    import pyarrow.parquet as pq
    from pyarrow import fs

    path = str(path)
    if "://" in path:
        filesystem, location = fs.FileSystem.from_uri(path)
        scheme = path.split("://", 1)[0] + "://"
    else:
        filesystem, location, scheme = fs.LocalFileSystem(), os.path.abspath(path), ""
    info = filesystem.get_file_info(location)
    if info.type == fs.FileType.Directory:
        infos = filesystem.get_file_info(fs.FileSelector(location, recursive=True))
        files = sorted(
            i.path
            for i in infos
            if i.type == fs.FileType.File
            and i.base_name.endswith(".parquet")
            and not i.base_name.startswith((".", "_"))
        )
    elif info.type == fs.FileType.File:
        files = [location]
    elif info.type == fs.FileType.NotFound:
        raise FileNotFoundError(
            f"{path}: no such Parquet file or folder (nor a folder with {' or '.join(INDEX_FILES)})"
        )
    else:
        raise ValueError(f"{path}: not a regular file or folder; a pair dataset is a Parquet file or folder")
    for name in files:
        try:
            file_schema = pq.read_schema(name, filesystem=filesystem)
        except Exception as err:
            raise _unreadable(scheme + name, err) from None
        for field in file_schema:
            problem = column_problem(field.name, field.type)
            if problem:
                raise ValueError(f"{scheme}{name}: {problem}; fix the file or move it out of the dataset")
    return [scheme + name for name in files]


def _unreadable(name: str, err: Exception) -> ValueError:
    return ValueError(
        f"{name}: not a readable Parquet file ({type(err).__name__}: {_first_line(err)}); "
        "it may be truncated: rewrite it or move it out of the dataset"
    )


def parquet_root(path: str | os.PathLike) -> str:
    """The dataset's folder: where relative image paths in a Parquet file (or folder) of pairs
    start from, and where image paths must stay."""
    path = str(path)
    if "://" in path:
        return path.rsplit("/", 1)[0] if path.endswith(".parquet") else path.rstrip("/")
    return str(Path(path) if Path(path).is_dir() else Path(path).parent)


def _absolute(value: str | None, root) -> str | None:
    if not value or "://" in value or os.path.isabs(value):
        return value
    if "://" in str(root):
        return f"{str(root).rstrip('/')}/{value}"
    return str(Path(root) / value)


def _outside_root(path: str, root: str) -> bool:
    """Whether an absolute image path (symlinks resolved) or URI lies outside the folder ``root``."""
    if "://" in path or "://" in root:  # a URI: only one under a remote dataset's own folder
        if "://" not in path or "://" not in root or path.split("://")[0] != root.split("://")[0]:
            return True
        inside = posixpath.normpath(root.split("://", 1)[1]).rstrip("/") + "/"
        return not posixpath.normpath(path.split("://", 1)[1]).startswith(inside)
    if "\0" in path:
        return True
    base = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), base]) != base


def _path_error(key: str, path: str | None, resolved: str | None, root, allow_outside_root: bool) -> str | None:
    if allow_outside_root or not resolved or not _outside_root(resolved, str(root)):
        return None
    return (
        f"path_outside_root: {key}: {path!r} is outside the dataset's folder {root}; "
        f"set {OUTSIDE_ROOT_FLAG}=true to read images from elsewhere"
    )


def text_schema():
    """Records parsed from an index file: every field as text (as the index wrote it), images
    as paths, plus ``_error`` (why the line could not be parsed) and ``_raw`` (the line)."""
    import pyarrow as pa

    return pa.schema([(name, pa.string()) for name in COLUMNS] + [("_error", pa.string()), ("_raw", pa.string())])


def parse_index_lines(
    lines: Iterable[str],
    fmt: str,
    root: str | os.PathLike,
    header: list[str] | None = None,
    allow_outside_root: bool = False,
):
    """Records of a ``pairs.jsonl`` (``fmt="jsonl"``) or ``pairs.csv`` (``fmt="csv"``: one record
    a line, ``header`` its first line's fields) as a Table of :func:`text_schema`.

    A line that does not parse becomes a record with only ``_error`` and ``_raw`` set, so
    that one bad line is reported, not fatal. Relative image paths are resolved against root;
    one that leaves it gets an ``_error`` too (unless ``allow_outside_root``).
    """
    import csv
    import json

    import pyarrow as pa

    rows = []
    for line in lines:
        if not line.strip() or (fmt == "csv" and next(csv.reader([line])) == header):
            continue
        row = dict.fromkeys(COLUMNS)
        try:
            if fmt == "jsonl":
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            else:
                values = next(csv.reader([line]))
                if len(values) != len(header):
                    raise ValueError(f"{len(values)} fields, the header has {len(header)}")
                record = dict(zip(header, values))
            for key in COLUMNS:
                value = record.get(key)
                row[key] = None if value is None or value == "" else str(value)
            for key in ("image_w", "image_l", "mask"):
                path, row[key] = row[key], _absolute(row[key], root)
                row["_error"] = row.get("_error") or _path_error(key, path, row[key], root, allow_outside_root)
        except Exception as err:
            row = {**dict.fromkeys(COLUMNS), "_error": f"corrupt_record: {type(err).__name__}: {err}"}
        row["_raw"] = line
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=text_schema())


def read_pairs(path: str | os.PathLike, allow_outside_root: bool = False):
    """A pyarrow Table of pairs from a Parquet file or folder, or an image folder with an index.

    Records are returned as stored, bad ones included: see :func:`validate_pairs`. An image
    path outside the dataset's folder is refused (its record's ``_error``) unless
    ``allow_outside_root``; a Parquet file that cannot be read is a ValueError naming it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = index_file(path)
    if index is None:
        tables, root = [], parquet_root(path)
        for name in parquet_files(path):
            try:
                table = pq.read_table(name)
            except Exception as err:
                raise _unreadable(name, err) from None
            tables.append(normalize_table(table, root=root, allow_outside_root=allow_outside_root))
        return pa.concat_tables(tables) if tables else normalize_table(schema().empty_table())
    lines = index.read_text().splitlines()
    fmt = "csv" if index.suffix == ".csv" else "jsonl"
    header = _csv_header(lines[0]) if fmt == "csv" and lines else None
    return parse_index_lines(lines, fmt, index.parent, header, allow_outside_root)


def _csv_header(line: str) -> list[str]:
    import csv

    return next(csv.reader([line]))


# --------------------------------------------------------------------------- validation
def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, (str, bytes)) and len(value) == 0


def check_record(record: dict, decode: bool = True) -> tuple[str | None, dict | None]:
    """``(reason, decoded)``: the reason the record is unusable (``None`` if it is fine) and,
    for a good record, its decoded images ``{"image_w", "image_l": [H, W, 3] uint8, "mask":
    [H, W] float32 in [0, 1] or None}``. Only the first problem found is reported."""
    if record.get("_error"):
        return record["_error"], None
    for key in REQUIRED:
        if _is_missing(record.get(key)):
            return f"missing_field: {key}", None
    label = record["label"]
    if label not in LABELS:
        return f"unknown_label: {label!r} (expected one of {', '.join(LABELS)})", None
    for key in ("severity_w", "severity_l"):
        value = record.get(key)
        if _is_missing(value):
            continue
        try:
            level = float(value)
        except (TypeError, ValueError):
            level = float("nan")
        if not level.is_integer() or int(level) not in SEVERITY_LEVELS:
            return f"severity_range: {key}={value!r} (expected 0, 1, 2 or 3)", None
    if not decode:
        return None, None
    decoded = {}
    for key, mode in (("image_w", "RGB"), ("image_l", "RGB"), ("mask", "L")):
        value = record.get(key)
        if key == "mask" and _is_missing(value):
            decoded["mask"] = None
            continue
        try:
            data = load_bytes(value)
        except Exception as err:
            return f"unreadable_image: {key}: {type(err).__name__}: {err}", None
        try:
            decoded[key] = decode_image(data, mode)
        except ImageSizeError as err:
            return f"{err.code}: {key}: {err}", None
        except Exception as err:
            return f"corrupt_image: {key}: {type(err).__name__}: {_first_line(err)}", None
    if decoded["mask"] is not None:
        size_w, size_m = decoded["image_w"].shape[:2], decoded["mask"].shape[:2]
        if size_m != size_w:
            return f"mask_size: mask is {size_m[1]}x{size_m[0]}, image_w is {size_w[1]}x{size_w[0]}", None
        decoded["mask"] = decoded["mask"].astype(np.float32) / 255.0
    return None, decoded


def validate_pairs(records) -> list[str | None]:
    """One reason string per record (``None`` for a good one); records: dicts or a Table."""
    if hasattr(records, "to_pylist"):
        records = records.to_pylist()
    return [check_record(r)[0] for r in records]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


# --------------------------------------------------------------------------- training view
def orient(record: dict) -> dict:
    """The record with image_w the preferred image: a label ``l`` swaps images and severities."""
    if record.get("label") != "l":
        return record
    out = dict(record)
    out["image_w"], out["image_l"] = record["image_l"], record["image_w"]
    out["severity_w"], out["severity_l"] = record.get("severity_l"), record.get("severity_w")
    out["label"] = "w"
    return out


def fit_pair(decoded: dict, size: int) -> dict:
    """Both images (and the mask) center-cropped to a square and scaled to ``size x size``: the
    same geometry for all three, so the mask stays aligned. The crop is taken before scaling
    (``resize``'s ``box``), so nothing larger than ``size x size`` is ever made."""
    from PIL import Image

    def fit(array: np.ndarray, resample) -> np.ndarray:
        h, w = array.shape[:2]
        if (h, w) == (size, size):
            return array
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        box = (left, top, left + side, top + side)
        return np.asarray(Image.fromarray(array).resize((size, size), resample, box=box))

    out = {
        "image_w": fit(decoded["image_w"], Image.BICUBIC),
        "image_l": fit(decoded["image_l"], Image.BICUBIC),
    }
    mask = decoded.get("mask")
    if mask is not None:
        out["mask"] = fit(mask.astype(np.float32), Image.BILINEAR)
    else:
        out["mask"] = None
    return out
