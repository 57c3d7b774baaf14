"""Hostile pair datasets (issue 27, defects 2 and 5): pixel bombs, paths out of the dataset's
folder, files that are not files, broken Parquet. Each is refused with a reason, never read,
decoded or followed; the real Ray Data stream quarantines them and keeps the good pairs."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from armature.data.pairs import (
    MAX_FILE_BYTES,
    ImageSizeError,
    check_record,
    decode_image,
    encode_image,
    fit_pair,
    read_pairs,
    validate_pairs,
    write_pairs,
)
from armature.data.synthetic import make_pair, procedural_sources

SIZE = 32
FLAG = "data.allow_outside_root"


def gray_png(width: int, height: int, pixels: bool = True) -> bytes:
    """A valid grayscale PNG of zeros, compressed a block of rows at a time (its full size is
    never in memory); ``pixels=False``: the header alone, so decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    body = b""
    if pixels:
        compressor, rows = zlib.compressobj(9), max(1, 2**23 // (width + 1))
        block = bytes((width + 1) * rows)  # each row: filter byte 0, then the row's zeros
        parts = [
            compressor.compress(block[: (width + 1) * min(rows, height - done)]) for done in range(0, height, rows)
        ]
        body = chunk(b"IDAT", b"".join(parts) + compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b"")


def pairs(n: int, seed: int = 0) -> list[dict]:
    return [make_pair(s, np.random.default_rng(i)) for i, s in enumerate(procedural_sources(n, SIZE, seed=seed))]


# --------------------------------------------------------------------------- defect 2: pixel bombs
def test_a_one_pixel_wide_strip_is_refused_from_its_header():
    strip = gray_png(1, 1_000_000)
    assert len(strip) < 10_000  # a few kB on disk
    with Image.open(io.BytesIO(strip)) as image:
        assert np.asarray(image).shape == (1_000_000, 1)  # a valid image ...
    record = {**pairs(1)[0], "image_l": strip}
    # ... refused before decoding: scaled to a square, its short side would have grown a million-fold
    assert check_record(record)[0] == (
        "image_aspect: image_l: 1x1000000: the long side may be at most 8 times the short one (read from its header)"
    )


def test_a_144_megapixel_image_is_refused_from_its_header():
    record = pairs(1)[0]
    big = gray_png(12_000, 12_000)
    assert len(big) < 1_000_000
    reason = check_record({**record, "image_w": big})[0]
    assert reason.startswith("image_too_large: image_w: 12000x12000 is 144,000,000 pixels, over the 40,000,000")
    # the header alone gives the same reason: nothing was decoded (decoding it would fail: no pixel data)
    assert check_record({**record, "image_w": gray_png(12_000, 12_000, pixels=False)})[0] == reason
    assert check_record({**record, "image_w": gray_png(1_000, 1_000, pixels=False)})[0].startswith("corrupt_image")
    # past PIL's own bomb limit, PIL refuses to open it at all: the same reason code
    with pytest.raises(ImageSizeError) as err:
        decode_image(gray_png(20_000, 20_000, pixels=False))
    assert err.value.code == "image_too_large"
    assert check_record({**record, "mask": gray_png(20_000, 20_000, pixels=False)})[0].startswith(
        "image_too_large: mask"
    )


def test_only_plain_image_formats_are_decoded():
    """PIL would open an EPS file (and hand it to Ghostscript to decode): not a pair image."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"
    reason = check_record({**pairs(1)[0], "image_w": eps})[0]
    assert reason.startswith("corrupt_image: image_w: UnidentifiedImageError: cannot identify image file")
    jpeg = encode_image(np.zeros((SIZE, SIZE, 3), np.uint8), format="JPEG")
    assert check_record({**pairs(1)[0], "image_w": jpeg})[0] is None


def test_fit_pair_crops_the_center_square_before_scaling():
    """A 1 x 100,000 strip, red in its middle 1,001 rows and blue elsewhere: its center square is
    one red pixel, so the fitted image is red all over (scaling first would make it 6.4 M rows)."""
    strip = np.zeros((100_000, 1, 3), np.uint8)
    strip[:, :, 2] = 255
    strip[49_500:50_501] = (255, 0, 0)
    mask = np.zeros((100_000, 1), np.float32)
    mask[49_000:51_001] = 1
    out = fit_pair({"image_w": strip, "image_l": strip, "mask": mask}, 64)
    assert out["image_w"].shape == (64, 64, 3) and (out["image_w"] == (255, 0, 0)).all()
    assert out["mask"].shape == (64, 64) and (out["mask"] == 1).all()


def test_the_stream_quarantines_pixel_bombs(ray_cluster, tmp_path):
    from armature.data import stream

    records = pairs(10, seed=3)
    records[2]["image_l"] = gray_png(1, 1_000_000)
    records[5]["image_w"] = gray_png(12_000, 12_000)
    write_pairs(records, tmp_path / "pairs.parquet")
    ds = stream.prepare(stream.read_dataset(tmp_path / "pairs.parquet"), SIZE, tmp_path / "q", batch_size=4)
    kept = {r["pair_id"] for r in ds.materialize().take_all()}
    assert kept == {r["pair_id"] for i, r in enumerate(records) if i not in (2, 5)}
    assert stream.quarantine_summary(tmp_path / "q") == {
        "quarantined": 2,
        "tie_dropped": 0,
        "image_aspect": 1,
        "image_too_large": 1,
    }
    reasons = dict(zip(*pq.read_table(tmp_path / "q", columns=["pair_id", "reason"]).to_pydict().values()))
    assert reasons[records[2]["pair_id"]].startswith("image_aspect: image_l: 1x1000000")
    assert reasons[records[5]["pair_id"]].startswith("image_too_large: image_w: 12000x12000")


# --------------------------------------------------------------------------- defect 5: paths and files
HOSTILE = {  # pair_id: (image_w as the index names it, the reason's start without / with the flag)
    "dotdot": ("../outside/o.png", "path_outside_root: image_w: '../outside/o.png'", None),
    "absolute": ("{outside}/o.png", "path_outside_root: image_w: '{outside}/o.png'", None),
    "file_uri": ("file://{outside}/o.png", "path_outside_root: image_w: 'file://{outside}/o.png'", None),
    "symlink_out": ("link_out.png", "path_outside_root: image_w: 'link_out.png'", None),
    "dev_zero": (
        "/dev/zero",
        "path_outside_root: image_w: '/dev/zero'",
        "unreadable_image: image_w: ValueError: /dev/zero: not a regular file (a character device)",
    ),
    "fifo": ("pipe.png",)
    + ("unreadable_image: image_w: ValueError: {root}/pipe.png: not a regular file (a FIFO)",) * 2,
    "huge": ("huge.png",) + ("unreadable_image: image_w: ValueError: {root}/huge.png: 67,108,865 bytes, over the",) * 2,
}


def hostile_folder(tmp_path):
    """``root/pairs.jsonl`` and ``root/as_paths.parquet``: 4 good pairs (one through a symlink
    inside the folder) and the hostile ones above; ``outside/o.png``: a valid image next to the
    folder, not in it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    lines = []
    for i, record in enumerate(pairs(4, seed=5)):
        (root / f"w{i}.png").write_bytes(record["image_w"])
        (root / f"l{i}.png").write_bytes(record["image_l"])
        lines.append(
            {"pair_id": f"good{i}", "prompt": "p", "image_w": f"w{i}.png", "image_l": f"l{i}.png", "label": "w"}
        )
    os.symlink(root / "w0.png", root / "link_in.png")
    lines[0]["image_w"] = "link_in.png"
    (outside / "o.png").write_bytes(encode_image(np.zeros((SIZE, SIZE, 3), np.uint8)))
    os.symlink(outside / "o.png", root / "link_out.png")
    os.mkfifo(root / "pipe.png")
    with open(root / "huge.png", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    for pair_id, (path, _, _) in HOSTILE.items():
        lines.append(
            {
                "pair_id": pair_id,
                "prompt": "p",
                "image_w": path.format(outside=outside),
                "image_l": "l1.png",
                "label": "w",
            }
        )
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    pq.write_table(pa.Table.from_pylist(lines), root / "as_paths.parquet")  # the same records, paths as strings
    return root, outside


def expected_reasons(root, outside, allowed: bool) -> dict:
    out = {}
    for pair_id, (_, refused, refused_with_flag) in HOSTILE.items():
        reason = refused_with_flag if allowed else refused
        out[pair_id] = reason and reason.format(root=root, outside=outside)
    return out


def check_reasons(reasons: dict, expected: dict) -> None:
    for pair_id, start in expected.items():
        if start is None:
            assert reasons[pair_id] is None, (pair_id, reasons[pair_id])
        else:
            assert reasons[pair_id].startswith(start), (pair_id, reasons[pair_id])
            if start.startswith("path_outside_root"):
                assert f"set {FLAG}=true" in reasons[pair_id]


@pytest.mark.timeout(120)  # a reader that opens the FIFO blocks for good
@pytest.mark.parametrize("allowed", [False, True])
@pytest.mark.parametrize("index", ["pairs.jsonl", "as_paths.parquet"])
def test_the_reader_keeps_to_the_dataset_folder_and_reads_only_regular_files(tmp_path, index, allowed):
    root, outside = hostile_folder(tmp_path)
    table = read_pairs(root / index, allow_outside_root=allowed)
    reasons = dict(zip(table["pair_id"].to_pylist(), validate_pairs(table)))
    assert [reasons[f"good{i}"] for i in range(4)] == [None] * 4  # a symlink inside the folder is fine
    check_reasons(reasons, expected_reasons(root, outside, allowed))


@pytest.mark.timeout(300)
def test_the_stream_quarantines_paths_out_of_the_folder_and_files_that_are_not_files(ray_cluster, tmp_path):
    from armature.data import stream

    root, outside = hostile_folder(tmp_path)
    for allowed in (False, True):
        quarantine = tmp_path / f"q{allowed}"
        ds = stream.prepare(stream.read_dataset(root, allow_outside_root=allowed), SIZE, quarantine, batch_size=4)
        kept = {r["pair_id"] for r in ds.materialize().take_all()}
        expected = expected_reasons(root, outside, allowed)
        assert kept == {f"good{i}" for i in range(4)} | {k for k, v in expected.items() if v is None}
        table = pq.read_table(quarantine, columns=["pair_id", "reason"]).to_pydict()
        reasons = dict(zip(table["pair_id"], table["reason"]))
        assert set(reasons) == {k for k, v in expected.items() if v is not None}
        check_reasons(reasons, {k: v for k, v in expected.items() if v is not None})


# --------------------------------------------------------------------------- defect 5: broken Parquet
def broken_parquet_folders(tmp_path):
    """Two dataset folders, each with a good file and a broken one: a list-typed label column,
    a truncated file."""
    good = pairs(3, seed=7)
    listed, truncated = tmp_path / "listed", tmp_path / "truncated"
    for folder in (listed, truncated):
        write_pairs(good, folder / "a_good.parquet")
    table = pa.Table.from_pylist([{**r, "label": [r["label"]], "mask": None} for r in good])
    pq.write_table(table, listed / "b_listed.parquet")
    data = (truncated / "a_good.parquet").read_bytes()
    (truncated / "b_truncated.parquet").write_bytes(data[: len(data) // 2])
    return listed, truncated


def test_a_broken_parquet_file_is_named_with_its_column(tmp_path):
    listed, truncated = broken_parquet_folders(tmp_path)
    with pytest.raises(
        ValueError,
        match=rf"{listed}/b_listed.parquet: column 'label' is list<.*string>, "
        r"expected one string per pair \(w, l or tie\)",
    ):
        read_pairs(listed)
    with pytest.raises(ValueError, match=rf"{truncated}/b_truncated.parquet: not a readable Parquet file .*truncated"):
        read_pairs(truncated)
    assert read_pairs(listed / "a_good.parquet").num_rows == 3  # the good file alone still reads


def test_the_stream_names_a_broken_parquet_file_before_running(ray_cluster, tmp_path):
    from armature.data import stream

    listed, truncated = broken_parquet_folders(tmp_path)
    with pytest.raises(ValueError, match=rf"{listed}/b_listed.parquet: column 'label' is list<"):
        stream.read_dataset(listed)
    with pytest.raises(ValueError, match=rf"{truncated}/b_truncated.parquet: not a readable Parquet file"):
        stream.read_dataset(truncated)
