"""The SkeleGuide pipeline (armature.policies.skeleguide) on its tiny random FLUX-Kontext model:
shapes, the two adapters, eq. 3's condition-only LoRA, background preservation, save/load."""

import numpy as np
import pytest
import torch

from armature.policies.skeleguide import SkeleGuideParams, SkeleGuidePipeline
from armature.skeleton import COCO17, Skeleton, render_layout

SIZE = 64


@pytest.fixture(scope="module")
def pipeline():
    return SkeleGuidePipeline.build()


def _randomise_adapters(pipe, seed=0):
    """LoRA B starts at zero (a no-op); give both adapters different nonzero weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _scenes(n=2, seed=0):
    return np.random.default_rng(seed).integers(40, 200, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _inputs(pipe, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = (SIZE // 8) ** 2
    x = torch.randn(b, n, 16, generator=g)
    cond = pipe.encode_images(_scenes(b, seed))
    text = pipe.encode_prompts(["a person waving"] * b)
    return x, cond, text


def _pose():
    array = np.zeros((1, len(COCO17), 3))
    rng = np.random.default_rng(3)
    array[0, :, 0] = rng.uniform(16, 48, len(COCO17))
    array[0, :, 1] = np.linspace(10, 58, len(COCO17))
    array[0, :, 2] = 1.0
    return Skeleton(SIZE, SIZE, array).quantized()


def test_shapes_and_the_call(pipeline):
    scenes = _scenes()
    layouts = pipeline.plan(scenes, ["a person", "a person sitting"], seed=0, num_steps=2)
    assert layouts.shape == (2, SIZE, SIZE, 3) and layouts.dtype == np.uint8
    images = pipeline.render(scenes, layouts, ["a person", "a person sitting"], seed=0, num_steps=2)
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
    out = pipeline(scenes, ["a person", "a person sitting"], seed=0, num_steps=2)
    assert out.images.shape == out.layouts.shape == (2, SIZE, SIZE, 3)
    assert len(out.poses) == 2 and all(p["format"] == "coco17" for p in out.poses)
    np.testing.assert_array_equal(out.layouts, layouts)  # the same seed plans the same layouts
    # an image does not depend on what it is batched with
    alone = pipeline.plan(scenes[1:], ["a person sitting"], seed=1, num_steps=2)
    both = pipeline.plan(scenes[[0, 1]], ["a person", "a person sitting"], seed=0, num_steps=2)
    np.testing.assert_array_equal(alone[0], both[1])
    with pytest.raises(ValueError, match="multiple of 8"):
        pipeline.plan(_scenes(1)[:, :60, :60], ["a person"], num_steps=1)


def test_a_given_pose_skips_planning_and_comes_back(pipeline):
    scene, pose = _scenes(1), _pose()
    out = pipeline(scene, ["a person"], poses=[pose.to_json()], seed=0, num_steps=2)
    np.testing.assert_array_equal(out.layouts[0], render_layout(pose, scene[0]))
    assert Skeleton.from_json(out.poses[0]).equals(pose)
    out2 = pipeline(scene, ["a person"], poses=[pose], seed=0, num_steps=2)  # a Skeleton works too
    np.testing.assert_array_equal(out.images, out2.images)


def test_adapter_switching_changes_the_velocity():
    pipe = SkeleGuidePipeline.build()
    x, cond, text = _inputs(pipe)
    base = pipe.flow("skeletal", x, 0.3, cond, text, (SIZE, SIZE))
    # freshly initialised adapters (B = 0) are the base model
    torch.testing.assert_close(pipe.flow("appearance", x, 0.3, cond, text, (SIZE, SIZE)), base, rtol=0, atol=0)
    _randomise_adapters(pipe)
    skeletal = pipe.flow("skeletal", x, 0.3, cond, text, (SIZE, SIZE))
    appearance = pipe.flow("appearance", x, 0.3, cond, text, (SIZE, SIZE))
    assert pipe.active_adapter == "appearance"
    assert (skeletal - base).abs().max() > 1e-3 and (appearance - skeletal).abs().max() > 1e-3
    torch.testing.assert_close(pipe.flow("skeletal", x, 0.3, cond, text, (SIZE, SIZE)), skeletal, rtol=0, atol=0)


def _capture_qkv(pipe, x, cond, text, block="transformer_blocks.0"):
    """Outputs of the first block's to_q / to_k / to_v (inputs there do not depend on any adapter)."""
    out, hooks = {}, []
    for name in ("to_q", "to_k", "to_v"):
        module = pipe.transformer.get_submodule(f"{block}.attn.{name}")
        hooks.append(module.register_forward_hook(lambda m, a, o, name=name: out.__setitem__(name, o)))
    pipe.flow("skeletal", x, 0.5, cond, text, (SIZE, SIZE))
    for h in hooks:
        h.remove()
    return out


def test_eq3_lora_changes_only_the_condition_tokens_projections():
    pipe = SkeleGuidePipeline.build()
    _randomise_adapters(pipe, seed=1)
    x, cond, text = _inputs(pipe)
    n = x.shape[1]
    with_lora = _capture_qkv(pipe, x, cond, text)
    pipe.transformer.disable_adapters()
    without = _capture_qkv(pipe, x, cond, text)
    pipe.transformer.enable_adapters()
    for name in ("to_q", "to_k", "to_v"):
        assert with_lora[name].shape[1] == n + cond.shape[1]  # [noisy, condition] tokens
        torch.testing.assert_close(with_lora[name][:, :n], without[name][:, :n], rtol=0, atol=0)
        assert (with_lora[name][:, n:] - without[name][:, n:]).abs().max() > 1e-3


def test_eq3_lora_gets_gradient_only_through_condition_tokens():
    pipe = SkeleGuidePipeline.build()
    pipe.set_trainable(["skeletal"])
    _randomise_adapters(pipe, seed=2)
    to_q = pipe.transformer.get_submodule("single_transformer_blocks.0.attn.to_q")
    z = torch.randn(2, 10, to_q.in_features)
    with pipe.mask.active(4):  # the last 4 tokens are the condition
        q = to_q(z)
    params = [to_q.lora_A["skeletal"].weight, to_q.lora_B["skeletal"].weight]
    grads = torch.autograd.grad(q[:, :6].pow(2).sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    grads = torch.autograd.grad(q[:, 6:].pow(2).sum(), params)
    assert all(g.abs().max() > 0 for g in grads)
    base = to_q.base_layer(z)
    torch.testing.assert_close(q[:, :6], base[:, :6], rtol=0, atol=0)
    a, b = to_q.lora_A["skeletal"].weight.detach(), to_q.lora_B["skeletal"].weight.detach()
    want = base[:, 6:] + z[:, 6:] @ a.T @ b.T * to_q.scaling["skeletal"]  # Q'_c = W z_c + B A z_c (eq. 3)
    torch.testing.assert_close(q[:, 6:], want, rtol=1e-5, atol=1e-5)
    # the base weights never require gradients; only the trained adapter's LoRA does
    assert all(not p.requires_grad for n, p in pipe.transformer.named_parameters() if ".lora_" not in n)
    assert {n.split(".lora_")[1].split(".")[1] for n, p in pipe.transformer.named_parameters() if p.requires_grad} == {
        "skeletal"
    }


def test_all_projections_option_adapts_every_token():
    pipe = SkeleGuidePipeline.build(SkeleGuideParams(lora_targets="all"))
    _randomise_adapters(pipe, seed=1)
    x, cond, text = _inputs(pipe)
    with_lora = _capture_qkv(pipe, x, cond, text)
    pipe.transformer.disable_adapters()
    without = _capture_qkv(pipe, x, cond, text)
    assert (with_lora["to_q"][:, : x.shape[1]] - without["to_q"][:, : x.shape[1]]).abs().max() > 1e-3
    assert pipe.transformer.get_submodule("transformer_blocks.0.attn.add_q_proj").lora_A is not None


def test_background_outside_the_mask_is_the_scene_exactly(pipeline):
    scenes = _scenes(2, seed=4)
    mask = np.zeros((2, SIZE, SIZE), dtype=bool)
    mask[0, 10:40, 20:35] = True
    mask[1, 30:60, 5:50] = True
    layouts = pipeline.plan(scenes, ["a", "b"], seed=0, num_steps=2)
    images = pipeline.render(scenes, layouts, ["a person", "a person"], person_mask=mask, seed=0, num_steps=3)
    np.testing.assert_array_equal(images[~mask], scenes[~mask])
    assert (images[mask] != scenes[mask]).any()
    out = pipeline(scenes, ["a", "b"], person_mask=mask, seed=0, num_steps=2)
    np.testing.assert_array_equal(out.images[~mask], scenes[~mask])


def test_save_and_load_round_trip(tmp_path):
    pipe = SkeleGuidePipeline.build(SkeleGuideParams(lora_rank=4, lora_alpha=4.0))
    _randomise_adapters(pipe, seed=5)
    pipe.save_pretrained(tmp_path / "sg")
    loaded = SkeleGuidePipeline.from_pretrained(tmp_path / "sg")
    assert loaded.params == pipe.params
    x, cond, text = _inputs(pipe)
    for adapter in ("skeletal", "appearance"):
        torch.testing.assert_close(
            loaded.flow(adapter, x, 0.2, cond, text, (SIZE, SIZE)),
            pipe.flow(adapter, x, 0.2, cond, text, (SIZE, SIZE)),
            rtol=0,
            atol=0,
        )
    scenes = _scenes(1)
    np.testing.assert_array_equal(
        loaded(scenes, ["a person"], seed=3, num_steps=2).images, pipe(scenes, ["a person"], seed=3, num_steps=2).images
    )
    with pytest.raises(FileNotFoundError, match="skeleguide.json"):
        SkeleGuidePipeline.from_pretrained(tmp_path)


def test_save_with_base_keeps_a_trained_backbone(tmp_path):
    """A backbone trained after it was built (the SkeleGuide bench's --backbone-steps) is not what
    the params rebuild: only ``base=True`` carries it."""
    pipe = SkeleGuidePipeline.build(SkeleGuideParams(lora_rank=4, lora_alpha=4.0))
    _randomise_adapters(pipe, seed=5)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if ".lora_" not in name:
                p.add_(0.05 * torch.randn_like(p))
    x, cond, text = _inputs(pipe)
    expected = pipe.flow("appearance", x, 0.2, cond, text, (SIZE, SIZE))
    pipe.save_pretrained(tmp_path / "adapters_only")
    pipe.save_pretrained(tmp_path / "with_base", base=True)
    stale = SkeleGuidePipeline.from_pretrained(tmp_path / "adapters_only")
    assert not torch.allclose(stale.flow("appearance", x, 0.2, cond, text, (SIZE, SIZE)), expected)
    loaded = SkeleGuidePipeline.from_pretrained(tmp_path / "with_base")
    torch.testing.assert_close(loaded.flow("appearance", x, 0.2, cond, text, (SIZE, SIZE)), expected, rtol=0, atol=0)


def test_a_trained_vae_folder_replaces_the_random_one(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "policy" / "vae")  # a pipeline folder's layout
    pipe = SkeleGuidePipeline.build(SkeleGuideParams(vae=str(tmp_path / "policy")))
    assert pipe.vae_scale_factor == 2 and pipe.vae.config.scaling_factor == 0.5
    torch.testing.assert_close(
        pipe.vae.state_dict()["encoder.conv_in.weight"], vae.state_dict()["encoder.conv_in.weight"]
    )
    layouts = pipe.plan(_scenes(1), ["a person"], seed=0, num_steps=1)
    assert layouts.shape == (1, SIZE, SIZE, 3)


def test_the_gym_autoencoder_tiny_round_trips_as_the_gym_policy_does(tmp_path):
    """The gym base policy's AutoencoderTiny (it keeps the figures' flat colours) encodes and
    decodes through the pipeline exactly as through the gym's own round trip."""
    import json
    import shutil
    from pathlib import Path

    from armature.gym.base_policy import policy_path
    from armature.jobs.gym_pretrain import load_round_trip

    pipe = SkeleGuidePipeline.build(SkeleGuideParams(vae=str(policy_path())))
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.vae_scale_factor == 2
    images = _scenes(2)
    np.testing.assert_allclose(
        pipe.decode(pipe.encode_images(images), SIZE, SIZE).astype(int),
        load_round_trip(policy_path())(np.stack(images)).astype(int),
        atol=1,
    )
    shutil.copytree(Path(policy_path()) / "vae", tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "block_out_channels"})
    )
    with pytest.raises(ValueError, match="block_out_channels"):
        SkeleGuidePipeline.build(SkeleGuideParams(vae=str(tmp_path)))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="VQModel.*AutoencoderKL or an AutoencoderTiny"):
        SkeleGuidePipeline.build(SkeleGuideParams(vae=str(tmp_path)))


def test_real_weights_load_through_the_same_code_from_a_diffusers_folder(tmp_path):
    """``pretrained`` takes a hub id or a folder (FluxKontextPipeline.from_pretrained); a saved tiny
    pipeline stands in for black-forest-labs/FLUX.1-Kontext-dev (nothing is downloaded)."""
    from armature.policies.skeleguide import TinyKontextConfig, build_tiny_kontext

    build_tiny_kontext(TinyKontextConfig()).save_pretrained(tmp_path / "kontext")
    tiny = SkeleGuidePipeline.build()
    loaded = SkeleGuidePipeline.build(SkeleGuideParams(pretrained=str(tmp_path / "kontext")))
    assert type(loaded.pipe).__name__ == "FluxKontextPipeline"
    x, cond, text = _inputs(tiny)
    torch.testing.assert_close(
        loaded.flow("skeletal", x, 0.4, cond, text, (SIZE, SIZE)),
        tiny.flow("skeletal", x, 0.4, cond, text, (SIZE, SIZE)),
        rtol=1e-5,
        atol=1e-5,
    )
    _randomise_adapters(loaded, seed=7)
    loaded.save_pretrained(tmp_path / "sg")  # the folder records the base's path, not its weights
    again = SkeleGuidePipeline.from_pretrained(tmp_path / "sg")
    torch.testing.assert_close(
        again.flow("appearance", x, 0.4, cond, text, (SIZE, SIZE)),
        loaded.flow("appearance", x, 0.4, cond, text, (SIZE, SIZE)),
        rtol=0,
        atol=0,
    )


def test_bench_backbone_fits_either_lora_targets():
    """The SkeleGuide bench's cached backbone (plain names) loads into a pipeline with LoRA on
    all projections although it was trained under LoRA on Q/K/V only (peft renames the wrapped
    layers' weights to ``.base_layer``), and a backbone of another size is refused by name."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import skeleguide as bench

    def flags(targets, layers=2):
        return argparse.Namespace(
            vae_channels=[16, 32, 64],
            latent_channels=8,
            transformer_layers=layers,
            transformer_heads=4,
            head_dim=8,
            lora_rank=4,
            lora_targets=targets,
            steps=4,
        )

    qkv = bench.build(flags("qkv"))
    with torch.no_grad():
        for p in qkv.transformer.parameters():
            p.normal_()
    backbone = bench.backbone_of(qkv.transformer)
    assert not any(".base_layer" in k for k in backbone)
    older = {k: v for k, v in qkv.transformer.state_dict().items() if ".lora_" not in k}  # an older cache file
    for given in (backbone, older):
        loaded = bench.backbone_of(bench.build(flags("all"), backbone=given).transformer)
        assert loaded.keys() == backbone.keys()
        assert all(torch.equal(loaded[k], backbone[k]) for k in backbone)
    with pytest.raises(KeyError, match="--transformer-"):
        bench.build(flags("all", layers=3), backbone=backbone)
