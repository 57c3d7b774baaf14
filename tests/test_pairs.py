"""The preference-pair format (armature.data.pairs): writer, readers, validator. No Ray."""

import json
import subprocess
import sys

import numpy as np
import pytest

from armature.data.pairs import (
    REASON_CODES,
    check_record,
    decode_image,
    encode_image,
    fit_pair,
    orient,
    read_pairs,
    validate_pairs,
    write_pairs,
)


def image(seed, h=32, w=32):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def good(i, **changes):
    mask = np.zeros((32, 32), bool)
    mask[4:12, 8:20] = True
    record = {
        "pair_id": f"p{i}",
        "prompt": f"prompt {i}",
        "image_w": image(2 * i),
        "image_l": image(2 * i + 1),
        "label": "w",
        "mask": mask,
        "severity_w": 0,
        "severity_l": 3,
        "source": "test",
    }
    record.update(changes)
    return record


def test_parquet_round_trip(tmp_path):
    records = [good(0), good(1, mask=None, severity_w=None, severity_l=None, label="tie")]
    assert write_pairs(records, tmp_path / "pairs.parquet") == 2
    table = read_pairs(tmp_path / "pairs.parquet")
    assert table.num_rows == 2 and table.column_names[:5] == ["pair_id", "prompt", "image_w", "image_l", "label"]
    rows = table.to_pylist()
    np.testing.assert_array_equal(decode_image(rows[0]["image_w"]), records[0]["image_w"])  # PNG: lossless
    np.testing.assert_array_equal(decode_image(rows[0]["mask"], "L") > 0, records[0]["mask"])
    assert rows[1]["mask"] is None and rows[1]["severity_l"] is None and rows[1]["label"] == "tie"
    assert validate_pairs(table) == [None, None]
    reason, decoded = check_record(rows[0])
    assert reason is None and decoded["mask"].dtype == np.float32 and decoded["mask"].max() == 1.0


def test_validator_names_every_problem(tmp_path):
    png = encode_image(image(0))
    records = [
        good(0),
        good(1, image_w=png[:60]),  # truncated
        good(2, image_l=b"not an image at all"),
        good(3, prompt=None),
        good(4, image_l=None),
        good(5, label="better"),
        good(6, mask=np.zeros((16, 16), bool)),
        good(7, severity_l=4),
        good(8, severity_w=-1),
        good(9, pair_id=""),
    ]
    write_pairs(records, tmp_path / "p.parquet")
    reasons = validate_pairs(read_pairs(tmp_path / "p.parquet"))
    codes = [r.split(":")[0] if r else None for r in reasons]
    assert codes == [
        None,
        "corrupt_image",
        "corrupt_image",
        "missing_field",
        "missing_field",
        "unknown_label",
        "mask_size",
        "severity_range",
        "severity_range",
        "missing_field",
    ]
    assert "image_w" in reasons[1] and "image_l" in reasons[2]
    assert reasons[3] == "missing_field: prompt" and reasons[4] == "missing_field: image_l"
    assert "16x16" in reasons[6] and "32x32" in reasons[6]
    assert set(c for c in codes if c) <= set(REASON_CODES)
    # a path that does not exist, and a fractional severity
    assert check_record(good(10, image_w="/nonexistent/x.png"))[0].startswith("unreadable_image: image_w")
    assert check_record(good(11, severity_w=1.5))[0].startswith("severity_range")


def _image_folder(tmp_path):
    for i in range(3):
        (tmp_path / f"w{i}.png").write_bytes(encode_image(image(10 + i)))
        (tmp_path / f"l{i}.png").write_bytes(encode_image(image(20 + i)))
    (tmp_path / "m0.png").write_bytes(encode_image(np.pad(np.ones((4, 4), bool), 14)))
    return tmp_path


def test_jsonl_index_folder(tmp_path):
    folder = _image_folder(tmp_path)
    lines = [
        json.dumps(
            {
                "pair_id": "a",
                "prompt": "x",
                "image_w": "w0.png",
                "image_l": "l0.png",
                "label": "w",
                "mask": "m0.png",
                "severity_l": 2,
                "source": "raters",
            }
        ),
        json.dumps({"pair_id": "b", "prompt": "y", "image_w": "w1.png", "image_l": "l1.png", "label": "l"}),
        "{this is not json",
        json.dumps(
            {
                "pair_id": "c",
                "prompt": "z",
                "image_w": "w2.png",
                "image_l": "missing.png",
                "label": "tie",
                "severity_w": "high",
            }
        ),
        json.dumps({"pair_id": "d", "prompt": "z", "image_w": "w2.png", "image_l": "missing.png", "label": "w"}),
    ]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    table = read_pairs(folder)
    reasons = validate_pairs(table)
    assert reasons[:2] == [None, None]
    assert reasons[2].startswith("corrupt_record: JSONDecodeError")
    assert reasons[3].startswith("severity_range: severity_w='high'")
    assert reasons[4].startswith("unreadable_image: image_l")
    rows = table.to_pylist()
    assert rows[0]["image_w"] == str(folder / "w0.png")  # resolved against the index's folder
    assert rows[2]["_raw"] == "{this is not json"  # the bad line is kept as it came
    # label l: image_l was preferred; oriented, image_w is the preferred one
    flipped = orient(rows[1])
    assert flipped["image_w"] == rows[1]["image_l"] and flipped["label"] == "w"


def test_csv_index_folder(tmp_path):
    folder = _image_folder(tmp_path)
    (folder / "pairs.csv").write_text(
        "pair_id,prompt,image_w,image_l,label,severity_w,severity_l\n"
        "1,a hand,w0.png,l0.png,w,0,3\n"
        '2,"a face, smiling",w1.png,l1.png,tie,,\n'
        "3,too,many,fields,here,w,1,2\n"
        "4,a foot,w2.png,l2.png,w,0,9\n"
    )
    table = read_pairs(folder / "pairs.csv")
    reasons = validate_pairs(table)
    assert reasons[0] is None and reasons[1] is None
    assert reasons[2].startswith("corrupt_record") and "8 fields" in reasons[2]
    assert reasons[3].startswith("severity_range: severity_l='9'")
    rows = table.to_pylist()
    assert rows[0]["pair_id"] == "1" and rows[1]["prompt"] == "a face, smiling" and rows[1]["severity_w"] is None


def test_fit_pair_keeps_the_mask_aligned():
    w = np.zeros((48, 64, 3), np.uint8)
    w[20:28, 28:36] = 255  # a white square in the middle
    mask = np.zeros((48, 64), np.float32)
    mask[20:28, 28:36] = 1
    out = fit_pair({"image_w": w, "image_l": w.copy(), "mask": mask}, 24)
    assert out["image_w"].shape == (24, 24, 3) and out["mask"].shape == (24, 24)
    bright = out["image_w"].mean(-1) > 128
    assert bright.any() and (out["mask"][bright] > 0.5).all()
    assert fit_pair({"image_w": w, "image_l": w, "mask": None}, 24)["mask"] is None


def test_data_package_imports_no_ray():
    code = (
        "import sys, armature.data, armature.data.pairs, armature.data.synthetic; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("value", [b"", None, float("nan")])
def test_empty_values_are_missing(value):
    assert check_record(good(0, prompt=value), decode=False)[0] == "missing_field: prompt"
