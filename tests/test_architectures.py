"""The supported families at their published architectures (armature.policies.architectures).

Fast: built on the meta device (no weights allocated), so the real, full-depth modules are checked
in seconds. Slow: the SD 1.5 architecture at full size (64 px images) through one DDPO epoch and
one Diffusion-DPO step, in process.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from armature.policies.architectures import (
    ARCHITECTURES,
    architecture_spec,
    build_component,
    clip_tokenizer,
    default_lora,
    t5_standin_tokenizer,
)

DENOISER = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}

# Attention modules of each published denoiser, counted from its architecture by hand:
# SD 1.5: 16 transformer blocks (2 + 2 + 2 down, 1 mid, 3 + 3 + 3 up), attn1 + attn2 each.
# SDXL: transformer blocks 2 x 2 + 2 x 10 down, 10 mid, 3 x 10 + 3 x 2 up = 70, attn1 + attn2 each.
# SD 3.5 medium: 24 joint blocks (attn, with the text stream's add_*_proj; the last block has no
# text output to_add_out) and a second image attention in the first 13 (MMDiT-X).
# FLUX.1: 19 double-stream blocks (image + text projections) and 38 single-stream blocks, whose
# attention has q, k, v only (the output goes through the block's proj_out).
EXPECTED_MATCHES = {
    "sd15": {"to_q": 32, "to_k": 32, "to_v": 32, "to_out.0": 32},
    "sdxl": {"to_q": 140, "to_k": 140, "to_v": 140, "to_out.0": 140},
    "sd3": {
        "to_q": 37,
        "to_k": 37,
        "to_v": 37,
        "to_out.0": 37,
        "add_q_proj": 24,
        "add_k_proj": 24,
        "add_v_proj": 24,
        "to_add_out": 23,
    },
    "flux": {
        "to_q": 57,
        "to_k": 57,
        "to_v": 57,
        "to_out.0": 19,
        "add_q_proj": 19,
        "add_k_proj": 19,
        "add_v_proj": 19,
        "to_add_out": 19,
    },
}
# Published parameter counts of the denoisers (model cards / diffusers), in millions.
PUBLISHED_M = {"sd15": 859.5, "sdxl": 2567.5, "flux": 11901.4}
# the package is located, not imported: only its vocabulary file is read (it imports torchvision)
needs_clip_vocab = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason="the CLIP vocabulary ships in open_clip_torch (the armature[arch] extra)",
)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_default_lora_targets_resolve_to_real_modules(name):
    denoiser = build_component(name, DENOISER[name], device="meta")
    lora = default_lora(name)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules)
    matched = {t: [] for t in lora.target_modules}
    for module_name, module in denoiser.named_modules():
        if not check_target_module_exists(config, module_name):
            continue
        target = next(t for t in lora.target_modules if module_name == t or module_name.endswith("." + t))
        assert isinstance(module, torch.nn.Linear), f"{name}: {module_name} is {type(module).__name__}"
        matched[target].append(module_name)
    assert {t: len(v) for t, v in matched.items()} == EXPECTED_MATCHES[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_denoisers_have_the_published_size(name):
    denoiser = build_component(name, DENOISER[name], device="meta")
    millions = sum(p.numel() for p in denoiser.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED_M[name], abs=0.1)


def test_depth_keeps_full_width_and_fewer_blocks():
    flux = build_component("flux", "transformer", depth=2, device="meta")
    assert (len(flux.transformer_blocks), len(flux.single_transformer_blocks)) == (2, 2)
    assert flux.config.num_attention_heads * flux.config.attention_head_dim == 3072
    sd3 = build_component("sd3", "transformer", depth=5, device="meta")
    assert len(sd3.transformer_blocks) == 5
    assert [b.attn2 is not None for b in sd3.transformer_blocks] == [True] * 5  # dual attention kept
    sdxl = build_component("sdxl", "unet", depth=2, device="meta")
    assert sdxl.config.transformer_layers_per_block == [1, 2, 2]
    t5 = build_component("sd3", "text_encoder_3", depth=1, device="meta")
    assert (t5.config.num_layers, t5.config.d_model, t5.config.d_ff) == (1, 4096, 10240)
    with pytest.raises(ValueError, match="depth=0"):
        build_component("flux", "transformer", depth=0, device="meta")
    with pytest.raises(ValueError, match="sd2"):
        architecture_spec("sd2")


@needs_clip_vocab
def test_clip_tokenizer_is_the_real_clip_vocabulary():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # the ids OpenAI's CLIP gives this prompt
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer(pad_token="!").pad_token_id == 0  # SDXL's second tokenizer pads with "!"


@needs_clip_vocab
def test_t5_standin_has_t5s_size_and_special_ids():
    tok = t5_standin_tokenizer()
    assert len(tok) == 32100
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a photo of a cat <extra_id_0>").input_ids
    assert ids[-2:] == [32099, 1] and max(ids) < 32128  # sentinel as in T5, </s> appended, fits the embedding
    assert tok.model_max_length == 512


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the 1 GB model's random init and CPU steps; minutes on an idle machine
@needs_clip_vocab
def test_sd15_architecture_runs_a_ddpo_epoch_and_a_dpo_step():
    from armature.jobs.dpo import pair_errors
    from armature.losses import PerPromptStatTracker, ddpo_loss, diffusion_dpo_loss
    from armature.policies import SamplingParams
    from armature.policies.architectures import architecture_policy

    torch.manual_seed(0)
    steps = 2
    policy = architecture_policy(
        "sd15", sampling=SamplingParams(num_steps=steps, guidance_scale=4.5, height=64, width=64)
    )
    policy.add_lora(default_lora("sd15"))
    base = {
        n: p.detach().clone() for n, p in policy.unet.named_parameters() if "lora_" not in n and "down_blocks.0" in n
    }
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)

    # ---- one DDPO epoch: rollout, rewards, advantages, a PPO update over every stored step
    prompts = ["a photo of a cat"] * 2
    traj = policy.rollout(prompts, [torch.Generator().manual_seed(i) for i in range(len(prompts))])
    assert traj.latents.shape == (2, steps + 1, 4, 8, 8)
    assert traj.cond["encoder_hidden_states"].shape == (2, 2, 77, 768)  # CLIP-L's 77 tokens, width 768
    rewards = traj.images.reshape(2, -1).mean(axis=1).astype(np.float32)
    adv = torch.as_tensor(PerPromptStatTracker(16, 2).update(traj.prompts, rewards))
    policy.unet.train()
    for j in range(steps):
        log_prob = policy.step_log_prob(traj.cond, traj.latents[:, j], traj.timesteps[:, j], traj.latents[:, j + 1])
        # before any update the learner scores each transition as the sampler did
        torch.testing.assert_close(log_prob.detach(), traj.log_probs[:, j], atol=2e-3, rtol=1e-4)
        loss, _ = ddpo_loss(log_prob, traj.log_probs[:, j], adv, 1e-4, 5.0)
        (loss / steps).backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        moved = policy.step_log_prob(traj.cond, traj.latents[:, 0], traj.timesteps[:, 0], traj.latents[:, 1])
    assert (moved - traj.log_probs[:, 0]).abs().max() > 1e-4  # the adapter changed the policy
    for n, p in policy.unet.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"{n}: a base weight moved under LoRA"

    # ---- one Diffusion-DPO step: the DPO job's pair errors on two rollout latents
    batch = {
        "latents_w": traj.latents[:1, -1],
        "latents_l": traj.latents[1:2, -1],
        "prompt": ["a photo of a cat"],
        "mask": torch.zeros(1, 8, 8),
    }

    def dpo(grad: bool):
        errors = pair_errors(
            policy, policy.unet, batch, 0.0, "epsilon", generator=torch.Generator().manual_seed(3), grad=grad
        )
        return diffusion_dpo_loss(*errors, beta=2500.0)[0]

    loss = dpo(grad=True)
    assert math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    with torch.no_grad():
        after = dpo(grad=False)
    assert after.item() < loss.item()  # the step lowered the loss of the pair it was taken on
