"""The official ``openai`` Python client against ``armature serve`` (real HTTP, real Ray Serve).

One Serve application starts for the module, as ``armature serve`` builds it: the tiny model, an
API key from the environment, a LoRA adapter registered in MLflow (a temporary SQLite store) with
the alias ``production``, and the tiny SkeleGuide pipeline as its edit pipeline. The SDK is used
as a product app would use it, with ``base_url=<server>/v1``; Armature's own fields go through
``extra_body``.
"""

import base64
import io
import os
import socket

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from armature.platform.registry import register_adapter
from armature.platform.tracking import RunLogger, resolve_tracking, start_run
from armature.policies import build_policy
from armature.serve.generation import ImageJob, PassShape, generate

KEY = "sdk-key-123"
STEPS = 2
PASS = 4
SAMPLING = {"num_steps": STEPS, "guidance_scale": 1.0, "eta": 1.0}
EDIT_SIZE = 64  # the tiny SkeleGuide model's size
# ARMATURE_TEST_DIRECT_INGRESS=1: the application serves on its replica's own port (http.direct_ingress)
DIRECT = os.environ.get("ARMATURE_TEST_DIRECT_INGRESS") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora(folder):
    policy = build_policy({"family": "tiny", "lora": {"enabled": True, "rank": 2}}, SAMPLING)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return policy.save_adapter(folder)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from mlflow.tracking import MlflowClient
    from ray import serve

    from armature.platform.config import compose
    from armature.policies.skeleguide import SkeleGuidePipeline
    from armature.serve.app import build_application, controller_options, direct_ingress_ports

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas: float sums depend on the thread count
    tmp = tmp_path_factory.mktemp("openai")
    tracking = {"local_dir": str(tmp / "track"), "experiment": "openai-test"}
    uri, _ = resolve_tracking(tracking)
    adapter = _lora(tmp / "lora")
    run_id = start_run(tracking, "train-adapter", {})
    RunLogger(uri, run_id).log_artifacts(adapter, "adapter")
    register_adapter(uri, run_id, "armature-adapter")
    MlflowClient(uri).set_registered_model_alias("armature-adapter", "production", "1")
    SkeleGuidePipeline.build({"num_steps": 2}).save_pretrained(tmp / "skeleguide")

    cfg = compose(
        "serve",
        [
            f"tracking.local_dir={tmp / 'track'}",
            "tracking.experiment=openai-test",
            f"adapters.cache_dir={tmp / 'cache'}",
            "api_key_env=ARMATURE_SDK_TEST_KEY",
            f"sampling.num_steps={STEPS}",
            "generator.torch_threads=1",
            "generator.num_cpus=0.5",
            "batching.max_batch_size=4",
            f"batching.pass_size={PASS}",
            f"edits.pipeline={tmp / 'skeleguide'}",
            "edits.num_steps=2",
            "edits.editor.torch_threads=1",
            "limits.max_steps=8",
            "limits.max_images=4",
            "limits.request_timeout_s=60",
            f"http.direct_ingress={DIRECT}",
            "http.direct_ingress_drain_s=0",
        ],
    )
    os.environ["ARMATURE_SDK_TEST_KEY"] = KEY
    try:
        app = build_application(cfg)
    finally:
        del os.environ["ARMATURE_SDK_TEST_KEY"]
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options(cfg))
    serve.run(app, name="openai", route_prefix="/")
    port = direct_ingress_ports()["openai"] if DIRECT else port
    base = f"http://127.0.0.1:{port}/v1"
    with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120) as client:
        yield {"client": client, "base": base, "adapter": adapter}
    serve.delete("openai")
    serve.shutdown()
    torch.set_num_threads(threads)


def _pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image.b64_json))).convert("RGB"))


def _local(folder, jobs, height=32, width=32) -> np.ndarray:
    """The same images from the tiny policy in this process, without Serve."""
    policy = build_policy({"family": "tiny", "lora": {"enabled": False}}, SAMPLING)
    policy.unet.requires_grad_(False)
    if folder is not None:
        policy.load_adapter(folder)
    shape = PassShape(steps=STEPS, height=height, width=width, guidance_scale=1.0, eta=1.0)
    return generate(policy, jobs, shape, pass_size=PASS)


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_n_images_as_the_sdk_asks(server):
    client = server["client"]
    answer = client.images.generate(
        prompt="a red cube", n=2, size="64x64", response_format="b64_json", extra_body={"seed": 11}
    )
    assert [d.seed for d in answer.data] == [11, 12]  # Armature's own fields ride along
    assert answer.size == "64x64" and answer.output_format == "png"
    expected = _local(None, [ImageJob("a red cube", "", 11), ImageJob("a red cube", "", 12)], 64, 64)
    assert np.array_equal(np.stack([_pixels(d) for d in answer.data]), expected)

    # Best-of-N through extra_body: the n best of 4 candidates by the reward, their scores attached.
    every = client.images.generate(prompt="a yellow star", n=4, extra_body={"seed": 40, "reward": "compressibility"})
    best = client.images.generate(
        prompt="a yellow star",
        n=2,
        user="app-user-7",
        quality="standard",
        style="vivid",
        extra_body={"seed": 40, "reward": "compressibility", "best_of": 4},
    )
    ranked = sorted(every.data, key=lambda d: -d.score)[:2]
    assert [(d.seed, d.b64_json) for d in best.data] == [(d.seed, d.b64_json) for d in ranked]


# the OpenAI API's documented sizes, drawn at the tiny model's scale (short side 32) beyond its 64 px limit
SIZES = {
    "auto": "32x32",
    "256x256": "32x32",
    "512x512": "32x32",
    "1024x1024": "32x32",
    "1536x1024": "48x32",
    "1024x1536": "32x48",
    "1792x1024": "56x32",
    "1024x1792": "32x56",
    "48x16": "48x16",
}


def test_every_documented_size(server):
    client = server["client"]
    for size, drawn in SIZES.items():
        answer = client.images.generate(prompt="a blue ball", size=size, extra_body={"seed": 3, "steps": 1})
        width, height = (int(v) for v in drawn.split("x"))
        assert answer.size == drawn and _pixels(answer.data[0]).shape == (height, width, 3), size
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a blue ball", size="100x100")
    assert err.value.param == "size" and "1024x1024" in err.value.message and "auto" in err.value.message


def test_model_names_an_adapter_or_the_base(server):
    client = server["client"]
    listed = {m.id for m in client.models.list()}
    assert {"tiny", "armature-adapter", "armature-adapter/1", "armature-adapter@production"} <= listed
    assert client.models.retrieve("armature-adapter@production").id == "armature-adapter@production"

    jobs = [ImageJob("a green sphere", "", 5)]
    adapted = client.images.generate(
        prompt="a green sphere", model="armature-adapter@production", extra_body={"seed": 5}
    )
    assert adapted.model == "armature-adapter@production"
    assert adapted.model_extra["adapter_version"] == "armature-adapter/1"
    assert np.array_equal(_pixels(adapted.data[0]), _local(server["adapter"], jobs)[0])
    for base in ("tiny", None):
        kwargs = {"model": base} if base else {}
        plain = client.images.generate(prompt="a green sphere", extra_body={"seed": 5}, **kwargs)
        assert np.array_equal(_pixels(plain.data[0]), _local(None, jobs)[0])


def test_unknown_model_bad_key_and_limits_raise_the_sdk_errors(server):
    client = server["client"]
    for model in ("dall-e-3", "armature-adapter@staging", "armature-adapter/9", "../etc/passwd"):
        with pytest.raises(openai.NotFoundError) as err:
            client.images.generate(prompt="x", model=model)
        assert err.value.param == "model" and err.value.code == "model_not_found" and model in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")

    with openai.OpenAI(base_url=server["base"], api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.images.generate(prompt="x")
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()

    refused = [
        ({"n": 5}, "n"),
        ({"prompt": "x" * 501}, "prompt"),
        ({"response_format": "url"}, "response_format"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"background": "transparent"}, "background"),
        ({"extra_body": {"steps": 9}}, "steps"),
        ({"extra_body": {"colour": "red"}}, "colour"),
        ({"model": "armature-adapter", "extra_body": {"adapter": "armature-adapter"}}, "model"),
    ]
    for change, field in refused:
        with pytest.raises(openai.BadRequestError) as err:
            client.images.generate(**{"prompt": "x", **change})
        assert err.value.param == field and field in err.value.message, (change, err.value.body)
        assert err.value.type == "invalid_request_error"


def test_edit_repaints_the_transparent_region_only(server):
    from armature.skeleton.scenes import triples

    client = server["client"]
    triple = triples(1, seed=5)[0]
    region = triple.person_mask
    mask = np.full((EDIT_SIZE, EDIT_SIZE, 4), 255, np.uint8)
    mask[region, 3] = 0  # the API's mask: transparent where to edit
    answer = client.images.edit(
        image=("scene.png", _png(triple.scene), "image/png"),
        prompt=triple.prompt,
        mask=("mask.png", _png(mask), "image/png"),
        size="64x64",
        extra_body={"seed": 1},
    )
    image = _pixels(answer.data[0])
    assert image.shape == triple.scene.shape and answer.data[0].seed == 1
    assert np.array_equal(image[~region], triple.scene[~region])
    assert not np.array_equal(image[region], triple.scene[region])
    assert answer.model_extra["pose"]["width"] == EDIT_SIZE  # the pose it rendered, as in the JSON edits

    # Without a mask, the image's own transparent pixels are the region.
    rgba = np.concatenate([triple.scene, np.where(region, 0, 255).astype(np.uint8)[..., None]], axis=-1)
    alone = client.images.edit(
        image=("scene.png", _png(rgba), "image/png"), prompt=triple.prompt, extra_body={"seed": 1}
    )
    assert np.array_equal(_pixels(alone.data[0])[~region], triple.scene[~region])

    for change, field in [
        ({"n": 2}, "n"),
        ({"size": "32x32"}, "size"),
        ({"model": "armature-adapter"}, "model"),
        ({"mask": ("mask.png", _png(np.full((EDIT_SIZE, EDIT_SIZE, 4), 255, np.uint8)), "image/png")}, "mask"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.images.edit(
                **{"image": ("scene.png", _png(triple.scene), "image/png"), "prompt": triple.prompt, **change}
            )
        assert err.value.param == field, (change, err.value.body)
