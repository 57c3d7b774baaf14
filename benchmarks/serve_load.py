"""Load test of the Serve generator against bare diffusers: throughput and p50 / p99 latency.

Starts a local Ray and Serve and deploys the generator (the tiny model, one replica, batching
on as configured: ``configs/serve.yaml``'s ``batching`` unless a flag says; one replica, so the
ingress runs inside the generator replica; with ``--split`` also an application with a separate
ingress deployment, with ``--unpadded`` one whose passes are not padded to ``pass_size``, with
``--unbatched`` one that takes one request at a time, each with the same resources). At each concurrency level,
``--concurrency`` clients send requests of one image in a closed loop (different prompts and
seeds, the server's default steps and size) for ``--seconds``. In the same run, this process
calls the same model's diffusers pipeline directly (``pipe(prompt=[...])``, same steps, size,
guidance, eta and torch threads, no HTTP, no PNG) at batch 1 and batch ``--bare-batch``. The
measurements alternate, ``--repeats`` times, so that a change in the machine's background load
hits all alike. The figure is served images/s at concurrency 8 over bare diffusers' images/s at
batch 8 (on 2 CPU cores batching itself gains little, so the goal is >= 0.9).

    python benchmarks/serve_load.py [--seconds 10] [--repeats 2] [--concurrency 1 8] [--threads 1] [--split]
        [--unpadded] [--unbatched]

``--stages`` measures instead where a request's time goes at the last ``--concurrency`` level (the
default application only; with ``--direct-ingress``, on its replica's port): the median of each stage (client send -> handler start -> queued in
the generator -> model pass -> handler resumed -> PNGs encoded -> client receive), the model's busy
share and its idle time between passes, and the same pass of ``--pass-size`` images timed on the
idle machine: diffusers and the serving code in this process, and the serving code in the replica.
``--direct-ingress`` starts Serve with direct ingress and also measures the default application with
``http.direct_ingress=true`` (``direct``: its replica serves HTTP on a port of its own, no proxy hop).
``--ray-env KEY=VALUE ...`` gives Ray's processes (the Serve proxy, the replicas) an environment,
e.g. Ray Serve's ``RAY_SERVE_*`` settings, to try them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


async def closed_loop(
    url: str, concurrency: int, seconds: float, sent: dict | None = None
) -> tuple[float, list[float], int]:
    """``(requests per second, latencies in s, failures)`` of ``concurrency`` clients for ``seconds``;
    ``sent``, if given, gets ``seed: (time.time() sent, time.time() answered)`` of each answer."""
    import httpx

    latencies, failures = [], 0
    stop = time.perf_counter() + seconds

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal failures
        i = 0
        while time.perf_counter() < stop:
            body = {"prompt": f"a photo of object {worker}-{i}", "seed": 1000 * worker + i}
            start, sent_at = time.perf_counter(), time.time()
            response = await http.post("/v1/images/generations", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
                if sent is not None:
                    sent[body["seed"]] = (sent_at, time.time())
            else:
                failures += 1
            i += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, failures


def bare_diffusers(
    pipe, batch: int, seconds: float, sampling: dict, size: tuple[int, int], start_seed: int
) -> tuple[float, list[float]]:
    """``(images per second, latency of each call in s)`` of the diffusers pipeline called directly,
    ``batch`` images a call (each with its own seed), for ``seconds``."""
    import torch

    height, width = size
    latencies, images, seed = [], 0, start_seed
    stop = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < stop:
        prompts = [f"a photo of object {seed + i}" for i in range(batch)]
        generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        began = time.perf_counter()
        pipe(
            prompt=prompts,
            negative_prompt=[sampling["negative_prompt"]] * batch,
            num_inference_steps=sampling["num_steps"],
            guidance_scale=sampling["guidance_scale"],
            eta=sampling["eta"],
            height=height,
            width=width,
            generator=generators,
            output_type="np",
        )
        latencies.append(time.perf_counter() - began)
        images += batch
        seed += batch
    return images / (time.perf_counter() - start), latencies


def serving_pass(policy, images: int, sampling: dict, size: tuple[int, int], seed: int) -> float:
    """Seconds of one pass of the serving code (``armature.serve.generation.generate``) in this process."""
    from armature.serve.generation import ImageJob, PassShape, generate

    height, width = size
    shape = PassShape(sampling["num_steps"], height, width, float(sampling["guidance_scale"]), float(sampling["eta"]))
    jobs = [ImageJob(f"a photo of object {seed + i}", sampling["negative_prompt"], seed + i) for i in range(images)]
    began = time.perf_counter()
    generate(policy, jobs, shape, images)
    return time.perf_counter() - began


def stages(url: str, handle, pipe, policy, sampling: dict, args) -> None:
    """Median time of each stage of a request at concurrency ``args.concurrency[-1]``, the model's busy
    share, and the same model pass timed idle: in this process (diffusers, the serving code) and in
    the replica."""
    import torch

    c, b = args.concurrency[-1], args.pass_size
    idle = {
        "bare diffusers call, this process": [
            bare_diffusers(pipe, b, 1e-3, sampling, policy.image_size, 7 * 10**6 + 100 * i)[1][0] for i in range(5)
        ],
        "serving code pass, this process": [
            serving_pass(policy, b, sampling, policy.image_size, 8 * 10**6 + 100 * i) for i in range(5)
        ],
        "serving code pass, the replica idle": [handle.time_pass.remote(b).result() for _ in range(5)],
    }
    replica = handle.stats.remote().result()
    threads = replica["torch_threads"]
    handle.recent_timings.remote().result()  # drop the warm-up's
    sent: dict = {}
    began = time.time()
    throughput, latencies, failures = asyncio.run(closed_loop(url, c, args.seconds, sent))
    ended = time.time()
    timings = [t for t in handle.recent_timings.remote().result() if t["seed"] in sent]
    rows = {  # stage: (from, to) of the request's times
        "client send -> handler start": ("sent", "handler_start"),
        "handler start -> queued in the generator": ("handler_start", "queued"),
        "queued -> model pass start (queue wait)": ("queued", "model_start"),
        "model pass (its group's)": ("model_start", "model_end"),
        "model pass end -> futures resolved": ("model_end", "ran"),
        "futures resolved -> handler resumed": ("ran", "resumed"),
        "handler resumed -> PNG encoded (handler end)": ("resumed", "encoded"),
        "handler end -> client receive": ("encoded", "received"),
        "client send -> client receive": ("sent", "received"),
    }
    for t in timings:
        t["sent"], t["received"] = sent[t["seed"]]
    passes = sorted({(t["model_start"], t["model_end"]) for t in timings})
    busy = sum(min(e, ended) - max(s, began) for s, e in passes if e > began and s < ended) / (ended - began)
    gaps = [s2 - e1 for (_, e1), (s2, _) in zip(passes, passes[1:])]
    print(
        f"\nstages at concurrency {c}, {args.seconds:g} s, {throughput:.2f} images/s, {len(timings)} requests traced "
        f"({failures} failed), {len(passes)} passes of {b} rows, torch threads: this process "
        f"{torch.get_num_threads()}, the replica {threads}\n"
    )
    print("| stage | median (ms) | p90 (ms) |")
    print("| --- | ---: | ---: |")
    for name, (a, z) in rows.items():
        values = [t[z] - t[a] for t in timings]
        if name.startswith("model pass ("):
            values = [e - s for s, e in passes]
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} | {percentile(values, 90) * 1e3:.1f} |")
    print(f"| model idle between passes | {statistics.median(gaps) * 1e3:.1f} | {percentile(gaps, 90) * 1e3:.1f} |")
    for name, values in idle.items():
        print(f"| {name}, {b} images, idle machine | {statistics.median(values) * 1e3:.1f} | {max(values) * 1e3:.1f} |")
    print(f"\nmodel busy: {busy:.0%}; requests a group: {statistics.mean(t['group'] for t in timings):.1f}")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the generator replica")
    parser.add_argument("--batch-size", type=int, default=8, help="batching.max_batch_size: requests a group")
    parser.add_argument("--pass-size", type=int, default=8, help="batching.pass_size: images a model pass")
    parser.add_argument("--wait", type=float, help="batching.batch_wait_timeout_s (default: the config's)")
    parser.add_argument("--gap", type=float, help="batching.arrival_gap_s (default: the config's)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per mode and level, alternated")
    parser.add_argument("--bare-batch", type=int, default=8, help="the batch of bare diffusers to compare with")
    parser.add_argument("--split", action="store_true", help="also serve with ingress_in_generator=false")
    parser.add_argument("--unpadded", action="store_true", help="also serve with batching.pad_passes=false")
    parser.add_argument("--unbatched", action="store_true", help="also serve with batching off")
    parser.add_argument(
        "--direct-ingress", action="store_true", help="Ray Serve's direct ingress on; also drive the replica's port"
    )
    parser.add_argument("--ray-env", nargs="*", default=[], help="KEY=VALUE environment of Ray's processes")
    parser.add_argument("--stages", action="store_true", help="only: the time of each stage of a request")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides of configs/serve.yaml")
    args = parser.parse_args()

    import ray
    import torch
    from omegaconf import OmegaConf
    from ray import serve

    from armature.platform.config import compose
    from armature.policies import build_policy
    from armature.serve.app import build_application, controller_options, direct_ingress_ports

    common = [
        "api_key_env=null",
        f"generator.torch_threads={args.threads}",
        "generator.num_cpus=1",
        "generator.max_ongoing_requests=64",
        "generator.max_queued_requests=1024",
        "tracking.local_dir=armature_runs/bench",
    ] + args.overrides
    batched = common + [
        "batching.enabled=true",
        f"batching.max_batch_size={args.batch_size}",
        f"batching.pass_size={args.pass_size}",
    ]
    batched += [] if args.wait is None else [f"batching.batch_wait_timeout_s={args.wait}"]
    batched += [] if args.gap is None else [f"batching.arrival_gap_s={args.gap}"]
    modes = {"batched": batched}
    if args.split:
        modes["split"] = batched + ["ingress_in_generator=false"]
    if args.unpadded:
        modes["unpadded"] = batched + ["batching.pad_passes=false"]
    if args.direct_ingress:  # no load balancer to leave: no drain
        modes["direct"] = batched + ["http.direct_ingress=true", "http.direct_ingress_drain_s=0"]
    if args.unbatched:
        modes["unbatched"] = common + ["batching.enabled=false", "batching.pass_size=1"]
    cfg = compose("serve", batched)
    padding = "padded" if cfg.batching.pad_passes else "not padded"
    # Bare diffusers: the same model's pipeline in this process, as many torch threads as the replica.
    torch.set_num_threads(args.threads)
    sampling = OmegaConf.to_container(cfg.sampling)
    policy = build_policy({**OmegaConf.to_container(cfg.model), "lora": {"enabled": False}}, sampling)
    pipe = policy.pipe
    pipe.set_progress_bar_config(disable=True)
    bare_batches = sorted({1, args.bare_batch})
    bare_diffusers(pipe, args.bare_batch, 2.0, sampling, policy.image_size, 0)  # warm up
    os.environ.update(kv.split("=", 1) for kv in args.ray_env)  # after this process read Serve's settings
    ray.init(num_cpus=4, log_to_driver=False)
    # Direct ingress is a mode of the Serve controller (the proxy then runs on the head node only) and
    # of each ingress replica that asks for it; the other applications are served through the proxy.
    options = controller_options(compose("serve", modes["direct"])) if args.direct_ingress else None
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, controller_options=options)
    # The applications stay up; the measurements alternate (bare, then each application), so that a
    # change in the machine's background load hits all alike. Only the one being measured gets requests.
    urls = {}
    for mode, overrides in modes.items():
        serve.run(build_application(compose("serve", overrides)), name=mode, route_prefix=f"/{mode}")
        urls[mode] = f"http://127.0.0.1:{args.port}/{mode}"  # through the Serve proxy
    if args.direct_ingress:  # the direct application on its replica's own port
        urls["direct"] = f"http://127.0.0.1:{direct_ingress_ports()['direct']}/direct"
    for mode in modes:
        asyncio.run(closed_loop(urls[mode], 4, 3.0))  # warm up
    if args.stages:  # the default application, on its replica's own port with --direct-ingress
        mode = "direct" if args.direct_ingress else "batched"
        handle = serve.get_deployment_handle("Generator", app_name=mode)
        try:
            stages(urls[mode], handle, pipe, policy, sampling, args)
        finally:
            serve.shutdown()
            ray.shutdown()
        return
    stats = {mode: serve.get_deployment_handle("Generator", app_name=mode).stats for mode in modes}
    samples: dict = {}
    passes: dict = {}  # (requests, groups run, seconds in model passes, seconds) of each served measurement
    for repeat in range(args.repeats):
        for b in bare_batches:
            throughput, latencies = bare_diffusers(
                pipe, b, args.seconds, sampling, policy.image_size, 10**6 * (repeat + 1)
            )
            samples.setdefault(("bare", b), []).append((throughput, latencies, 0))
            print(f"  bare diffusers batch {b:2d}: {throughput:6.2f} images/s  ({len(latencies)} calls)", flush=True)
        for c in args.concurrency:
            for mode in modes:
                before, began = stats[mode].remote().result(), time.perf_counter()
                throughput, latencies, failures = asyncio.run(closed_loop(urls[mode], c, args.seconds))
                elapsed, after = time.perf_counter() - began, stats[mode].remote().result()
                samples.setdefault((mode, c), []).append((throughput, latencies, failures))
                passes.setdefault((mode, c), []).append(
                    tuple(after[k] - before[k] for k in ("requests", "groups", "model_s")) + (elapsed,)
                )
                print(
                    f"  served {mode:9s} concurrency {c:2d}: {throughput:6.2f} images/s  ({len(latencies)} "
                    f"requests, {failures} failed)",
                    flush=True,
                )
    serve.shutdown()
    ray.shutdown()
    results = {  # mean throughput, every latency, failures
        key: (statistics.mean(r[0] for r in runs), [x for r in runs for x in r[1]], sum(r[2] for r in runs))
        for key, runs in samples.items()
    }
    height, width = policy.image_size

    print(
        f"\n{cfg.model.family} model, {cfg.sampling.num_steps} steps, {width}x{height}, {args.threads} torch "
        f"thread(s), {args.repeats} x {args.seconds:g} s a row. Served: 1 image a request over HTTP, one generator "
        "replica, the ingress inside it (split: a separate ingress deployment); batching on: up to "
        f"{args.batch_size} requests a group, {args.pass_size} images a pass "
        f"({padding}), a group not full waits until no request came for {cfg.batching.arrival_gap_s * 1e3:.0f} ms, "
        f"at most {cfg.batching.batch_wait_timeout_s * 1e3:.0f} ms; unpadded: the same, passes not padded; off: one "
        "request at a time. Bare: the diffusers pipeline called in this process, latency per call\n"
    )
    print(
        "| what | batch / concurrency | images/s | p50 latency (ms) | p99 latency (ms) | images a batch "
        "| model busy | failed |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    names = {
        "bare": "bare diffusers",
        "batched": "served, batching on",
        "split": "served, separate ingress",
        "unpadded": "served, passes not padded",
        "direct": "served, direct ingress",
        "unbatched": "served, batching off",
    }
    for (mode, c), (throughput, latencies, failures) in results.items():
        p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
        requests, groups, model_s, seconds = (sum(x) for x in zip(*passes[mode, c])) if mode != "bare" else (c, 1, 1, 1)
        print(
            f"| {names[mode]} | {c} | {throughput:.2f} | {p50:.0f} | {p99:.0f} | {requests / max(groups, 1):.1f} "
            f"| {model_s / seconds:.0%} | {failures} |"
        )
    if ("batched", 8) in results and ("bare", args.bare_batch) in results:
        ratio = results["batched", 8][0] / results["bare", args.bare_batch][0]
        print(f"\nserved at concurrency 8 / bare diffusers at batch {args.bare_batch}: {ratio:.2f}  (goal >= 0.9)")
    if ("batched", 1) in results and ("bare", 1) in results:
        print(
            f"served at concurrency 1 / bare diffusers at batch 1: {results['batched', 1][0] / results['bare', 1][0]:.2f}"
        )
    if ("bare", 1) in results and ("bare", args.bare_batch) in results:
        gain = results["bare", args.bare_batch][0] / results["bare", 1][0]
        print(f"bare diffusers, batch {args.bare_batch} / batch 1: {gain:.2f}")
    if ("split", 8) in results and ("bare", args.bare_batch) in results:
        ratio = results["split", 8][0] / results["bare", args.bare_batch][0]
        print(f"served with a separate ingress, concurrency 8 / bare diffusers at batch {args.bare_batch}: {ratio:.2f}")
    if ("unpadded", 8) in results and ("bare", args.bare_batch) in results:
        ratio = results["unpadded", 8][0] / results["bare", args.bare_batch][0]
        print(f"served with passes not padded, concurrency 8 / bare diffusers at batch {args.bare_batch}: {ratio:.2f}")
    if ("direct", 8) in results and ("bare", args.bare_batch) in results:
        ratio = results["direct", 8][0] / results["bare", args.bare_batch][0]
        print(f"served by direct ingress, concurrency 8 / bare diffusers at batch {args.bare_batch}: {ratio:.2f}")
    if ("thread", 8) in results and ("bare", args.bare_batch) in results:
        ratio = results["thread", 8][0] / results["bare", args.bare_batch][0]
        print(
            f"served with the app on Serve's own thread, concurrency 8 / bare at batch {args.bare_batch}: {ratio:.2f}"
        )
    if ("batched", 8) in results and ("unbatched", 8) in results:
        on_off = results["batched", 8][0] / results["unbatched", 8][0]
        print(f"served at concurrency 8, batching on / off: {on_off:.2f}")


if __name__ == "__main__":
    main()
