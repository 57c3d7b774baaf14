"""The gym base policy's pretraining recipe: its data, and a miniature run end to end."""

import json

import numpy as np
import torch

from armature.gym import AnatomyOracle
from armature.jobs.gym_pretrain import PretrainConfig, pretrain, render_dataset


def test_training_data_carries_the_configured_share_of_defects():
    """The recorded severities are the renderer's ground truth: the oracle reads the same from the
    pixels, and the share of defective figures is the configured one."""
    images, prompts, severity = render_dataset(200, 0.4, seed=3)
    assert images.shape == (200, 64, 64, 3) and len(prompts) == 200
    oracle = AnatomyOracle()
    agree = np.mean([oracle(image).severity == s for image, s in zip(images, severity)])
    assert agree >= 0.97
    defective = (severity > 0).mean()
    assert abs(defective - 0.4) < 4 * np.sqrt(0.4 * 0.6 / 200)  # binomial: 4 standard deviations


def test_miniature_pretrain_writes_a_policy_model_gym_loads(tmp_path, monkeypatch):
    from armature.gym.base_policy import policy_path
    from armature.policies import SamplingParams, load_policy

    cfg = PretrainConfig(
        images=64,
        vae_steps=3,
        unet_steps=4,
        batch_size=4,
        eval_per_prompt=1,
        eval_steps=2,
        unet_channels=[16, 32],
        vae_channels=[16, 16],
        latent_channels=4,
        threads=1,
    )
    stats = pretrain(cfg, tmp_path / "policy", log=lambda m: None)
    assert stats["unet_steps_done"] == 4 and stats["eval"]["samples"] == 9
    assert json.loads((tmp_path / "policy" / "stats.json").read_text())["eval"]["samples"] == 9
    assert (tmp_path / "policy" / "samples.png").is_file()
    monkeypatch.setenv("ARMATURE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "gym").mkdir(parents=True)
    (tmp_path / "policy").rename(tmp_path / "cache" / "gym" / "policy")
    assert policy_path() == tmp_path / "cache" / "gym" / "policy"  # the cache wins over the shipped one
    policy = load_policy("gym", sampling=SamplingParams(num_steps=2, guidance_scale=1.0))
    assert policy.image_size == (64, 64) and policy.unet.dtype == torch.float32  # stored in float16
    scale = policy.pipe.vae.config.scaling_factor
    assert scale == stats["latent_scale"] and scale != 0.18215
    images = policy.rollout(["a person standing"], torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
