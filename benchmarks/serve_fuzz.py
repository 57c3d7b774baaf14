"""Fuzz the Serve generator's HTTP API from its OpenAPI document (schemathesis); count the 5xx.

Starts a local Ray and Serve with the generator (the tiny model, an API key, small limits so
that valid requests stay cheap, and a registered LoRA adapter ``armature-adapter`` with alias
``prod``), then runs ``schemathesis run`` against ``/openapi.json`` (valid and invalid requests,
with and without the key) and reads every request and answer back from its HAR report.
Exits 1 if any answer was a 5xx or fewer than ``--min-requests`` requests were made.

    pip install schemathesis   # or: pip install -e ".[test]"
    python benchmarks/serve_fuzz.py [--max-examples 1000] [--min-requests 1000]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def register_demo_adapter(tracking: dict) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    from armature.platform.registry import register_adapter
    from armature.platform.tracking import RunLogger, resolve_tracking, start_run
    from armature.policies import build_policy

    uri, _ = resolve_tracking(tracking)
    policy = build_policy({"family": "tiny", "lora": {"enabled": True, "rank": 2}}, {"num_steps": 2})
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        policy.save_adapter(Path(tmp) / "adapter")
        run_id = start_run(tracking, "fuzz-adapter", {})
        RunLogger(uri, run_id).log_artifacts(Path(tmp) / "adapter", "adapter")
    version = register_adapter(uri, run_id, "armature-adapter")
    MlflowClient(uri).set_registered_model_alias("armature-adapter", "prod", str(version))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-examples", type=int, default=1000, help="schemathesis cases per operation")
    parser.add_argument("--min-requests", type=int, default=1000)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--workers", type=int, default=4, help="concurrent schemathesis workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="armature_runs/fuzz", help="where the HAR report goes")
    args = parser.parse_args()

    import ray
    from ray import serve

    from armature.platform.config import compose
    from armature.serve.app import build_application

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking = {"local_dir": str(out / "track"), "experiment": "fuzz"}
    register_demo_adapter(tracking)
    key = secrets.token_urlsafe(16)
    os.environ["ARMATURE_FUZZ_KEY"] = key
    cfg = compose(
        "serve",
        [
            f"tracking.local_dir={out / 'track'}",
            "tracking.experiment=fuzz",
            f"adapters.cache_dir={out / 'cache'}",
            "api_key_env=ARMATURE_FUZZ_KEY",
            "generator.torch_threads=1",
            "generator.max_queued_requests=256",
            "limits.max_steps=4",
            "limits.max_images=2",
            "limits.max_best_of=3",
            "limits.max_size=32",
            "batching.pass_size=4",
            "sampling.num_steps=2",
        ],
    )
    ray.init(num_cpus=4, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_application(cfg), name="fuzz", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    har = out / "fuzz.har"
    har.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--url",
        url,
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,ignored_auth",
        "--max-examples",
        str(args.max_examples),
        "--workers",
        str(args.workers),
        "--seed",
        str(args.seed),
        "--header",
        f"Authorization: Bearer {key}",
        "--suppress-health-check",
        "all",
        "--request-timeout",
        "60",
        "--continue-on-failure",
        "--no-color",
        "--report",
        "har",
        "--report-har-path",
        str(har),
    ]
    print("$", " ".join(command).replace(key, "<key>"), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout[-6000:].replace(key, "<key>"), done.stderr[-2000:], sep="\n")
    serve.shutdown()
    ray.shutdown()

    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = collections.Counter(e["response"]["status"] for e in entries)
    by_route = collections.Counter(
        f"{e['request']['method']} {e['request']['url'].removeprefix(url).split('?')[0]}" for e in entries
    )
    server_errors = sum(n for s, n in statuses.items() if s >= 500 and s not in (503, 504))
    unavailable = statuses.get(503, 0) + statuses.get(504, 0)
    print(f"requests: {len(entries)}")
    print("by route: " + ", ".join(f"{r}: {n}" for r, n in by_route.most_common()))
    print("by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    print(
        f"5xx: {server_errors + unavailable} (500-class errors: {server_errors}, 503/504 overload or timeout: "
        f"{unavailable}); schemathesis exit code {done.returncode}"
    )
    ok = server_errors + unavailable == 0 and len(entries) >= args.min_requests
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
