"""ControlNet policies on the tiny SD model: shapes, zero initialisation, the condition image's
effect, LoRA placement, loading from a folder, agreement with diffusers' ControlNet pipeline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from armature.policies import LoraParams, SamplingParams, load_policy
from armature.policies.controlnet import CONTROLNET_TARGETS, ControlNetParams, build_controlnet_policy

PROMPTS = ["a person raising the left arm", "a person kneeling"]
STEPS = 4
SAMPLING = {"num_steps": STEPS, "guidance_scale": 3.0}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def layouts(seed: int, n: int = 2) -> np.ndarray:
    """Stick figures on black: a few coloured lines, like a rendered pose layout."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 32, 32, 3), np.uint8)
    for img in out:
        for _ in range(5):
            y, x = rng.integers(2, 30, 2)
            img[y, max(0, x - 6) : x + 6] = rng.integers(64, 256, 3)
            img[max(0, y - 6) : y + 6, x] = rng.integers(64, 256, 3)
    return out


def gens(seed: int, n: int = 2):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def policy():
    """A fresh tiny ControlNet policy (zero-initialised residuals). Tests must not change it."""
    return build_controlnet_policy({"family": "tiny"}, SAMPLING)


@pytest.fixture(scope="module")
def trained():
    """A ControlNet policy after two gradient steps of the denoising loss on (layout, prompt)
    pairs, LoRA on Q/K/V plus the zero convolutions: its residuals are no longer zero."""
    p = build_controlnet_policy({"family": "tiny", "lora": {"enabled": True, "rank": 4}}, SAMPLING)
    params = p.trainable_parameters()
    opt = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    cond = p.encode(PROMPTS, layouts=layouts(1))
    for _ in range(2):
        x0 = torch.randn((2,) + p.latent_shape, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.tensor([500, 700])
        xt = p.scheduler.add_noise(x0, noise, t)
        out = p.unet(xt, t, **p.denoiser_inputs(cond, guided=False)).sample
        loss = torch.nn.functional.mse_loss(out, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p.unet.requires_grad_(False)
    return p


def test_shapes_and_rescoring(policy):
    traj = policy.rollout(PROMPTS, gens(0), layouts=layouts(1))
    assert traj.images.shape == (2, 32, 32, 3) and traj.images.dtype == np.uint8
    assert traj.cond["controlnet_cond"].shape == (2, 2, 3, 32, 32)
    assert traj.latents.shape == (2, STEPS + 1) + policy.latent_shape
    with torch.no_grad():
        j = 1
        again = policy.step_log_prob(traj.cond, traj.latents[:, j], traj.timesteps[:, j], traj.latents[:, j + 1])
    torch.testing.assert_close(again, traj.log_probs[:, j], rtol=1e-4, atol=1e-3)
    # a layout of another size is resized to the policy's
    big = np.repeat(np.repeat(layouts(1), 2, axis=1), 2, axis=2)
    assert policy.condition_image(big).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="layouts"):
        policy.rollout(PROMPTS, gens(0))


def test_zero_initialised_controlnet_leaves_the_unet_unchanged(policy):
    cond = policy.encode(PROMPTS, layouts=layouts(1))
    latents = torch.randn((2,) + policy.latent_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([901, 301])
    unet_kwargs = policy.denoiser_inputs(cond, guided=False)
    with torch.no_grad():
        down, mid = policy.unet.residuals(
            latents, t, unet_kwargs["encoder_hidden_states"], unet_kwargs["controlnet_cond"]
        )
        assert len(down) > 0
        assert all(torch.count_nonzero(r) == 0 for r in (*down, mid))
        controlled = policy.unet(latents, t, **unet_kwargs).sample
        plain = policy.pipe.unet(latents, t, encoder_hidden_states=unet_kwargs["encoder_hidden_states"]).sample
    assert torch.equal(controlled, plain)
    # whole rollouts too: the same images as the plain tiny policy with the same seeds
    base = load_policy("tiny", sampling=SamplingParams(**SAMPLING))
    assert np.array_equal(
        policy.rollout(PROMPTS, gens(5), layouts=layouts(1)).images, base.rollout(PROMPTS, gens(5)).images
    )


def test_the_condition_image_changes_the_output(trained):
    a = trained.render(PROMPTS, layouts(1), seed=7, deterministic=True)
    b = trained.render(PROMPTS, layouts(2), seed=7, deterministic=True)
    assert np.array_equal(a, trained.render(PROMPTS, layouts(1), seed=7, deterministic=True))
    assert not np.array_equal(a, b)
    cond = trained.encode(PROMPTS, layouts=layouts(1))
    k = trained.denoiser_inputs(cond, guided=False)
    with torch.no_grad():
        down, _ = trained.unet.residuals(
            torch.zeros((2,) + trained.latent_shape),
            torch.tensor([500, 500]),
            k["encoder_hidden_states"],
            k["controlnet_cond"],
        )
    assert all(torch.count_nonzero(r) > 0 for r in down)


@pytest.mark.parametrize("targets,zero_convs", [("qkv", False), ("all", False), ("qkv", True)])
def test_lora_trains_only_the_configured_controlnet_modules(targets, zero_convs):
    p = build_controlnet_policy({"family": "tiny"}, SAMPLING)
    p.add_lora(LoraParams(rank=2, alpha=2.0), targets=targets, train_zero_convs=zero_convs)
    names = [n for n, q in p.unet.named_parameters() if q.requires_grad]
    assert names and all(n.startswith("controlnet.") for n in names)  # the UNet stays frozen
    lora = [n for n in names if "lora_" in n]
    adapted = {n.split(".lora_")[0].split(".", 1)[1] for n in lora}  # module paths in the ControlNet
    allowed = CONTROLNET_TARGETS[targets]
    assert all(any(m.endswith("." + t) for t in allowed) for m in adapted)
    # every allowed kind of projection got an adapter
    assert {t for t in allowed for m in adapted if m.endswith("." + t)} == set(allowed)
    others = [n for n in names if "lora_" not in n]
    if zero_convs:
        assert others and all(
            n.startswith(
                (
                    "controlnet.controlnet_down_blocks",
                    "controlnet.controlnet_mid_block",
                    "controlnet.controlnet_cond_embedding.conv_out",
                )
            )
            for n in others
        )
    else:
        assert others == []
    if targets == "qkv":  # nothing but Q/K/V of the attention layers
        assert not any(t in m for m in adapted for t in ("to_out", "ff.net", "proj_in", "proj_out"))


def test_adapter_and_controlnet_folders_round_trip(trained, tmp_path):
    trained.save_adapter(tmp_path / "adapter")
    trained.save_controlnet(tmp_path / "controlnet")
    trained.save_controlnet(tmp_path / "merged", merge_lora=True)
    ref = trained.render(PROMPTS, layouts(1), seed=3, deterministic=True)
    # a ControlNet folder (or a hub id) loads through ControlNetParams.pretrained; + the adapter: the same
    base = build_controlnet_policy(
        {"family": "tiny"}, SAMPLING, ControlNetParams(pretrained=str(tmp_path / "controlnet"))
    )
    base.load_adapter(tmp_path / "adapter")
    assert np.array_equal(base.render(PROMPTS, layouts(1), seed=3, deterministic=True), ref)
    merged = build_controlnet_policy(
        {"family": "tiny"}, SAMPLING, ControlNetParams(pretrained=str(tmp_path / "merged"))
    )
    diff = np.abs(merged.render(PROMPTS, layouts(1), seed=3, deterministic=True).astype(int) - ref.astype(int))
    assert diff.max() <= 1


def test_agrees_with_the_diffusers_controlnet_pipeline(trained):
    ours = trained.render(PROMPTS, layouts(1), seed=11, deterministic=True)
    pipe = trained.diffusers_pipeline()
    from PIL import Image

    with torch.no_grad():
        theirs = pipe(
            PROMPTS,
            image=[Image.fromarray(x) for x in layouts(1)],
            num_inference_steps=STEPS,
            guidance_scale=3.0,
            eta=0.0,
            generator=gens(11),
            output_type="np",
            height=32,
            width=32,
        ).images
    diff = np.abs(ours.astype(int) - np.round(theirs * 255).astype(int))
    assert diff.max() <= 1, diff.max()


def tiny_sdxl_pipeline():
    """A tiny random SDXL pipeline (two CLIP text encoders, text-time embeddings), as the SDXL
    family loads it: no download."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from armature.policies.tiny import build_char_tokenizer

    tok = build_char_tokenizer(32)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=8,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
            tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
            tokenizer_2=tok,
            unet=unet,
            scheduler=DDIMScheduler(
                beta_schedule="scaled_linear",
                beta_start=0.00085,
                beta_end=0.012,
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_controlnet_zero_init_and_conditioning():
    from armature.policies.controlnet import ControlNetPolicy, build_controlnet
    from armature.policies.diffusion import DiffusionPolicy

    pipe = tiny_sdxl_pipeline()
    plain = DiffusionPolicy(pipe, "sdxl", SamplingParams(**SAMPLING))
    p = ControlNetPolicy(pipe, "sdxl", build_controlnet(pipe.unet, pipe.vae_scale_factor), SamplingParams(**SAMPLING))
    ours = p.rollout(PROMPTS, gens(4), layouts=layouts(1))
    assert ours.cond["time_ids"].shape == (2, 2, 6) and ours.cond["controlnet_cond"].shape == (2, 2, 3, 32, 32)
    assert np.array_equal(ours.images, plain.rollout(PROMPTS, gens(4)).images)  # zero residuals
    with torch.no_grad():  # as if trained: the residual convolutions are no longer zero
        for name, q in p.controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                q.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    a = p.render(PROMPTS, layouts(1), seed=2, deterministic=True)
    assert not np.array_equal(a, p.render(PROMPTS, layouts(2), seed=2, deterministic=True))
    # the same as diffusers' SDXL ControlNet pipeline (no guidance: its empty negative prompt is zeros)
    p.sampling.guidance_scale = 1.0
    a = p.render(PROMPTS, layouts(1), seed=2, deterministic=True)
    from PIL import Image

    with torch.no_grad():
        theirs = p.diffusers_pipeline()(
            PROMPTS,
            image=[Image.fromarray(x) for x in layouts(1)],
            height=32,
            width=32,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            eta=0.0,
            generator=gens(2),
            output_type="np",
        ).images
    assert np.abs(a.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1
