"""Load test of the Serve generator: throughput and p50 / p99 latency, batching on and off.

Starts a local Ray and Serve and deploys the generator (the tiny model, one replica) as two
applications with the same resources: batching on (requests gathered, passes of ``--pass-size``
images) and off (one request at a time, passes of one image). At each concurrency level,
``--concurrency`` clients send requests in a closed loop (different prompts and seeds, the
server's default steps and size) for ``--seconds``, to one application then the other,
``--repeats`` times. The figure is the batched / unbatched throughput ratio at concurrency 8.

    python benchmarks/serve_load.py [--seconds 10] [--repeats 2] [--concurrency 1 4 8 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


async def closed_loop(url: str, concurrency: int, seconds: float) -> tuple[float, list[float], int]:
    """``(requests per second, latencies in s, failures)`` of ``concurrency`` clients for ``seconds``."""
    import httpx

    latencies, failures = [], 0
    stop = time.perf_counter() + seconds

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal failures
        i = 0
        while time.perf_counter() < stop:
            body = {"prompt": f"a photo of object {worker}-{i}", "seed": 1000 * worker + i}
            start = time.perf_counter()
            response = await http.post("/v1/images/generations", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1
            i += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, failures


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the generator replica")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per batch (batching on)")
    parser.add_argument("--pass-size", type=int, default=8, help="images per model pass (batching on)")
    parser.add_argument("--wait", type=float, default=0.05, help="batch_wait_timeout_s (batching on)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per mode and level, alternated")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides of configs/serve.yaml")
    args = parser.parse_args()

    import ray
    from ray import serve

    from armature.platform.config import compose
    from armature.serve.app import build_application

    common = [
        "api_key_env=null", f"generator.torch_threads={args.threads}", "generator.num_cpus=1",
        "generator.max_ongoing_requests=64", "generator.max_queued_requests=1024",
        "tracking.local_dir=armature_runs/bench",
    ] + args.overrides
    modes = {
        "batched": common + ["batching.enabled=true", f"batching.max_batch_size={args.batch_size}",
                             f"batching.pass_size={args.pass_size}", f"batching.batch_wait_timeout_s={args.wait}"],
        "unbatched": common + ["batching.enabled=false", "batching.pass_size=1"],
    }
    ray.init(num_cpus=4, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    # Both applications stay up; the measurements alternate between them, so that a change in
    # the machine's background load hits both alike. Only the one being measured gets requests.
    for mode, overrides in modes.items():
        serve.run(build_application(compose("serve", overrides)), name=mode, route_prefix=f"/{mode}")
        asyncio.run(closed_loop(f"http://127.0.0.1:{args.port}/{mode}", 4, 3.0))  # warm up
    samples: dict = {}
    for c in args.concurrency:
        for _ in range(args.repeats):
            for mode in modes:
                throughput, latencies, failures = asyncio.run(
                    closed_loop(f"http://127.0.0.1:{args.port}/{mode}", c, args.seconds)
                )
                samples.setdefault((mode, c), []).append((throughput, latencies, failures))
                print(f"  {mode:9s} concurrency {c:2d}: {throughput:6.2f} req/s  ({len(latencies)} requests, "
                      f"{failures} failed)", flush=True)
    serve.shutdown()
    ray.shutdown()
    results = {  # mean throughput, every latency, failures
        key: (statistics.mean(r[0] for r in runs), [x for r in runs for x in r[1]], sum(r[2] for r in runs))
        for key, runs in samples.items()
    }
    cfg = compose("serve", modes["batched"])

    print(f"\ntiny model, {cfg.sampling.num_steps} steps, 32x32, 1 image a request, one generator replica "
          f"({args.threads} torch thread(s)); batching on: up to {args.batch_size} requests a batch, "
          f"{args.pass_size} images a pass (padded), {args.wait * 1e3:.0f} ms batch wait; "
          "off: one request at a time, 1 image a pass\n")
    print("| batching | concurrency | throughput (req/s) | p50 latency (ms) | p99 latency (ms) | failed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (mode, c), (throughput, latencies, failures) in results.items():
        p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
        batching = "on" if mode == "batched" else "off"
        print(f"| {batching} | {c} | {throughput:.2f} | {p50:.0f} | {p99:.0f} | {failures} |")
    if ("batched", 8) in results and ("unbatched", 8) in results:
        ratio = results["batched", 8][0] / results["unbatched", 8][0]
        print(f"\nbatched / unbatched throughput at concurrency 8: {ratio:.2f}  (target >= 2)")
    print(f"median latency at concurrency 1, batching on / off: "
          f"{statistics.median(results['batched', 1][1]) * 1e3:.0f} / "
          f"{statistics.median(results['unbatched', 1][1]) * 1e3:.0f} ms"
          if ("batched", 1) in results and ("unbatched", 1) in results else "")


if __name__ == "__main__":
    main()
