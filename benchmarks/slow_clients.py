"""Slow clients against the Serve generator: /healthz and a generation while N connections stall.

Each stalled connection sends a generation request's headers (``Content-Length: 1000``, no API
key) and the first bytes of its body, then nothing, as a slowloris attack does (``--stall
headers``: all but the blank line that ends the headers). While N of them
are held, the script times ``GET /healthz`` and one authorized generation, each waited on for
``--patience`` seconds at most, then closes them and waits for the server to recover.

The same measurement runs against two servers, one after the other, in this command: the code
of ``--before`` (a git revision, default: where this branch left main), without the request
guard, and this checkout's. Each server is ``armature serve`` (the tiny model, one generator
and one ingress replica, an API key) started in a child process with its own local Ray.

    python benchmarks/slow_clients.py [--counts 0 130 400] [--stall body|headers] [--patience 30] [--before REV]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

KEY = "slow-clients-bench-key"
ROOT = Path(__file__).resolve().parents[1]


def serve(port: int, runs: str) -> None:
    """The child: ``armature serve`` of whichever ``armature`` is first on the path, until SIGTERM."""
    from armature.platform.config import compose
    from armature.serve.app import run

    cfg = compose(
        "serve",
        [
            f"http.port={port}",
            "sampling.num_steps=4",
            "generator.torch_threads=1",
            f"tracking.local_dir={runs}/track",
            f"adapters.cache_dir={runs}/cache",
        ],
    )
    run(cfg)


def start_server(tree: Path, port: int, runs: str, within: float = 600.0) -> subprocess.Popen:
    """The child serving ``tree``'s code, once it runs; its output goes to ``runs``/server.log."""
    env = {**os.environ, "PYTHONPATH": str(tree), "ARMATURE_API_KEY": KEY}
    Path(runs).mkdir(parents=True)
    log = Path(runs) / "server.log"
    with log.open("w") as out:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(port), runs],
            cwd=tree,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stop = time.monotonic() + within
    while time.monotonic() < stop and child.poll() is None:
        if "[armature] serving" in log.read_text(errors="replace"):  # printed once the application runs
            return child
        time.sleep(1)
    child.kill()
    raise RuntimeError(f"the server of {tree} did not start; its output:\n{log.read_text(errors='replace')[-3000:]}")


def stall(port: int, part: str) -> socket.socket:
    """A connection that stalls its request's ``body`` (headers sent) or its ``headers`` (some sent)."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n"
    )
    sock.sendall(head.encode() + (b'\r\n{"prompt": ' if part == "body" else b""))
    return sock


def timed(call) -> tuple[float, str]:
    """``(seconds, HTTP status or what went wrong)`` of one request."""
    import httpx

    start = time.perf_counter()
    try:
        outcome = str(call().status_code)
    except httpx.TimeoutException:
        outcome = "no answer"
    except httpx.HTTPError as err:
        outcome = type(err).__name__
    return time.perf_counter() - start, outcome


def measure(url: str, port: int, count: int, part: str, patience: float, settle: float) -> dict:
    import httpx

    stalled = [stall(port, part) for _ in range(count)]
    try:
        time.sleep(settle)  # the proxy hands them to the ingress
        with httpx.Client(base_url=url, timeout=patience) as client:
            health = timed(lambda: client.get("/healthz"))
            body = {"prompt": "a red cube", "seed": 1}
            generation = timed(
                lambda: client.post("/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"})
            )
    finally:
        for sock in stalled:
            sock.close()
    return {"healthz": health, "generation": generation}


def recover(url: str, within: float = 120.0) -> None:
    """Wait until /healthz answers again once the stalled connections are closed."""
    import httpx

    stop = time.monotonic() + within
    while time.monotonic() < stop:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not recover within {within:g} s")


def base_revision() -> str:
    return subprocess.run(
        ["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def export(revision: str, into: Path) -> Path:
    """``armature/`` and ``configs/`` of ``revision``, extracted into ``into``."""
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", revision, "armature", "configs"], cwd=ROOT, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def show(seconds: float, outcome: str) -> str:
    return f"{seconds:7.3f} s ({outcome})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="+", default=[0, 130, 400], help="stalled connections")
    parser.add_argument(
        "--stall",
        choices=["body", "headers"],
        default="body",
        help="what the stalled connections hold back: the body (headers sent) or the headers' end",
    )
    parser.add_argument("--patience", type=float, default=30.0, help="seconds each timed request is waited on")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between stalling and measuring")
    parser.add_argument(
        "--before", default=None, help="git revision of the 'before' code (default: merge-base with main)"
    )
    parser.add_argument("--port", type=int, default=None, help="default: a free one")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "RUNS"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.serve:
        return serve(int(args.serve[0]), args.serve[1])

    before = args.before or base_revision()
    if args.port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    url = f"http://127.0.0.1:{args.port}"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {f"before ({before[:9]})": export(before, Path(tmp)), "after (this checkout)": ROOT}
        for code, tree in trees.items():
            child = start_server(tree, args.port, f"{tmp}/runs-{len(results)}")
            try:
                for count in args.counts:
                    recover(url)
                    results[code, count] = measure(url, args.port, count, args.stall, args.patience, args.settle)
                    print(
                        f"{code:22} N={count:<4} /healthz {show(*results[code, count]['healthz'])}   "
                        f"generation {show(*results[code, count]['generation'])}",
                        flush=True,
                    )
            finally:
                child.send_signal(signal.SIGTERM)
                child.wait(timeout=120)

    stalled = "headers sent, body stalled" if args.stall == "body" else "headers not finished"
    print(f"\nN stalled connections ({stalled}, no API key); each request waited on for {args.patience:g} s at most")
    codes = list(trees)
    for what in ("healthz", "generation"):
        for count in args.counts:
            (b, b_out), (a, a_out) = (results[c, count][what] for c in codes)
            if b_out == a_out == "200":
                ratio = f"{a / b:.3g}"
            else:  # a time of a failed request is no baseline: say how it failed
                ratio = f"<= {a / b:.3g} (before: no answer)" if b_out == "no answer" else f"n/a (before: {b_out})"
            print(f"{what:10} N={count:<4} before {show(b, b_out)}  after {show(a, a_out)}  after/before {ratio}")


if __name__ == "__main__":
    main()
