"""The preference store: serving, the left/right mapping, labels, agreement, export, restarts."""

import json
import multiprocessing as mp
import random

import numpy as np
import pytest

from armature.data.pairs import decode_image, read_pairs, validate_pairs
from armature.feedback.store import PreferenceStore, decision_for, resolve_decisions


def _image(color):
    return np.full((8, 8, 3), color, np.uint8)


def _pairs(n, round_=0):
    return [
        {
            "prompt": f"a hand {i}",
            "image_a": _image((200, 0, 0)),
            "image_b": _image((0, 0, 200)),
            "policy_version": 3,
            "round": round_,
        }
        for i in range(n)
    ]


@pytest.fixture
def store(tmp_path):
    s = PreferenceStore(tmp_path / "fb.db")
    yield s
    s.close()


def test_decision_for_every_click_and_order():
    # written out by hand: which stored image wins for each (click, image on the left)
    table = {
        ("left", "a"): "w",
        ("right", "a"): "l",
        ("left", "b"): "l",
        ("right", "b"): "w",
        ("none", "a"): "tie",
        ("none", "b"): "tie",
    }
    for (choice, left), expected in table.items():
        assert decision_for(choice, left) == expected
    with pytest.raises(ValueError, match="choice"):
        decision_for("up", "a")


def test_resolve_majority_and_draws():
    assert resolve_decisions(["w", "w", "l"]) == "w"
    assert resolve_decisions(["l"]) == "l"
    assert resolve_decisions(["w", "l"]) == "tie"  # people disagree: a tie, kept as such
    assert resolve_decisions(["tie", "tie", "w"]) == "tie"
    assert resolve_decisions([]) is None


def test_tokens_are_hashed_and_authenticate(store):
    token = store.add_annotator("ann")
    assert store.authenticate(token) == "ann"
    assert store.authenticate("wrong") is None and store.authenticate("") is None
    import sqlite3

    raw = sqlite3.connect(store.url.removeprefix("sqlite:///")).execute("select token_hash from annotators").fetchall()
    assert raw and token not in raw[0][0]
    with pytest.raises(ValueError, match="exists already"):
        store.add_annotator("ann")


def test_never_served_twice_and_shuffle_recorded(store):
    ids = store.add_pairs(_pairs(6))
    store.add_annotator("ann")
    rng = random.Random(0)
    seen, lefts = [], []
    while (pair := store.next_pair("ann", rng)) is not None:
        assert store.next_pair("ann", rng)["pair_id"] == pair["pair_id"]  # a reload: the same, pending pair
        seen.append(pair["pair_id"])
        lefts.append(pair["left"])
        store.submit("ann", pair["pair_id"], "left")  # always the left image
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 6
    assert set(lefts) == {"a", "b"}  # the order was shuffled
    labels = {lab["pair_id"]: lab for lab in store.labels()}
    for pair_id, left in zip(seen, lefts):
        assert labels[pair_id]["decision"] == ("w" if left == "a" else "l")
        assert labels[pair_id]["shown_left"] == left
    with pytest.raises(ValueError, match="already"):
        store.add_label("ann", seen[0], "w")
    with pytest.raises(PermissionError):
        store.add_annotator("other")
        store.submit("other", seen[0], "left")  # never served to them


def test_labels_per_pair_and_agreement(tmp_path):
    store = PreferenceStore(tmp_path / "fb.db", labels_per_pair=2)
    ids = store.add_pairs(_pairs(2))
    for name in ("a1", "a2", "a3"):
        store.add_annotator(name)
    served = {name: [] for name in ("a1", "a2", "a3")}
    for name in ("a1", "a2", "a3"):
        while (pair := store.next_pair(name)) is not None:
            served[name].append(pair["pair_id"])
            store.add_label(name, pair["pair_id"], "w" if name != "a2" or pair["pair_id"] != ids[1] else "l")
    assert len(served["a1"]) == 2 and len(served["a2"]) == 2 and served["a3"] == []  # two labels each: full
    # pair 0: w, w (agree); pair 1: w, l (disagree) -> 1 of 2 ordered annotator pairs per item agree
    result = store.agreement()
    assert result["agreement"] == pytest.approx(0.5) and result["multi_labeled_pairs"] == 2
    # Fleiss: P_bar = (1 + 0) / 2; p_w = 3/4, p_l = 1/4 -> P_e = 10/16
    assert result["kappa"] == pytest.approx((0.5 - 10 / 16) / (1 - 10 / 16))
    counts = store.counts()
    assert counts["labels"] == 4 and counts["labels_w"] == 3 and counts["labels_l"] == 1 and counts["pairs"] == 2


def test_export_is_the_pair_format(store, tmp_path):
    ids = store.add_pairs(_pairs(3))
    store.add_annotator("x")
    store.add_label("x", ids[0], "w", severity=2)
    store.add_label("x", ids[1], "l")
    store.add_label("x", ids[2], "tie")
    n = store.export(tmp_path / "out.parquet")
    table = read_pairs(tmp_path / "out.parquet")
    assert n == 3 and validate_pairs(table) == [None, None, None]
    rows = {r["pair_id"]: r for r in table.to_pylist()}
    assert rows[ids[0]]["label"] == "w" and rows[ids[0]]["severity_l"] == 2
    assert rows[ids[1]]["label"] == "l" and rows[ids[2]]["label"] == "tie"
    assert tuple(decode_image(rows[ids[0]]["image_w"])[0, 0]) == (200, 0, 0)  # image a is image_w


def _writer(url, name, ids):
    store = PreferenceStore(url)
    for pair_id in ids:
        store.add_label(name, pair_id, "w")


def test_two_processes_write_and_a_reopen_finds_everything(tmp_path):
    url = tmp_path / "fb.db"
    store = PreferenceStore(url)
    ids = store.add_pairs(_pairs(20))
    store.add_annotator("p1")
    store.add_annotator("p2")
    store.close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, name, ids)) for name in ("p1", "p2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    reopened = PreferenceStore(url)
    assert reopened.counts()["labels"] == 40
    assert reopened.agreement()["agreement"] == 1.0


def test_uri_images_and_bad_input(store, tmp_path):
    from armature.data.pairs import encode_image

    (tmp_path / "a.png").write_bytes(encode_image(_image((1, 2, 3))))
    [pair_id] = store.add_pairs([{"prompt": "p", "image_a": str(tmp_path / "a.png"), "image_b": _image(0)}])
    assert tuple(decode_image(store.image(pair_id, "a"))[0, 0]) == (1, 2, 3)
    store.add_annotator("x")
    with pytest.raises(ValueError, match="severity"):
        store.add_label("x", pair_id, "w", severity=7)
    with pytest.raises(ValueError, match="decision"):
        store.add_label("x", pair_id, "left")
    with pytest.raises(ValueError, match="labels_per_pair"):
        PreferenceStore(tmp_path / "y.db", labels_per_pair=0)


def test_label_cli_roundtrip(tmp_path, capsys):
    """armature label import / annotator / status / export on one database."""
    from armature.cli import main
    from armature.data.pairs import write_pairs

    db = str(tmp_path / "cli.db")
    write_pairs(
        [
            {"pair_id": f"p{i}", "prompt": "a hand", "image_w": _image((9, 9, 9)), "image_l": _image(0), "label": "w"}
            for i in range(3)
        ],
        tmp_path / "in.parquet",
    )
    assert main(["label", "import", str(tmp_path / "in.parquet"), "--db", db, "--policy-version", "2"]) == 0
    assert main(["label", "annotator", "carol", "--db", db]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    store = PreferenceStore(db)
    assert store.authenticate(token) == "carol" and store.pair("p1")["policy_version"] == 2
    store.add_label("carol", "p1", "l")
    assert main(["label", "annotator", "carol", "--db", db]) == 2  # taken
    capsys.readouterr()
    assert main(["label", "status", "--db", db]) == 0
    import json

    status = json.loads(capsys.readouterr().out)
    assert status["pairs"] == 3 and status["labels"] == 1 and status["annotators"] == ["carol"]
    assert main(["label", "export", str(tmp_path / "out.parquet"), "--db", db]) == 0
    [row] = read_pairs(tmp_path / "out.parquet").to_pylist()
    assert row["pair_id"] == "p1" and row["label"] == "l"


def test_label_import_refuses_pairs_the_stream_would_quarantine(tmp_path, capsys):
    """Paths out of the dataset's folder and corrupt images never reach the annotators."""
    from armature.cli import main
    from armature.data.pairs import encode_image

    (tmp_path / "pairs").mkdir()
    for name, color in (("good_w.png", (9, 9, 9)), ("good_l.png", 0)):
        (tmp_path / "pairs" / name).write_bytes(encode_image(_image(color)))
    (tmp_path / "pairs" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "secret.png").write_bytes(encode_image(_image((1, 2, 3))))
    rows = [
        {"pair_id": "ok", "prompt": "a hand", "image_w": "good_w.png", "image_l": "good_l.png", "label": "w"},
        {"pair_id": "out", "prompt": "a hand", "image_w": "../secret.png", "image_l": "good_l.png", "label": "w"},
        {"pair_id": "bad", "prompt": "a hand", "image_w": "broken.png", "image_l": "good_l.png", "label": "w"},
    ]
    (tmp_path / "pairs" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = str(tmp_path / "imp.db")
    assert main(["label", "import", str(tmp_path / "pairs"), "--db", db]) == 0
    err = capsys.readouterr().err
    assert "'out' not imported: path_outside_root" in err and "'bad' not imported: corrupt_image" in err
    store = PreferenceStore(db)
    assert store.counts()["pairs"] == 1 and store.pair("ok") is not None
