"""DiffusionPolicy on the tiny flow models (SD3 and FLUX transformers): same interface as the
DDIM policy: rollouts, re-scoring, windows, per-sample seeds, LoRA adapters, the reference."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from armature.policies import SamplingParams, build_policy

PROMPTS = ["a red hand", "two cats", "x"]
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(arch, lora=False, guidance=3.0):
    model = {"family": "tiny_flow", "tiny_flow": {"arch": arch}, "lora": {"enabled": lora, "rank": 2}}
    return build_policy(model, {"num_steps": STEPS, "guidance_scale": guidance})


def rescore(policy, traj, num_steps=STEPS):
    with torch.no_grad():
        return torch.stack(
            [
                policy.step_log_prob(
                    traj.cond, traj.latents[:, j], traj.timesteps[:, j], traj.latents[:, j + 1], num_steps=num_steps
                )
                for j in range(traj.timesteps.shape[1])
            ],
            dim=1,
        )


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_rollout_is_seeded_and_rescores_to_its_log_probs(arch):
    policy = build(arch)
    a = policy.rollout(PROMPTS, torch.Generator().manual_seed(0))
    b = policy.rollout(PROMPTS, torch.Generator().manual_seed(0))
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.images, b.images)
    assert a.latents.shape[:2] == (3, STEPS + 1) and a.images.shape == (3, 32, 32, 3)
    assert a.timesteps[0, 0] == 1000.0 and torch.all(a.timesteps[:, 1:] < a.timesteps[:, :-1])
    torch.testing.assert_close(rescore(policy, a), a.log_probs, rtol=1e-5, atol=1e-5)
    # another transition is less likely than the sampled ones, on average
    shuffled = rescore(policy, type(a)(**{**a.__dict__, "latents": a.latents[[1, 2, 0]]}))
    assert shuffled.mean() < a.log_probs.mean()


def test_ode_rollout_equals_the_diffusers_pipeline():
    """With no SDE step (an empty window) the rollout is the pipeline's own Euler sampler."""
    policy = build("sd3")
    traj = policy.rollout(PROMPTS, torch.Generator().manual_seed(3), sde_window=(0, 0))
    assert torch.equal(traj.log_probs, torch.zeros(3, STEPS))
    out = policy.pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        max_sequence_length=policy.max_sequence_length,
    )
    torch.testing.assert_close(traj.latents[:, -1], out.images, rtol=1e-5, atol=1e-5)


def test_denoising_reduction_and_window():
    policy = build("flux")
    traj = policy.rollout(PROMPTS[:2], torch.Generator().manual_seed(0), num_steps=6, sde_window=(2, 4))
    assert traj.latents.shape[1] == 7
    assert torch.all(traj.log_probs[:, [0, 1, 4, 5]] == 0) and torch.all(traj.log_probs[:, 2:4] != 0)
    window = [2, 3]
    with torch.no_grad():
        lp = torch.stack(
            [
                policy.step_log_prob(
                    traj.cond, traj.latents[:, j], traj.timesteps[:, j], traj.latents[:, j + 1], num_steps=6
                )
                for j in window
            ],
            1,
        )
    torch.testing.assert_close(lp, traj.log_probs[:, window], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_per_sample_generators_make_samples_independent_of_the_batch(arch):
    policy = build(arch)
    both = policy.rollout(PROMPTS[:2], [torch.Generator().manual_seed(s) for s in (11, 12)])
    alone = policy.rollout(PROMPTS[1:2], [torch.Generator().manual_seed(12)])
    torch.testing.assert_close(both.latents[1:], alone.latents, rtol=1e-5, atol=1e-5)


def test_lora_adapter_round_trip_and_reference(tmp_path):
    policy = build("sd3", lora=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    traj = policy.rollout(PROMPTS, torch.Generator().manual_seed(1))
    policy.save_trainable(tmp_path / "adapter")
    fresh = build("sd3", lora=False)
    fresh.unet.requires_grad_(False)
    fresh.load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(rescore(fresh, traj), traj.log_probs, rtol=1e-5, atol=1e-5)
    # the reference (adapter off) is the base model
    base = build("sd3", lora=False)
    with policy.reference():
        ref = rescore(policy, traj)
    torch.testing.assert_close(ref, rescore(base, traj), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, traj.log_probs)
    # gradients reach the adapter through step_log_prob
    lp = policy.step_log_prob(traj.cond, traj.latents[:, 1], traj.timesteps[:, 1], traj.latents[:, 2])
    lp.sum().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())


def test_bad_family_and_arch_are_named():
    with pytest.raises(ValueError, match="model.tiny_flow.arch"):
        build_policy({"family": "tiny_flow", "tiny_flow": {"arch": "dit"}}, {})
    with pytest.raises(ValueError, match="model.family"):
        build_policy({"family": "sd4", "pretrained": "x"}, {})


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_a_saved_pipeline_loads_from_a_local_path(arch, tmp_path):
    """family sd3 / flux with model.pretrained: a diffusers folder (here the tiny one, saved)."""
    from armature.policies import load_policy

    built = build(arch)
    built.pipe.save_pretrained(tmp_path / arch)
    sampling = SamplingParams(num_steps=STEPS, guidance_scale=3.0, height=32, width=32)
    loaded = load_policy(arch, pretrained=str(tmp_path / arch), sampling=sampling)
    assert loaded.family == arch and loaded.is_flow
    a = built.rollout(PROMPTS[:2], torch.Generator().manual_seed(4))
    b = loaded.rollout(PROMPTS[:2], torch.Generator().manual_seed(4))
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)
