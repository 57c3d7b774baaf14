"""DiffusionPolicy on the tiny built-in model: rollouts, re-scoring, LoRA weights and adapters."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from armature.policies import LoraParams, SamplingParams, Trajectory, load_policy

PROMPTS = ["a red hand", "two cats", "x"]
STEPS = 4


def build():
    return load_policy("tiny", sampling=SamplingParams(num_steps=STEPS, guidance_scale=3.0))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def perturb_lora(policy, seed):
    """LoRA B factors start at zero (a no-op adapter): give every LoRA factor random values."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def assert_same_rollout(a: Trajectory, b: Trajectory):
    assert torch.equal(a.latents, b.latents)
    assert torch.equal(a.log_probs, b.log_probs)
    assert np.array_equal(a.images, b.images)


def rescore(policy, traj):
    """log p of every stored transition, one step_log_prob call per step: [B, T]."""
    with torch.no_grad():
        return torch.stack(
            [
                policy.step_log_prob(traj.cond, traj.latents[:, j], traj.timesteps[:, j], traj.latents[:, j + 1])
                for j in range(traj.timesteps.shape[1])
            ],
            dim=1,
        )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny UNet is latency-bound: intra-op threads only add overhead (and stall badly on a
    busy 2-core machine), so run this module single-threaded and restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def policy():
    """The tiny policy without an adapter. Tests must not change its weights."""
    return build()


@pytest.fixture(scope="module")
def traj(policy):
    return policy.rollout(PROMPTS, generator=gen(0))


@pytest.fixture(scope="module")
def lora_policy():
    """A tiny policy with a LoRA adapter whose factors are all nonzero. Tests must not change it."""
    p = build()
    p.add_lora(LoraParams(rank=4, alpha=4.0), seed=0)
    perturb_lora(p, seed=123)
    return p


@pytest.fixture(scope="module")
def lora_traj(lora_policy):
    return lora_policy.rollout(PROMPTS, generator=gen(0))


# ---------------------------------------------------------------------------- rollout


def test_rollout_shapes(policy, traj):
    B, T = len(PROMPTS), STEPS
    assert len(traj) == B and traj.prompts == PROMPTS
    assert traj.latents.shape == (B, T + 1, 4, 16, 16)
    assert traj.log_probs.shape == (B, T)
    assert traj.timesteps.shape == (B, T)
    for row in traj.timesteps:
        assert torch.equal(row, policy.scheduler.timesteps.cpu())
    assert traj.timesteps[0, 0] > traj.timesteps[0, -1]  # x_T first
    assert traj.images.shape == (B, 32, 32, 3) and traj.images.dtype == np.uint8
    assert set(traj.cond) == {"encoder_hidden_states"}
    for v in traj.cond.values():
        assert v.shape[:2] == (B, 2)
    # unconditional branch is the same (empty negative prompt) for all prompts, conditional is not
    ehs = traj.cond["encoder_hidden_states"]
    assert torch.equal(ehs[0, 0], ehs[1, 0]) and not torch.equal(ehs[0, 1], ehs[1, 1])
    assert torch.isfinite(traj.log_probs).all() and torch.isfinite(traj.latents).all()
    # every step moved the latents
    for j in range(T):
        assert not torch.equal(traj.latents[:, j], traj.latents[:, j + 1])


def test_step_log_prob_reproduces_rollout(policy, traj):
    torch.testing.assert_close(rescore(policy, traj), traj.log_probs, atol=1e-5, rtol=0)


def test_step_log_prob_mixed_timesteps_in_one_batch(policy, traj):
    # a learner may shuffle steps: score all (sample, step) pairs as one batch of B*T transitions
    B, T = traj.timesteps.shape
    b_idx = torch.arange(B).repeat_interleave(T)
    j_idx = torch.arange(T).repeat(B)
    cond = {k: v[b_idx] for k, v in traj.cond.items()}
    with torch.no_grad():
        lp = policy.step_log_prob(
            cond, traj.latents[b_idx, j_idx], traj.timesteps[b_idx, j_idx], traj.latents[b_idx, j_idx + 1]
        )
    torch.testing.assert_close(lp, traj.log_probs[b_idx, j_idx], atol=1e-5, rtol=0)


def test_step_log_prob_on_sub_batch(policy, traj):
    sub = traj.select([2, 0])
    assert sub.prompts == [PROMPTS[2], PROMPTS[0]]
    assert torch.equal(sub.latents, traj.latents[[2, 0]])
    assert torch.equal(sub.log_probs, traj.log_probs[[2, 0]])
    torch.testing.assert_close(rescore(policy, sub), traj.log_probs[[2, 0]], atol=1e-5, rtol=0)
    single = traj.select(slice(1, 2))
    torch.testing.assert_close(rescore(policy, single), traj.log_probs[1:2], atol=1e-5, rtol=0)


def test_step_log_prob_detects_other_transitions(policy, traj):
    # scoring x_{t-1} of another sample is much less likely than the real transition
    swapped = traj.latents[[1, 2, 0]]
    with torch.no_grad():
        lp = policy.step_log_prob(traj.cond, traj.latents[:, 1], traj.timesteps[:, 1], swapped[:, 2])
    assert (lp < traj.log_probs[:, 1] - 1.0).all()


def test_same_seed_same_rollout_other_seed_differs(policy, traj):
    assert_same_rollout(policy.rollout(PROMPTS, generator=gen(0)), traj)
    other = policy.rollout(PROMPTS, generator=gen(1))
    assert not torch.allclose(other.latents[:, 0], traj.latents[:, 0])
    assert not torch.allclose(other.latents[:, -1], traj.latents[:, -1])
    assert not torch.allclose(other.log_probs, traj.log_probs)


# ---------------------------------------------------------------------------- LoRA


def test_lora_changes_the_policy_and_log_probs_reproduce(lora_policy, lora_traj, traj):
    assert lora_policy.lora is not None
    names = [n for n, p in lora_policy.unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert set(lora_policy.trainable_state_dict()) == set(names)
    # same seed, same initial noise, but the adapter changes every later latent
    assert torch.equal(lora_traj.latents[:, 0], traj.latents[:, 0])
    assert not torch.allclose(lora_traj.latents[:, -1], traj.latents[:, -1], atol=1e-3)
    torch.testing.assert_close(rescore(lora_policy, lora_traj), lora_traj.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(rescore(lora_policy, lora_traj.select([1])), lora_traj.log_probs[[1]], atol=1e-5, rtol=0)


def test_fresh_lora_is_a_noop_and_add_lora_twice_raises():
    # peft's "gaussian" init draws A ~ N(0, 1/r) and B = 0: the adapter starts as the identity
    p = build()
    before = p.rollout(PROMPTS[:1], generator=gen(5))
    p.add_lora(LoraParams(), seed=0)
    b_factors = [v for n, v in p.trainable_state_dict().items() if "lora_B" in n]
    a_factors = [v for n, v in p.trainable_state_dict().items() if "lora_A" in n]
    assert b_factors and all(torch.count_nonzero(v) == 0 for v in b_factors)
    assert a_factors and all(torch.count_nonzero(v) > 0 for v in a_factors)
    torch.testing.assert_close(p.rollout(PROMPTS[:1], generator=gen(5)).latents, before.latents)
    with pytest.raises(RuntimeError):
        p.add_lora(LoraParams())


def test_log_prob_gradient_reaches_lora_not_base(lora_policy, lora_traj):
    lora_policy.unet.zero_grad(set_to_none=True)
    j = 1
    lp = lora_policy.step_log_prob(
        lora_traj.cond, lora_traj.latents[:, j], lora_traj.timesteps[:, j], lora_traj.latents[:, j + 1]
    )
    assert lp.requires_grad
    lp.sum().backward()
    trainable = {n: p for n, p in lora_policy.unet.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in lora_policy.unet.named_parameters() if not p.requires_grad}
    try:
        assert trainable and frozen
        for name, p in trainable.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        for name, p in frozen.items():
            assert p.grad is None, name
        for module in (lora_policy.pipe.text_encoder, lora_policy.pipe.vae):
            assert all(p.grad is None and not p.requires_grad for p in module.parameters())
        assert lora_policy.trainable_parameters() == list(trainable.values())
    finally:
        lora_policy.unet.zero_grad(set_to_none=True)


def test_trainable_state_dict_transfers_weights(lora_policy, lora_traj):
    target = build()
    target.add_lora(LoraParams(rank=4, alpha=4.0), seed=7)
    perturb_lora(target, seed=999)
    before = target.rollout(PROMPTS, generator=gen(0))
    assert not torch.allclose(before.latents[:, -1], lora_traj.latents[:, -1], atol=1e-3)

    state = lora_policy.trainable_state_dict()
    assert all(not v.requires_grad for v in state.values())
    target.load_trainable_state_dict(state, version=3)
    assert target.weights_version == 3
    after = target.rollout(PROMPTS, generator=gen(0))
    assert after.weights_version == 3
    assert_same_rollout(after, lora_traj)

    # the state dict is a copy: changing it does not change the source policy
    key = next(iter(state))
    state[key].add_(1.0)
    assert not torch.equal(lora_policy.trainable_state_dict()[key], state[key])

    # missing or unknown keys raise, and leave the weights as they were
    good = lora_policy.trainable_state_dict()
    shifted = {k: v + 1.0 for k, v in good.items()}
    missing = dict(shifted)
    missing.pop(key)
    with pytest.raises(KeyError, match="missing"):
        target.load_trainable_state_dict(missing, version=4)
    with pytest.raises(KeyError, match="unknown"):
        target.load_trainable_state_dict({**shifted, "not.a.parameter": torch.zeros(1)}, version=4)
    assert target.weights_version == 3
    current = target.trainable_state_dict()
    assert all(torch.equal(current[k], v) for k, v in good.items())


def test_save_and_load_adapter(lora_policy, lora_traj, policy, tmp_path):
    out = lora_policy.save_adapter(tmp_path / "adapter", metadata={"step": 5})
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "adapter_config.json").is_file()

    fresh = build()  # no adapter yet: load_adapter adds one
    fresh.load_adapter(out)
    assert fresh.lora == lora_policy.lora
    torch.testing.assert_close(rescore(fresh, lora_traj), lora_traj.log_probs, atol=1e-5, rtol=0)
    for name, value in lora_policy.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[name], value), name

    # a folder without the files
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        policy.load_adapter(empty)
    (empty / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        policy.load_adapter(empty)
    assert policy.lora is None  # nothing was attached by the failed loads

    with pytest.raises(RuntimeError):
        policy.save_adapter(tmp_path / "none")  # no adapter to save


# ---------------------------------------------------------------------------- load_policy


def test_load_policy_errors():
    with pytest.raises(ValueError, match="model.pretrained"):
        load_policy("sd")
    with pytest.raises(ValueError, match="model.pretrained"):
        load_policy("sdxl", pretrained=None)
    with pytest.raises(ValueError, match="nope"):
        load_policy("nope", pretrained="/does/not/matter")
    with pytest.raises(ValueError):
        load_policy("nope")
    with pytest.raises(ValueError, match="family=tiny"):
        load_policy("tiny", pretrained="some/model")


# ---------------------------------------------------------------------------- full fine-tuning


def test_full_finetune_save_and_load(tmp_path):
    tuned = build()
    tuned.enable_full_finetuning()
    assert len(tuned.trainable_parameters()) == len(list(tuned.unet.parameters()))
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tuned.save_trainable(tmp_path / "full")
    assert (out / "unet.safetensors").is_file() and (out / "adapter_config.json").is_file()

    fresh = build()
    before = fresh.rollout(["a cat"], gen(3))
    fresh.load_adapter(out)
    after = fresh.rollout(["a cat"], gen(3))
    assert_same_rollout(after, tuned.rollout(["a cat"], gen(3)))
    assert not torch.equal(before.latents, after.latents)


def test_an_overlong_prompt_warns_once_not_at_every_batch(policy, caplog):
    """diffusers notes a truncated prompt at every encode (every sampling batch); the policy drops
    that notice and warns once per prompt, naming it."""
    import logging

    notices = []
    catcher = logging.Handler()
    catcher.emit = notices.append
    pipeline_log = logging.getLogger(type(policy.pipe).encode_prompt.__module__)
    pipeline_log.addHandler(catcher)
    long = "a person with both arms stretched out wide"  # over the tiny tokenizer's 32 tokens
    try:
        with caplog.at_level(logging.WARNING, logger="armature.policies.diffusion"):
            for _ in range(3):
                policy.encode([long, "a cat"])
        ours = [r.getMessage() for r in caplog.records if r.name == "armature.policies.diffusion"]
        assert len(ours) == 1 and repr(long) in ours[0] and "pipe.tokenizer: " in ours[0] and "reads 32" in ours[0]
        assert not [r for r in notices if "truncated" in str(r.msg)]
        # only the policy's own encoding is quiet: the pipeline called directly still gives its notice
        policy.pipe.encode_prompt([long], policy.device, 1, False)
        assert [r for r in notices if "truncated" in str(r.msg)]
    finally:
        pipeline_log.removeHandler(catcher)
