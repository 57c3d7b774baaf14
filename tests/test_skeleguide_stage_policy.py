"""A SkeleGuide stage as an RL policy (model=skeleguide_stage): the learners' interface over one adapter."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from armature.platform.config import compose
from armature.policies import build_policy


def _policy(*overrides):
    cfg = compose(
        "train", ["model=skeleguide_stage", "sampling.num_steps=4", "sampling.guidance_scale=1.0", *overrides]
    )
    c = OmegaConf.to_object(cfg)
    return build_policy(c.model, c.sampling, seed=0)


@pytest.fixture(scope="module")
def policy():
    return _policy()


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_an_ode_rollout_is_the_pipelines_own_plan():
    """With the SDE's noise off, the policy's rollout (diffusers' flow step on the velocity the policy
    computes) lands on the same layouts as SkeleGuidePipeline.plan, sampled independently from the
    same scenes, prompts and seeds."""
    policy = _policy("sampling.noise_level=0.0")
    prompts = ["a person standing", "a person kneeling"]
    traj = policy.rollout(prompts, _gens(5, 6))
    scenes = np.stack([policy.condition_image(p, s) for p, s in zip(prompts, (5, 6))])
    planned = policy.sg.plan(scenes, prompts, seed=5, num_steps=4)  # seeds 5 and 6, one per sample
    assert np.array_equal(traj.images, planned)


def test_recorded_log_probs_are_rescored_under_the_recorded_condition(policy):
    traj = policy.rollout(["a person standing", "a person sitting"], _gens(1, 2))
    assert traj.latents.shape == (2, 5, *policy.latent_shape) and traj.images.shape == (2, 64, 64, 3)
    assert traj.cond["condition"].shape[:2] == (2, 2)
    for j in range(4):
        with torch.no_grad():
            lp = policy.step_log_prob(traj.cond, traj.latents[:, j], traj.timesteps[:, j], traj.latents[:, j + 1])
        torch.testing.assert_close(lp, traj.log_probs[:, j], rtol=1e-4, atol=1e-3)
    # another scene under the same transition scores differently: the condition is part of the density
    args = (traj.latents[:, 2], traj.timesteps[:, 2], traj.latents[:, 3])
    with torch.no_grad():
        same = policy.step_log_prob(traj.cond, *args)
        other = policy.step_log_prob(dict(traj.cond, condition=traj.cond["condition"].flip(0)), *args)
    assert (other - same).abs().max() > 10 * (same - traj.log_probs[:, 2]).abs().max() + 1e-7


def test_a_sample_depends_on_its_seed_not_its_batch(policy):
    alone = policy.rollout(["a person standing"], _gens(7))
    batched = policy.rollout(["a person sitting", "a person standing"], _gens(3, 7))
    assert np.abs(alone.images[0].astype(int) - batched.images[1]).max() <= 1  # batched float sums
    torch.testing.assert_close(alone.cond["condition"][0], batched.cond["condition"][1], atol=1e-4, rtol=1e-3)
    assert np.abs(batched.images[0].astype(int) - batched.images[1]).max() > 10


def test_only_the_stage_adapter_trains_and_the_reference_switches_it_off(policy):
    names = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    assert names and all(".skeletal." in n for n in names)
    traj = policy.rollout(["a person standing"], _gens(4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        args = (traj.cond, traj.latents[:, 2], traj.timesteps[:, 2])
        tuned = policy.predict(*args)
        with policy.reference():
            ref = policy.predict(*args)
        again = policy.predict(*args)
    assert (tuned - ref).abs().max() > 1e-3 and torch.equal(tuned, again)
    assert [n for n, p in policy.unet.named_parameters() if p.requires_grad] == names  # restored


def test_adapter_round_trip_and_into_the_pipeline(tmp_path):
    a, b = _policy(), _policy()
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.1)
    a.save_trainable(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "skeletal" / "adapter_model.safetensors").is_file()
    b.load_adapter(tmp_path / "adapter")
    for (n, p), q in zip(a.trainable_state_dict().items(), b.trainable_state_dict().values()):
        assert torch.equal(p, q), n
    b.load_trainable_state_dict(_policy().trainable_state_dict(), version=3)
    assert b.weights_version == 3 and not torch.equal(
        next(iter(b.trainable_state_dict().values())), next(iter(a.trainable_state_dict().values()))
    )


def test_appearance_stage_is_conditioned_on_the_ground_truth_layout():
    from armature.skeleton import parse_layout

    policy = _policy("model.skeleguide_stage.stage=appearance")
    layout = policy.condition_image("a person standing", 11)
    assert (parse_layout(layout).array[..., 2] > 0).sum() >= 12  # a drawn skeleton, not a bare scene
    assert all(".appearance." in n for n, p in policy.unet.named_parameters() if p.requires_grad)


def test_bad_stage_and_conditions_are_named(tmp_path):
    with pytest.raises(ValueError, match="model.skeleguide_stage.stage"):
        _policy("model.skeleguide_stage.stage=render")
    with pytest.raises(ValueError, match="model.skeleguide_stage.conditions"):
        _policy(f"model.skeleguide_stage.conditions={tmp_path}")
    with pytest.raises(ValueError, match="model.lora.enabled"):
        _policy("model.lora.enabled=false")


def test_a_folder_of_scenes_is_picked_by_seed(tmp_path):
    import PIL.Image

    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        PIL.Image.new("RGB", (80, 80), colour).save(tmp_path / f"scene{i}.png")
    policy = _policy(f"model.skeleguide_stage.conditions={tmp_path}")
    picked = policy.condition_image("a person", 4)  # 4 % 3 -> scene1
    assert picked.shape == (64, 64, 3) and tuple(picked[0, 0]) == (30, 200, 30)
    (tmp_path / "scene3.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="model.skeleguide_stage.conditions: .*scene3.png is not a readable image"):
        _policy(f"model.skeleguide_stage.conditions={tmp_path}").condition_image("a person", 3)


@pytest.mark.slow
def test_grpo_trains_the_skeletal_stage_with_the_skeleton_reward(ray_cluster, tmp_path):
    """`armature train algo=grpo model=skeleguide_stage reward=skeleton`: the ordinary GRPO job (Ray
    Train + DeepSpeed, sampler and reward actors) trains the skeletal adapter; its saved adapter
    loads into a fresh stage policy and differs from the initial one."""
    import json
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    command = [
        sys.executable,
        "-m",
        "armature.cli",
        "train",
        "algo=grpo",
        "model=skeleguide_stage",
        "reward=skeleton",
        "prompts.file=configs/suites/gym_poses.txt",
        "algo.num_epochs=2",
        "algo.prompts_per_epoch=2",
        "algo.group_size=4",
        "algo.train_batch_size=8",
        "sampling.num_steps=4",
        "sampling.batch_size=8",
        "cluster.sampler_num_cpus=0.5",
        "reward.num_cpus=0.25",
        "cluster.torch_threads=1",
        "tracking.images_per_grid=4",
        "tracking.registered_model=null",
        f"trainer.storage_path={tmp_path / 'ray'}",
        f"tracking.local_dir={tmp_path / 'track'}",
        "tracking.run_name=skel",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "HF_HUB_OFFLINE": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    info = json.loads((tmp_path / "ray" / "skel" / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    rewards = [m.value for m in client.get_metric_history(info["mlflow_run_id"], "reward_mean")]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)
    adapter = client.download_artifacts(info["mlflow_run_id"], "adapter", str(tmp_path / "dl"))
    trained, fresh = _policy(), _policy()
    trained.load_adapter(adapter)
    before, after = fresh.trainable_state_dict(), trained.trainable_state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
