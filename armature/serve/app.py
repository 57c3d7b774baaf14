"""The Ray Serve application: an HTTP ingress in front of generator replicas.

* ``Ingress`` (FastAPI, ``routes.py``) checks each request against the limits and the API key,
  resolves its adapter reference in the MLflow registry (``name``, ``name/3``, ``name@prod``) to a
  version, and calls a generator with that version as the multiplexed model id. Over-full
  queues answer 503, requests past ``limits.request_timeout_s`` 504. With one generator replica
  (``ingress_in_generator``), the ingress holds the model itself, deployed as ``Generator``: a
  request then crosses no Ray hop between the HTTP app and the model.
* ``Generator`` holds the model. ``serve.multiplexed`` keeps an LRU of loaded adapters per
  replica and routes a request to a replica that has its adapter; compatible requests gather
  while the model is busy (or, the model free, while they keep arriving) and run together in
  passes of ``batching.pass_size`` images (``generation.py``); requests that name a reward are
  scored, and with ``best_of`` the best of their candidates kept.

* ``Editor`` (only with ``edits.pipeline``) holds a SkeleGuide pipeline for ``POST /v1/images/edits``:
  a person rendered into a scene from a planned or given pose (``edits.py``), or where the OpenAI
  API's multipart edit marks the image transparent (``openai_api.py``).

``build_app`` is the Serve application builder (``serve run armature.serve.app:build_app``,
``import_path`` of a Serve config file; its ``args`` are Hydra overrides of
``configs/serve.yaml``); ``run`` is the ``armature serve`` command.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray import serve

from armature.serve.adapters import Adapter, AdapterBank, AdapterError
from armature.serve.api_common import MAX_SEED, ApiError
from armature.serve.generation import ImageJob, PassShape, best_of
from armature.serve.generation import generate as generate_images
from armature.serve.openai_api import is_adapter_name, model_objects, resolve_size, unknown_model
from armature.serve.routes import create_api, hash_key

__all__ = [
    "Editor",
    "Generator",
    "Ingress",
    "build_app",
    "build_application",
    "controller_options",
    "deployment_options",
    "direct_ingress_ports",
    "ingress_in_generator",
    "http_options",
    "ray_serve_env",
    "run",
    "serve_config",
]

LOCAL_PREFIX = "local:"
DIRECT_INGRESS_FIRST_PORT = 30000  # the first port of a replica of its own (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT)
INLINE_ENCODE_PIXELS = 64 * 64  # a request's images of at most this many pixels in all are encoded on the event loop


class Overloaded(Exception):
    """A generator replica's queue is full (the ingress answers 503)."""


@dataclass(eq=False)
class Waiting:
    """A request waiting in a generator replica for the model."""

    adapter: Adapter | None
    shape: PassShape
    request: dict
    future: asyncio.Future
    queued: float = 0.0  # time.time() when it joined the waiting list


# ============================================================================ generator
@serve.deployment
class Generator:
    """Model replicas: adapters per request (LRU), batched passes, Best-of-N."""

    def __init__(self, config: dict, max_waiting: int | None = None):
        """``max_waiting``: the most requests waiting or running in this replica, beyond which
        ``Overloaded`` is raised (None: Serve's ``max_ongoing_requests`` bounds them)."""
        import torch

        from armature.policies import build_policy

        if config["generator"]["torch_threads"]:
            torch.set_num_threads(config["generator"]["torch_threads"])
        model = {**config["model"], "lora": {**config["model"]["lora"], "enabled": False}}
        self.policy = build_policy(model, config["sampling"])
        self.policy.unet.requires_grad_(False)
        self.bank = AdapterBank(self.policy, config["model"])
        self.config = config
        self.defaults = config["sampling"]
        self.pass_size = config["batching"]["pass_size"]
        self.rewards: dict = {}
        counted = ("requests", "images", "groups", "passes", "largest_group", "adapter_loads", "model_s")
        self.counts = dict.fromkeys(counted, 0)
        self.waiting: list[Waiting] = []  # requests not run yet, oldest first
        self.running = 0  # requests in the group being run
        self.max_waiting = max_waiting
        self.runner: asyncio.Task | None = None  # runs the waiting requests, one group at a time

        batching = config["batching"]  # off: one request at a time
        on = batching["enabled"]
        self.max_group = batching["max_batch_size"] if on else 1
        self.max_wait = batching["batch_wait_timeout_s"] if on else 0.0
        self.arrival_gap = batching["arrival_gap_s"]
        self.pad = batching["pad_passes"]
        self.arrived = asyncio.Event()  # set whenever a request joins self.waiting

        async def load_adapter(model_id: str) -> Adapter:
            return await self._load_adapter(model_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=config["adapters"]["max_per_replica"])(
            load_adapter
        )
        # One pass at the default shape, so that the first request does not pay for warm-up.
        warm_up = self._defaults({"prompt": "warm-up", "n": 1, "seed": 0})
        self._generate_group(None, self._shape(warm_up), [warm_up], count=False)

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict:
        import torch

        return {
            **self.counts,
            "adapters_loaded": self.bank.loaded,
            "torch_threads": torch.get_num_threads(),
        }

    async def time_pass(self, images: int) -> float:
        """Seconds of one pass of ``images`` requests at the default shape, run as a group runs
        (a worker thread, the model lock), not counted: what the model costs in this replica."""
        requests = [self._defaults({"prompt": f"timed {i}", "n": 1, "seed": i}) for i in range(images)]
        outputs = await asyncio.to_thread(self._generate_group, None, self._shape(requests[0]), requests, False)
        return outputs[0]["timing"]["model_end"] - outputs[0]["timing"]["model_start"]

    async def image_size(self) -> tuple[int, int]:
        """The model's own ``(height, width)``."""
        return tuple(self.policy.image_size)

    async def _load_adapter(self, model_id: str) -> Adapter:
        from armature.platform.registry import download_adapter, resolve_version

        if model_id.startswith(LOCAL_PREFIX):
            name = model_id[len(LOCAL_PREFIX) :]
            if name not in self.config["adapters"]["local"]:
                raise AdapterError(f"adapter {name!r}: not one of adapters.local")
            folder = self.config["adapters"]["local"][name]
        else:
            uri, cache = self.config["tracking_uri"], self.config["adapters"]["cache_dir"]
            try:
                version = await asyncio.to_thread(resolve_version, uri, model_id)
            except KeyError as err:
                raise AdapterError(str(err.args[0] if err.args else err)) from err
            folder = await asyncio.to_thread(download_adapter, uri, version, cache)
        adapter = await asyncio.to_thread(self.bank.load, model_id, folder)
        self.counts["adapter_loads"] += 1
        return adapter

    async def generate(self, request: dict) -> dict:
        """One request's images, seeds and scores, from passes it shares with compatible requests.

        The request joins the replica's waiting list. Whenever the model is free, the oldest
        waiting request runs with every compatible one waiting (same adapter and shape, up to
        ``max_batch_size``): requests that came while the model was busy share the next passes.
        A group that is not full waits for more while they keep coming (no gap over
        ``arrival_gap_s``), at most ``batch_wait_timeout_s``.
        """
        return await self.run(request, serve.get_multiplexed_model_id())

    async def run(self, request: dict, model_id: str) -> dict:
        """``generate`` with the adapter's multiplexed model id (``""``: the base model) given."""
        if self.max_waiting is not None and len(self.waiting) + self.running >= self.max_waiting:
            raise Overloaded(f"{self.max_waiting} requests are waiting or running")
        adapter = await self.get_adapter(model_id) if model_id else None
        request = self._defaults(request)
        mine = Waiting(adapter, self._shape(request), request, asyncio.get_running_loop().create_future(), time.time())
        self.waiting.append(mine)
        self.arrived.set()
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run_waiting())
        try:
            return await asyncio.shield(mine.future)
        except asyncio.CancelledError:  # the caller gave up: do not run it
            if mine in self.waiting:
                self.waiting.remove(mine)
            raise

    async def _run_waiting(self) -> None:
        while self.waiting:
            await self._gather()
            group = self._group()
            self.waiting = [w for w in self.waiting if w not in group]
            self.running = len(group)
            try:
                await self._run_group(group)
            finally:
                self.running = 0

    async def _gather(self) -> None:
        """Wait, the model being free, while requests that can join the next group keep coming."""
        end = time.monotonic() + self.max_wait
        while self.waiting and len(self._group()) < self.max_group:
            timeout = min(self.arrival_gap, end - time.monotonic())
            if timeout <= 0:
                return
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return

    def _group(self) -> list[Waiting]:
        """The oldest waiting request and those that can share its passes."""
        if not self.waiting:
            return []
        first = self.waiting[0]
        same = [w for w in self.waiting if w.adapter is first.adapter and w.shape == first.shape]
        return same[: self.max_group]

    async def _run_group(self, group: list[Waiting]) -> None:
        now = time.time()
        for w in [w for w in group if w.request.get("deadline", now) < now]:  # the caller gave up
            w.future.set_exception(TimeoutError("the request's deadline passed before it ran"))
            group.remove(w)
        if not group:
            return
        try:
            requests = [w.request for w in group]
            outputs = await asyncio.to_thread(self._generate_group, group[0].adapter, group[0].shape, requests)
        except Exception as err:  # noqa: BLE001 - this group's requests fail, not the others
            for w in group:
                w.future.set_exception(err)
            return
        ran = time.time()
        for w, output in zip(group, outputs):
            output["timing"] = {**output["timing"], "queued": w.queued, "group": len(group), "ran": ran}
            w.future.set_result(output)
        self.counts["groups"] += 1
        self.counts["largest_group"] = max(self.counts["largest_group"], len(group))

    def _defaults(self, request: dict) -> dict:
        d = self.defaults
        h, w = self.policy.image_size if request.get("height") is None else (request["height"], request["width"])
        steps = request.get("steps") or d["num_steps"]
        guidance = d["guidance_scale"] if request.get("guidance_scale") is None else request["guidance_scale"]
        negative = d["negative_prompt"] if request.get("negative_prompt") is None else request["negative_prompt"]
        return {
            **request,
            "height": h,
            "width": w,
            "steps": steps,
            "guidance_scale": guidance,
            "negative_prompt": negative,
        }

    def _shape(self, request: dict) -> PassShape:
        return PassShape(
            steps=request["steps"],
            height=request["height"],
            width=request["width"],
            guidance_scale=float(request["guidance_scale"]),
            eta=float(self.defaults["eta"]),
        )

    def _reward(self, name: str):
        from armature.rewards import load

        if name not in self.rewards:
            self.rewards[name] = load(name, **(self.config["rewards"].get(name) or {}))
        return self.rewards[name]

    def _generate_group(
        self, adapter: Adapter | None, shape: PassShape, requests: list[dict], count: bool = True
    ) -> list[dict]:
        """Generate, score and select for requests of one shape; runs in a thread."""
        from PIL import Image

        jobs, spans = [], []
        for r in requests:
            k = max(r["n"], r.get("best_of") or 0)
            spans.append((len(jobs), k))
            jobs += [ImageJob(r["prompt"], r["negative_prompt"], r["seed"] + j) for j in range(k)]
        deadline = max(r.get("deadline", float("inf")) for r in requests)
        outputs = []
        with self.bank.lock:  # one pass at a time; adapters change only between passes
            start_time, started = time.perf_counter(), time.time()
            self.bank.activate(adapter)
            images = generate_images(
                self.policy, jobs, shape, self.pass_size, should_stop=lambda: time.time() > deadline, pad=self.pad
            )
            self.counts["model_s"] += time.perf_counter() - start_time
            timing = {"model_start": started, "model_end": time.time()}
            for r, (start, k) in zip(requests, spans):
                candidates, seeds = images[start : start + k], [j.seed for j in jobs[start : start + k]]
                scores = None
                if r.get("reward"):
                    pil = [Image.fromarray(a) for a in candidates]
                    scores = self._reward(r["reward"])(pil, [r["prompt"]] * k)
                keep = best_of(scores, r["n"]) if r.get("best_of") else np.arange(r["n"])
                outputs.append(
                    {
                        "images": candidates[keep],
                        "seeds": [seeds[i] for i in keep],
                        "scores": None if scores is None else [float(scores[i]) for i in keep],
                        "timing": timing,
                    }
                )
        if count:
            self.counts["requests"] += len(requests)
            self.counts["images"] += len(jobs)
            self.counts["passes"] += -(-len(jobs) // self.pass_size)
        return outputs


# ============================================================================ editor
@serve.deployment
class Editor:
    """Replicas holding a ``SkeleGuidePipeline`` (``edits.pipeline``): one edit at a time each."""

    def __init__(self, config: dict):
        import torch

        from armature.policies.skeleguide import SkeleGuidePipeline

        threads = config["edits"]["editor"]["torch_threads"]
        if threads:
            torch.set_num_threads(threads)
        self.pipeline = SkeleGuidePipeline.from_pretrained(config["edits"]["pipeline"])
        self.num_steps = config["edits"]["num_steps"]
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "model_s": 0.0}

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict:
        return dict(self.counts)

    async def edit(self, request: dict) -> dict:
        return await asyncio.to_thread(self._edit, request)

    def _edit(self, request: dict) -> dict:
        from armature.serve.edits import run_edit

        with self.lock:
            if request["deadline"] < time.time():  # the caller gave up while this waited
                raise TimeoutError("the request's deadline passed before it ran")
            start = time.perf_counter()
            result = run_edit(
                self.pipeline,
                request["scene"],
                request["prompt"],
                request["region"],
                request["pose"],
                request["seed"],
                request["steps"] or self.num_steps,
            )
            self.counts["model_s"] += time.perf_counter() - start
            self.counts["requests"] += 1
        return result


# ============================================================================ ingress
@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP front: limits, auth, adapter names -> versions, errors, PNG encoding."""

    def __init__(self, generator, config: dict, api_key_sha256: str | None = None, editor=None):
        """``generator``: a handle to the ``Generator`` deployment, or None: this replica holds the
        model itself (``ingress_in_generator``), its queue bounded by ``generator.max_ongoing_requests
        + max_queued_requests`` as Serve bounds a separate generator's."""
        self.generator = generator
        self.model = None
        if generator is None:
            g = config["generator"]
            self.model = Generator.func_or_class(config, g["max_ongoing_requests"] + g["max_queued_requests"])
        self.editor = editor
        self.config = config
        self.api_key_sha256 = api_key_sha256
        self.versions: dict[str, tuple[float, object]] = {}  # reference -> (expiry, (id, label) or error)
        self.base_model = config["model"].get("pretrained") or config["model"]["family"]  # its OpenAI `model` id
        self.native_size: tuple[int, int] | None = None  # the model's (height, width), asked once
        self.timings: collections.deque = collections.deque(maxlen=4096)  # recent generations' stage times
        # Open the registry's store now (a new local store creates its tables), not on a request.
        threading.Thread(target=self._open_registry, daemon=True).start()

    def _open_registry(self) -> None:
        from armature.platform.registry import list_adapters

        try:
            list_adapters(self.config["tracking_uri"])
        except Exception:  # noqa: BLE001 - requests will report it
            pass

    def __serve_build_asgi_app__(self):
        c = self.config
        return create_api(
            self,
            c["limits"],
            sorted(c["rewards"]),
            self.api_key_sha256,
            edits_max_body_bytes=c["edits"]["max_body_bytes"],
        )

    async def ready(self) -> bool:
        if self.model is not None:
            return True
        try:
            return await asyncio.wait_for(_result(self.generator.ready.remote()), timeout=5.0)
        except Exception:  # noqa: BLE001 - any failure means: not ready
            return False

    async def stats(self) -> dict:
        """The generator's counters (``Generator.stats``)."""
        if self.model is not None:
            return await self.model.stats()
        return await _result(self.generator.stats.remote())

    async def time_pass(self, images: int) -> float:
        """``Generator.time_pass``: one idle pass of ``images`` requests, in seconds."""
        if self.model is not None:
            return await self.model.time_pass(images)
        return await _result(self.generator.time_pass.remote(images))

    async def recent_timings(self) -> list[dict]:
        """The stage times (``time.time()``) of the generations answered since the last call (at most
        4096), oldest first: ``seed``, ``handler_start``, ``queued``, ``model_start``, ``model_end``, ``ran``
        (the group's futures resolved), ``resumed`` (this handler running again), ``encoded`` (its
        PNGs made: the handler's end), ``group`` (requests in its group)."""
        out = list(self.timings)
        self.timings.clear()
        return out

    async def adapters(self) -> list[dict]:
        from armature.platform.registry import list_adapters

        local = [{"id": n, "name": n, "source": "local"} for n in sorted(self.config["adapters"]["local"])]
        try:
            registered = await asyncio.to_thread(list_adapters, self.config["tracking_uri"])
        except Exception as err:  # noqa: BLE001 - an unreachable registry is the server's problem
            raise ApiError(503, "registry", f"the MLflow model registry did not answer: {err}") from err
        out = [{"id": f"{a['name']}/{a['version']}", "source": "registry", **a} for a in registered]
        latest = {a["name"]: a for a in registered}  # sorted by version: the last one stays
        out += [{"id": name, "source": "registry", **a} for name, a in latest.items()]
        out += [{"id": f"{a['name']}@{alias}", "source": "registry", **a} for a in registered for alias in a["aliases"]]
        return local + out

    async def models(self) -> list[dict]:
        """The OpenAI API's model list: the base model, then the adapters."""
        return model_objects(self.base_model, await self.adapters())

    def _reference(self, body) -> tuple[str | None, str]:
        """The adapter a request names (None: the base model) and the field that names it."""
        if body.model is not None and body.adapter is not None:
            raise ApiError(400, "model", "model: name the adapter as `model` or as `adapter`, not both")
        if body.model is None or body.model == self.base_model:
            return body.adapter, "adapter"
        if not is_adapter_name(body.model):
            raise unknown_model(body.model, "not an adapter name (name, name/3 or name@alias)")
        return body.model, "model"

    async def _size(self, size: str | None) -> tuple[int | None, int | None]:
        if size not in (None, "auto") and self.native_size is None:
            if self.model is not None:
                self.native_size = await self.model.image_size()
            else:
                self.native_size = tuple(await _result(self.generator.image_size.remote()))
        return resolve_size(size, self.native_size, self.config["limits"])

    async def _resolve(self, reference: str | None, field: str = "adapter") -> tuple[str, str | None]:
        """``(multiplexed model id, what it resolved to)``; ``("", None)`` for the base model;
        errors name ``field`` (``adapter`` or ``model``)."""
        if reference is None:
            return "", None
        if reference in self.config["adapters"]["local"]:
            return LOCAL_PREFIX + reference, LOCAL_PREFIX + reference
        now = time.monotonic()
        cached = self.versions.get(reference)
        if cached is None or cached[0] < now:
            from armature.platform.registry import resolve_version

            try:
                mv = await asyncio.to_thread(resolve_version, self.config["tracking_uri"], reference)
                value: object = (f"{mv['name']}/{mv['version']}",) * 2
            except KeyError as err:
                value = LookupError(str(err.args[0] if err.args else err))
            except Exception as err:  # noqa: BLE001
                raise ApiError(503, "adapter", f"the MLflow model registry did not answer: {err}") from err
            if len(self.versions) > 10_000:
                self.versions.clear()
            cached = self.versions[reference] = (now + self.config["adapters"]["resolve_ttl_s"], value)
        if isinstance(cached[1], LookupError):
            message = str(cached[1])
            raise unknown_model(reference, message) if field == "model" else ApiError(404, field, message)
        return cached[1]

    async def generate(self, body) -> dict:
        from ray.serve.exceptions import BackPressureError

        handler_start = time.time()
        reference, field = self._reference(body)
        model_id, label = await self._resolve(reference, field)
        timeout = float(self.config["limits"]["request_timeout_s"])
        width, height = await self._size(body.size)
        payload = {
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "n": body.n,
            "best_of": body.best_of,
            "reward": body.reward,
            "steps": body.steps,
            "guidance_scale": body.guidance_scale,
            "width": width,
            "height": height,
            "seed": random.randint(0, MAX_SEED) if body.seed is None else body.seed,
            "deadline": time.time() + timeout,
        }
        response = None  # a separate generator's answer, cancelled on a timeout
        if self.model is not None:  # cancelled by wait_for on a timeout
            call = self.model.run(payload, model_id)
        else:
            response = self.generator.options(multiplexed_model_id=model_id).generate.remote(payload)
            call = _result(response)
        try:
            result = await asyncio.wait_for(call, timeout=timeout + 1.0)
        except (BackPressureError, Overloaded) as err:
            raise ApiError(
                503, "generator", f"overloaded, retry later ({err})", headers={"Retry-After": "1"}, code="overloaded"
            ) from err
        except AdapterError as err:
            raise ApiError(400, field, str(err.args[0] if err.args else err)) from err
        except (asyncio.TimeoutError, TimeoutError) as err:
            if response is not None:
                response.cancel()
            raise ApiError(504, "generator", f"no answer within limits.request_timeout_s={timeout:g}") from err
        resumed = time.time()
        images = np.asarray(result["images"])
        # A few small PNGs encode in less time than a hop to a worker thread and back.
        inline = images[..., 0].size <= INLINE_ENCODE_PIXELS
        data = _encode(result) if inline else await asyncio.to_thread(_encode, result)
        height, width = images.shape[1:3]
        timing = {"seed": payload["seed"], "handler_start": handler_start, **result.get("timing", {})}
        self.timings.append({**timing, "resumed": resumed, "encoded": time.time()})
        return {
            "created": int(time.time()),
            "model": body.model or self.base_model,
            "size": f"{width}x{height}",
            "adapter": reference,
            "adapter_version": label,
            "reward": body.reward,
            "data": data,
        }

    async def edit(self, body, model: str | None = None) -> dict:
        from ray.serve.exceptions import BackPressureError

        from armature.serve.edits import EditError, check_edit, encode_png

        if self.editor is None:
            raise ApiError(404, "path", "this server has no edit pipeline: start it with edits.pipeline=<folder>")
        if model not in (None, self.base_model):
            raise ApiError(
                400,
                "model",
                f"model={model}: edits run the edit pipeline (edits.pipeline); leave model "
                f"out or name {self.base_model!r}, adapters apply to generations",
            )
        checked = await asyncio.to_thread(check_edit, body, self.config["limits"])
        timeout = float(self.config["limits"]["request_timeout_s"])
        seed = random.randint(0, MAX_SEED) if body.seed is None else body.seed
        payload = {
            **checked,
            "prompt": body.prompt,
            "seed": seed,
            "steps": body.steps,
            "deadline": time.time() + timeout,
        }
        response = self.editor.edit.remote(payload)
        try:
            result = await asyncio.wait_for(_result(response), timeout=timeout + 1.0)
        except BackPressureError as err:
            raise ApiError(
                503, "editor", f"overloaded, retry later ({err})", headers={"Retry-After": "1"}, code="overloaded"
            ) from err
        except EditError as err:
            raise ApiError(400, err.field, str(err.args[0] if err.args else err)) from err
        except (asyncio.TimeoutError, TimeoutError) as err:
            response.cancel()
            raise ApiError(504, "editor", f"no answer within limits.request_timeout_s={timeout:g}") from err
        image = await asyncio.to_thread(encode_png, result["image"])
        layout = None if result["layout"] is None else await asyncio.to_thread(encode_png, result["layout"])
        return {
            "created": int(time.time()),
            "data": [{"b64_json": image, "seed": seed}],
            "pose": result["pose"],
            "layout_b64_json": layout,
        }


async def _result(response):
    return await response


def _encode(result: dict) -> list[dict]:
    from PIL import Image

    data = []
    for i, (image, seed) in enumerate(zip(result["images"], result["seeds"])):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
        score = None if result["scores"] is None else result["scores"][i]
        data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode(), "seed": seed, "score": score})
    return data


# ============================================================================ building
def deployment_options(d: dict) -> dict:
    """Serve deployment options from a ``generator`` / ``ingress`` config section."""
    auto = d["autoscaling"]
    return {
        "ray_actor_options": {"num_cpus": d["num_cpus"], "num_gpus": d["num_gpus"]},
        "max_ongoing_requests": d["max_ongoing_requests"],
        "max_queued_requests": d["max_queued_requests"],
        "autoscaling_config": {
            "min_replicas": auto["min_replicas"],
            "max_replicas": auto["max_replicas"],
            "initial_replicas": max(auto["min_replicas"], 1),
            "target_ongoing_requests": auto["target_ongoing_requests"],
            "upscale_delay_s": auto["upscale_delay_s"],
            "downscale_delay_s": auto["downscale_delay_s"],
        },
    }


def check_rewards(cfg) -> None:
    """Refuse a ``serve`` config whose ``rewards`` names a reward that is not registered (the
    config schema cannot know the reward registry: platform sits below serve, above rewards)."""
    from armature.platform.config import ConfigError
    from armature.rewards import available

    unknown = [name for name in cfg["rewards"] if name not in available()]
    if unknown:
        raise ConfigError(f"invalid config:\n  rewards: unknown {unknown}; available rewards: {', '.join(available())}")


def build_application(cfg):
    """The Serve application of a composed ``serve`` config."""
    from omegaconf import DictConfig, OmegaConf

    from armature.platform.tracking import resolve_tracking

    check_rewards(cfg)

    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    c["tracking_uri"], _ = resolve_tracking(c["tracking"])
    adapters = c["adapters"]
    adapters["cache_dir"] = str(Path(adapters["cache_dir"]).expanduser().resolve())
    adapters["local"] = {k: str(Path(v).expanduser().resolve()) for k, v in adapters["local"].items()}
    key = os.environ.get(c["api_key_env"]) if c["api_key_env"] else None
    key_sha256 = hash_key(key) if key else None
    env = ray_serve_env(c)  # direct ingress: the ingress replica reads it when it starts
    runtime_env = {"runtime_env": {"env_vars": env}} if env else {}
    editor = None
    if c["edits"]["pipeline"]:
        c["edits"]["pipeline"] = str(Path(c["edits"]["pipeline"]).expanduser().resolve())
        editor = Editor.options(**deployment_options(c["edits"]["editor"])).bind(c)
    if ingress_in_generator(c):
        # One deployment, named Generator: the generator's resources and replicas, the ingress's
        # limits on HTTP requests in flight (generations are bounded by the generator's queue).
        options = {**deployment_options(c["generator"]), "name": "Generator"}
        options.update({k: c["ingress"][k] for k in ("max_ongoing_requests", "max_queued_requests")})
        options["ray_actor_options"].update(runtime_env)
        return Ingress.options(**options).bind(None, c, key_sha256, editor)
    generator = Generator.options(**deployment_options(c["generator"])).bind(c)
    options = deployment_options(c["ingress"])
    options["ray_actor_options"].update(runtime_env)
    return Ingress.options(**options).bind(generator, c, key_sha256, editor)


def ingress_in_generator(c: dict) -> bool:
    """Whether the generator replica is its own ingress: as ``ingress_in_generator`` says, and when
    it says nothing (None), when there is one generator replica."""
    if c.get("ingress_in_generator") is not None:
        return bool(c["ingress_in_generator"])
    return c["generator"]["autoscaling"]["max_replicas"] == 1


def _hydra_value(value) -> str:
    """``value`` in Hydra's override grammar."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_hydra_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[\w./@:+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _overrides(key: str, value) -> list[str]:
    """Hydra overrides setting ``key`` to ``value``; a mapping sets (or adds) each of its entries."""
    if isinstance(value, dict):
        return [f"++{key}.{k}={_hydra_value(v)}" for k, v in value.items()]
    return [f"{key}={_hydra_value(value)}"]


def build_app(args: dict | None = None):
    """Serve application builder: ``args`` are Hydra overrides, ``{key: value}`` and/or
    ``{"overrides": ["key=value", ...]}``, e.g. ``{model: sd15, limits.max_size: 768}``."""
    from armature.platform.config import compose

    args = dict(args or {})
    overrides = list(args.pop("overrides", []) or [])
    overrides += [o for k, v in args.items() for o in _overrides(k, v)]
    return build_application(compose("serve", overrides))


PROXY_TIMEOUT_MARGIN_S = 30.0


def http_options(cfg) -> dict:
    """Ray Serve's ``http_options`` (its proxy, one per node, shared by every application).

    Its request timeout is the backstop for what ``RequestGuard`` bounds in the ingress: a body
    (``limits.body_timeout_s``), then a generation (``limits.request_timeout_s``).
    """
    lim = cfg["limits"]
    timeout = lim["request_timeout_s"] + (lim["body_timeout_s"] or 0.0) + PROXY_TIMEOUT_MARGIN_S
    return {
        "host": cfg["http"]["host"],
        "port": cfg["http"]["port"],
        "keep_alive_timeout_s": cfg["http"]["keep_alive_timeout_s"],
        "request_timeout_s": timeout,
    }


def ray_serve_env(c) -> dict[str, str]:
    """Ray Serve's settings for ``http``, as the environment variables that its controller and the
    ingress replicas read when they start (empty: Serve's defaults). ``http.direct_ingress``: each
    ingress replica serves HTTP on a port of its own, a stopping one answering ``direct_ingress_drain_s``
    more seconds so that load balancers can drop it first."""
    h = c["http"]
    if not h["direct_ingress"]:
        return {}
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{float(h['direct_ingress_drain_s']):g}",
    }


def controller_options(c) -> dict | None:
    """``serve.start``'s ``controller_options``: the Serve controller's environment (``ray_serve_env``).
    Serve applies it only when it starts its controller: an instance already running keeps its mode."""
    env = ray_serve_env(c)
    return {"runtime_env": {"env_vars": env}} if env else None


def direct_ingress_ports(host: str = "127.0.0.1", first: int = DIRECT_INGRESS_FIRST_PORT, count: int = 64) -> dict:
    """``{application name: port}`` of the ingress replicas on ``host`` that serve HTTP themselves
    (direct ingress): each answers ``GET /-/routes`` on its own port with ``{route prefix: application}``."""
    import httpx

    ports = {}
    for port in range(first, first + count):
        try:
            response = httpx.get(f"http://{host}:{port}/-/routes", timeout=2.0)
        except httpx.TransportError:
            continue
        if response.status_code == 200:
            ports.update({app: port for app in response.json().values()})
    return ports


def serve_config(cfg, overrides: list[str] | None = None) -> dict:
    """A Ray Serve config file (``serve deploy`` / ``serve run``) for this app and overrides."""
    options = controller_options(cfg)
    return {
        **({"controller_options": options} if options else {}),
        "proxy_location": "EveryNode",
        "http_options": http_options(cfg),
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.route_prefix,
                "import_path": "armature.serve.app:build_app",
                "args": {"overrides": list(overrides or [])},
            }
        ],
    }


def run(cfg, blocking: bool = True) -> str:
    """``armature serve``: start Serve on Ray (local or ``cluster.address``), run the app; its URL."""
    import ray
    from omegaconf import OmegaConf

    from armature.platform.cluster import connect

    c = OmegaConf.to_container(cfg, resolve=True)
    required = c["generator"]["num_cpus"] + c["ingress"]["num_cpus"]
    connect(c["cluster"], required, c["cluster"].get("runtime_env"))
    serve.start(http_options=http_options(c), controller_options=controller_options(c))
    serve.run(build_application(cfg), name=c["app_name"], route_prefix=c["route_prefix"])
    host, port = c["http"]["host"], c["http"]["port"]
    if c["http"]["direct_ingress"]:  # the replica's own port, not the proxy's
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        port = direct_ingress_ports(local).get(c["app_name"])
        if port is None:
            raise RuntimeError(
                "http.direct_ingress=true, but no replica of the application serves a port of its own: the "
                "Serve instance on this cluster started without direct ingress (`serve shutdown` it first)"
            )
    url = f"http://{host}:{port}{c['route_prefix'].rstrip('/')}"
    print(f"[armature] serving {c['model']['family']} at {url} (OpenAPI: {url}/docs)", flush=True)
    if blocking:  # until Ctrl-C or SIGTERM
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            while True:
                time.sleep(3600)
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            serve.shutdown()
            ray.shutdown()
    return url
