"""Reward-gradient sampling (AlignProp / DRaFT-K / ReFL): where the gradient goes, truncation and
ReFL's x0 prediction against diffusers' own DDIM step, checkpointing changes nothing numerically,
and the config checks."""

import pytest
import torch

from armature.policies import build_policy
from armature.policies.grad_sampling import sample_with_grad
from armature.rewards import load

torch.set_num_threads(1)

MODEL = {
    "family": "tiny",
    "tiny": {"seed": 0, "image_size": 16},
    "lora": {
        "enabled": True,
        "rank": 2,
        "alpha": 2.0,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
    },
}
PROMPTS = ["a cat", "a dog"]


def _policy(eta=0.0, steps=5):
    torch.manual_seed(0)
    policy = build_policy(MODEL, {"num_steps": steps, "guidance_scale": 2.0, "eta": eta})
    with torch.no_grad():  # LoRA's B factors start at 0: move them so every factor gets a gradient
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return policy


def _noise(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((len(PROMPTS),) + policy.latent_shape, generator=g)


def _lora_grads(policy):
    return {n: p.grad.clone() for n, p in policy.unet.named_parameters() if p.grad is not None}


def _reference_grads(policy, k, predict_x0=False):
    """The same objective written as a plain loop over diffusers' DDIMScheduler.step (eta = 0)."""
    policy.unet.zero_grad(set_to_none=True)
    scheduler = policy.scheduler
    scheduler.set_timesteps(policy.sampling.num_steps)
    cond = policy.encode(PROMPTS)
    x = _noise(policy)
    steps = list(scheduler.timesteps)
    for i, t in enumerate(steps):
        grad = i >= len(steps) - k
        with torch.set_grad_enabled(grad):
            eps = policy.predict(cond, x, t)
            out = scheduler.step(eps, t, x, eta=0.0)
            if predict_x0 and grad:
                x = out.pred_original_sample
                break
            x = out.prev_sample
    vae = policy.pipe.vae
    images = ((vae.decode(x / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    (-luma.mean()).backward()
    return _lora_grads(policy), x.detach()


def _grads(policy, k, **kwargs):
    policy.unet.zero_grad(set_to_none=True)
    sample = sample_with_grad(policy, policy.encode(PROMPTS), _noise(policy), k, **kwargs)
    (-load("brightness").score_tensor(sample.images, PROMPTS).mean()).backward()
    return _lora_grads(policy), sample


def test_gradient_reaches_only_the_lora_weights():
    policy = _policy(eta=1.0)
    reward = load(
        "aesthetic",
        path=__import__("armature.rewards", fromlist=["x"]).build_tiny_aesthetic(__import__("tempfile").mkdtemp()),
    )
    sample = sample_with_grad(
        policy, policy.encode(PROMPTS), _noise(policy), 3, generator=torch.Generator().manual_seed(1)
    )
    (-reward.score_tensor(sample.images, PROMPTS).mean()).backward()
    modules = {
        "unet": policy.unet,
        "vae": policy.pipe.vae,
        "text_encoder": policy.pipe.text_encoder,
        "reward_clip": reward.clip,
        "reward_head": reward.head,
    }
    with_grad = {f"{m}.{n}" for m, mod in modules.items() for n, p in mod.named_parameters() if p.grad is not None}
    lora = {f"unet.{n}" for n, _ in policy.unet.named_parameters() if "lora_" in n}
    assert lora and with_grad == lora
    assert all(policy.unet.get_parameter(n[5:]).grad.abs().sum() > 0 for n in lora)


@pytest.mark.parametrize("k", [2, 5])
def test_truncated_gradient_matches_a_plain_loop_over_diffusers_ddim(k):
    policy = _policy(eta=0.0)
    expected, x0 = _reference_grads(policy, k)
    got, sample = _grads(policy, k, checkpoint=False)
    torch.testing.assert_close(sample.latents.detach(), x0, rtol=1e-4, atol=1e-5)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-7)


def test_checkpointing_gives_the_same_gradient():
    policy = _policy(eta=1.0)
    plain, _ = _grads(policy, 4, checkpoint=False, generator=torch.Generator().manual_seed(3))
    ckpt, _ = _grads(policy, 4, checkpoint=True, generator=torch.Generator().manual_seed(3))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-8)


def test_truncation_changes_the_gradient():
    policy = _policy(eta=0.0)
    one, _ = _grads(policy, 1, checkpoint=False)
    all_, _ = _grads(policy, 5, checkpoint=False)
    diff = sum((one[n] - all_[n]).norm() for n in one) / sum(all_[n].norm() for n in all_)
    assert diff > 1e-3


@pytest.mark.parametrize("k", [2])
def test_refl_scores_the_predicted_x0_of_a_late_step(k):
    policy = _policy(eta=0.0)
    expected, x0_hat = _reference_grads(policy, k, predict_x0=True)
    got, sample = _grads(policy, k, checkpoint=True, predict_x0=True)
    assert sample.backprop_steps == 1
    torch.testing.assert_close(sample.latents.detach(), x0_hat, rtol=1e-4, atol=1e-5)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-7)


def test_refl_complete_finishes_the_chain_like_plain_sampling():
    policy = _policy(eta=0.0)
    with torch.no_grad():
        full = sample_with_grad(policy, policy.encode(PROMPTS), _noise(policy), 5)
        refl = sample_with_grad(policy, policy.encode(PROMPTS), _noise(policy), 2, predict_x0=True, complete=True)
    torch.testing.assert_close(refl.final_latents, full.latents, rtol=1e-4, atol=1e-5)


def test_backprop_steps_out_of_range():
    policy = _policy()
    with pytest.raises(ValueError, match=r"backprop_steps=6: must be in \[1, 5\]"):
        sample_with_grad(policy, policy.encode(PROMPTS), _noise(policy), 6)


@pytest.mark.parametrize("refl", [False, True])
def test_kl_to_the_base_policy_matches_a_plain_loop(refl):
    """``kl``: the mean over the backpropagated steps of the squared gap between the adapter's and
    the base network's predictions at the same latents, and its gradient, against a plain loop over
    diffusers' DDIM with peft's adapter switch."""
    policy, k = _policy(eta=0.0), 3

    def reference(cond, x, t):
        with policy.reference():
            return policy.predict(cond, x, t)

    policy.unet.zero_grad(set_to_none=True)
    sample = sample_with_grad(policy, policy.encode(PROMPTS), _noise(policy), k, predict_x0=refl, reference=reference)
    sample.kl.backward()
    got = _lora_grads(policy)

    policy.unet.zero_grad(set_to_none=True)
    scheduler = policy.scheduler
    scheduler.set_timesteps(policy.sampling.num_steps)
    cond, x, gaps = policy.encode(PROMPTS), _noise(policy), []
    steps = list(scheduler.timesteps)
    for i, t in enumerate(steps):
        grad = i >= len(steps) - k
        with torch.set_grad_enabled(grad):
            eps = policy.predict(cond, x, t)
            if grad:
                with torch.no_grad():
                    policy.unet.disable_adapters()
                    base = policy.predict(cond, x, t)
                    policy.unet.enable_adapters()
                gaps.append(((eps - base) ** 2).mean())
                if refl:
                    break
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    expected = torch.stack(gaps).mean()
    expected.backward()
    assert expected > 0  # the adapter's moved B factors make the two networks differ
    torch.testing.assert_close(sample.kl.detach(), expected.detach(), rtol=1e-4, atol=1e-9)
    for name, grad in _lora_grads(policy).items():
        torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-7)


def test_no_reference_no_kl():
    policy = _policy()
    with torch.no_grad():
        assert sample_with_grad(policy, policy.encode(PROMPTS), _noise(policy), 2).kl is None
