"""The Ray Data pipeline of preference pairs (armature.data.stream) with planted bad records:
nothing crashes, nothing is dropped silently, quarantine reasons and counts are right."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from armature.data.pairs import decode_image, encode_image, read_pairs, write_pairs
from armature.data.synthetic import make_pair, procedural_sources

SIZE = 32


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """29 synthetic pairs, in two Parquet files: 7 made bad, one a tie, one labelled l."""
    folder = tmp_path_factory.mktemp("pairs")
    records = [make_pair(s, np.random.default_rng(i)) for i, s in enumerate(procedural_sources(29, SIZE, seed=1))]
    records[0]["image_w"] = records[0]["image_w"][:80]  # truncated PNG
    records[1]["image_l"] = b"garbage"
    records[2]["label"] = "maybe"
    records[3]["prompt"] = None
    records[4]["severity_l"] = 5
    records[5]["mask"] = encode_image(np.zeros((8, 8), np.uint8))
    records[6]["image_l"] = None
    records[7]["label"] = "tie"
    records[8]["label"] = "l"
    write_pairs(records[:15], folder / "a.parquet")  # a Parquet folder of two files
    write_pairs(records[15:], folder / "b.parquet")
    return folder, records


def run_pipeline(folder, quarantine, keep_ties, encode=False):
    from armature.data import stream

    ds = stream.prepare(stream.read_dataset(folder), SIZE, quarantine, keep_ties=keep_ties, batch_size=8)
    if encode:
        ds = stream.encode_latents(ds, {"family": "tiny"}, num_actors=1, num_cpus=0.5, batch_size=8, threads=1)
    return ds.materialize()


def test_bad_records_are_quarantined_with_reasons(ray_cluster, planted, tmp_path):
    from armature.data.stream import quarantine_summary

    folder, records = planted
    ds = run_pipeline(folder, tmp_path / "q", keep_ties=False)
    rows = {r["pair_id"]: r for r in ds.take_all()}
    bad = {records[i]["pair_id"] for i in range(8)}
    assert len(rows) == 29 - 8 and not bad & set(rows)  # 7 invalid and the tie left out ...
    counts = quarantine_summary(tmp_path / "q")  # ... and every one of them accounted for
    assert counts == {
        "quarantined": 7,
        "tie_dropped": 1,
        "corrupt_image": 2,
        "unknown_label": 1,
        "missing_field": 2,
        "severity_range": 1,
        "mask_size": 1,
    }
    quarantined = pq.read_table(tmp_path / "q")
    reasons = dict(zip(quarantined["pair_id"].to_pylist(), quarantined["reason"].to_pylist()))
    assert reasons[records[0]["pair_id"]].startswith("corrupt_image: image_w")
    assert reasons[records[1]["pair_id"]].startswith("corrupt_image: image_l")
    assert reasons[records[5]["pair_id"]] == "mask_size: mask is 8x8, image_w is 32x32"
    assert reasons[records[6]["pair_id"]] == "missing_field: image_l"
    assert reasons[records[7]["pair_id"]] == "tie_dropped: data.keep_ties=false"
    # the quarantined record is kept as it came: its bytes are there to inspect
    row0 = next(r for r in quarantined.to_pylist() if r["pair_id"] == records[0]["pair_id"])
    assert row0["image_w"] == records[0]["image_w"]

    # label l: the pipeline swapped the images so that pixels_w is the preferred one
    swapped = rows[records[8]["pair_id"]]
    np.testing.assert_array_equal(swapped["pixels_w"], decode_image(records[8]["image_l"]))
    good = rows[records[9]["pair_id"]]
    np.testing.assert_array_equal(good["pixels_w"], decode_image(records[9]["image_w"]))
    np.testing.assert_array_equal(good["mask"] > 0, decode_image(records[9]["mask"], "L") > 0)
    assert good["has_mask"] and not good["tie"]

    # running the pipeline again (a new epoch, a retried task) does not count anything twice
    run_pipeline(folder, tmp_path / "q", keep_ties=False)
    assert quarantine_summary(tmp_path / "q")["quarantined"] == 7


def test_ties_kept_latents_cached_and_batches_for_torch(ray_cluster, planted, tmp_path):
    from armature.data.stream import collate, load_vae, quarantine_summary, split, vae_encode

    folder, records = planted
    ds = run_pipeline(folder, tmp_path / "q", keep_ties=True, encode=True)
    assert ds.count() == 29 - 7
    assert quarantine_summary(tmp_path / "q")["tie_dropped"] == 0
    rows = {r["pair_id"]: r for r in ds.take_all()}
    assert rows[records[7]["pair_id"]]["tie"]
    assert "pixels_w" not in rows[records[9]["pair_id"]]  # the learner gets latents only
    # the actors' latents are the VAE's, computed here in-process on the same pixels
    vae = load_vae({"family": "tiny"})
    pixels = torch.from_numpy(decode_image(records[9]["image_w"]))[None]
    expected = vae_encode(vae, pixels)[0].numpy()
    np.testing.assert_allclose(rows[records[9]["pair_id"]]["latents_w"], expected, rtol=1e-4, atol=1e-5)
    mask = rows[records[9]["pair_id"]]["mask"]
    assert mask.shape == (SIZE // 2, SIZE // 2) and 0 < mask.sum() < mask.size

    batch = next(iter(ds.iter_torch_batches(batch_size=4, collate_fn=collate)))
    assert batch["latents_w"].shape == (4, 4, SIZE // 2, SIZE // 2) and batch["latents_w"].dtype == torch.float32
    assert isinstance(batch["prompt"], list) and len(batch["prompt"]) == 4
    assert batch["tie"].dtype == torch.bool
    train, heldout = split(ds)
    assert train.count() + heldout.count() == ds.count()


def test_index_folder_and_held_out_split(ray_cluster, tmp_path):
    from armature.data import stream

    for i in range(12):
        (tmp_path / f"w{i}.png").write_bytes(encode_image(np.full((40, 40, 3), i * 10, np.uint8)))
        (tmp_path / f"l{i}.png").write_bytes(encode_image(np.full((40, 40, 3), 255 - i, np.uint8)))
    lines = [
        json.dumps({"pair_id": f"id{i}", "prompt": "p", "image_w": f"w{i}.png", "image_l": f"l{i}.png", "label": "w"})
        for i in range(12)
    ]
    lines.insert(5, "not json")
    lines.insert(
        7, json.dumps({"pair_id": "x", "prompt": "p", "image_w": "gone.png", "image_l": "l0.png", "label": "w"})
    )
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    ds = stream.prepare(stream.read_dataset(tmp_path), 16, tmp_path / "q", heldout_fraction=0.3).materialize()
    assert ds.count() == 12
    assert stream.quarantine_summary(tmp_path / "q") == {
        "quarantined": 2,
        "tie_dropped": 0,
        "corrupt_record": 1,
        "unreadable_image": 1,
    }
    reasons = pq.read_table(tmp_path / "q").to_pydict()
    assert sorted(r.split(":")[0] for r in reasons["reason"]) == ["corrupt_record", "unreadable_image"]
    assert "not json" in reasons["_raw"]  # the line as it came
    row = ds.take(1)[0]
    assert row["pixels_w"].shape == (16, 16, 3) and not row["has_mask"] and row["mask"].sum() == 0
    heldout = {r["pair_id"] for r in ds.take_all() if r["heldout"]}
    assert heldout == {f"id{i}" for i in range(12) if stream.is_heldout(f"id{i}", 0.3)}
    # a probe pair (the online loop's fixed evaluation set) is held out whatever the fraction
    assert stream.is_heldout("probe-00003", 0.0) and stream.is_heldout("probe-00003", 0.3)
    assert 0 < len(heldout) < 12


def test_synthetic_builder_as_a_ray_data_job(ray_cluster, tmp_path):
    from armature.data.synthetic import build_pairs

    sources = procedural_sources(5, SIZE, seed=2)
    lines = []
    for i, s in enumerate(sources):
        (tmp_path / f"s{i}.png").write_bytes(encode_image(s["image"]))
        region = {"keypoints": s["keypoints"]} if i % 2 else {"box": [2, 2, 14, 14]}
        lines.append(json.dumps({"id": f"s{i}", "prompt": s["prompt"], "image": f"s{i}.png", **region}))
    (tmp_path / "sources.jsonl").write_text("\n".join(lines))
    n = build_pairs(tmp_path, tmp_path / "out", seed=0)
    table = read_pairs(tmp_path / "out")
    assert n == table.num_rows == 5
    for pair in table.to_pylist():
        i = int(pair["pair_id"].split(":")[0][1:])
        w, l = decode_image(pair["image_w"]), decode_image(pair["image_l"])
        mask = decode_image(pair["mask"], "L") > 0
        np.testing.assert_array_equal(w, sources[i]["image"])
        assert not ((w != l).any(-1) & ~mask).any() and (w != l).any()


def test_load_vae_takes_the_class_the_folder_was_saved_with(tmp_path):
    from armature.data.stream import load_vae
    from armature.gym.base_policy import SHIPPED

    assert type(load_vae({"family": "gym", "pretrained": str(SHIPPED)})).__name__ == "AutoencoderTiny"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text('{"vae": ["diffusers", "NotAVae"]}')
    with pytest.raises(ValueError, match="model.pretrained=.*NotAVae"):
        load_vae({"family": "sd15", "pretrained": str(bad)})
