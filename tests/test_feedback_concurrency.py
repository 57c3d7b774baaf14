"""``labels_per_pair`` under concurrent annotators, on SQLite and on a real PostgreSQL server.

Four threads, each an annotator with its own store (its own connections, as separate labeling
servers would have), label until nothing is left. With ``labels_per_pair=1`` every pair must
end with exactly one label: a count-then-insert race serves one pair to several people.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from armature.feedback.store import PreferenceStore

PAIRS, THREADS = 105, 4


def _postgres_bin() -> Path | None:
    """The folder holding initdb / pg_ctl / postgres: on PATH, else Debian's layout."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server (initdb + pg_ctl), run as ``nobody`` when the tests run as
    root (PostgreSQL refuses root). Skipped with the reason when no server can be started."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb): apt-get install postgresql (.ci/run does)")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="armature-pg-"))
    if os.geteuid() == 0:
        as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        shutil.chown(data, "nobody", "nogroup")
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C"}
    try:
        subprocess.run(
            [*as_user, str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "armature", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            env=env,
            timeout=120,
        )
        subprocess.run(
            [
                *as_user,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data / "db"),
                "-w",
                "-t",
                "60",
                "-l",
                str(data / "log"),
                "-o",
                f"-h 127.0.0.1 -p {port} -k {data}",
                "start",
            ],
            check=True,
            capture_output=True,
            env=env,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as err:
        shutil.rmtree(data, ignore_errors=True)
        detail = getattr(err, "stderr", b"") or b""
        pytest.skip(f"could not start PostgreSQL from {bin_dir}: {err} {detail.decode(errors='replace')[-500:]}")
    try:
        yield f"postgresql+psycopg://armature@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
            capture_output=True,
            env=env,
            timeout=60,
        )
        shutil.rmtree(data, ignore_errors=True)


def _label_until_done(url: str, name: str, errors: list) -> None:
    store = PreferenceStore(url, labels_per_pair=1)
    try:
        while (pair := store.next_pair(name)) is not None:
            store.submit(name, pair["pair_id"], "left")
    except Exception as err:  # reported by the test, not lost in the thread
        errors.append(f"{name}: {err!r}")
    finally:
        store.close()


def _race(url: str) -> Counter:
    seed = PreferenceStore(url, labels_per_pair=1)
    image = np.zeros((4, 4, 3), np.uint8)
    ids = seed.add_pairs([{"prompt": f"p{i}", "image_a": image, "image_b": image} for i in range(PAIRS)])
    names = [f"annotator{i}" for i in range(THREADS)]
    for name in names:
        seed.add_annotator(name)
    errors: list = []
    threads = [threading.Thread(target=_label_until_done, args=(url, name, errors)) for name in names]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), f"annotators still running after {time.time() - t0:.0f} s"
    assert not errors, errors
    per_pair = Counter(label["pair_id"] for label in seed.labels())
    seed.close()
    assert set(per_pair) == set(ids), f"{PAIRS - len(per_pair)} pairs were never labeled"
    return per_pair


def _assert_once_each(per_pair: Counter) -> None:
    twice = {pair: n for pair, n in per_pair.items() if n > 1}
    assert not twice, (
        f"labels_per_pair=1 but {len(twice)} of {PAIRS} pairs were labeled more than once "
        f"({sum(per_pair.values())} labels)"
    )


def test_labels_per_pair_holds_with_concurrent_annotators_sqlite(tmp_path):
    _assert_once_each(_race(str(tmp_path / "fb.db")))


def test_labels_per_pair_holds_with_concurrent_annotators_postgres(postgres_url):
    _assert_once_each(_race(postgres_url))
