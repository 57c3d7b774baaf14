"""End to end: `armature train algo=grpo model=tiny_flow` on the session's Ray cluster raises its
reward in step; with one sampler actor instead of two and its rollouts one epoch ahead of the
learner (``trainer.rollout_ahead=1``) it gives the same first epoch, metric for metric, then
goes stale by one version."""

import pytest

pytestmark = pytest.mark.slow

EPOCHS = 6
DETERMINISTIC = [
    "epoch",
    "samples",
    "reward_mean",
    "reward_std",
    "reward_group_std",
    "loss",
    "approx_kl",
    "clipfrac",
    "grad_norm",
]


def _start(train_job, tmp, name, epochs, samplers, ahead):
    """Starts the job; returns the function that waits for it and gives its metrics."""
    wait = train_job.start(
        tmp,
        name,
        "algo=grpo",
        "model=tiny_flow",
        "reward=brightness",
        f"algo.num_epochs={epochs}",
        "algo.prompts_per_epoch=4",
        "algo.group_size=4",
        "algo.train_batch_size=8",
        "algo.learning_rate=1e-2",
        "algo.train_num_steps=6",
        "algo.sde_window_size=4",
        "algo.sde_window_stride=1",
        "algo.sde_window_shift_every=3",
        "sampling.num_steps=12",
        "sampling.batch_size=8",
        f"trainer.rollout_ahead={ahead}",
        f"cluster.num_samplers={samplers}",
        "cluster.sampler_num_cpus=0.25",  # both jobs (1.75 and 1.5 CPUs) fit the session's 4 at once
        "reward.num_cpus=0.25",
        "cluster.torch_threads=1",
        "tracking.images_per_grid=4",
        "tracking.registered_model=null",
        timeout=600,
    )

    def metrics() -> dict:
        run = wait()
        return {key: run.history(key) for key in DETERMINISTIC + ["sde_window_start", "staleness"]}

    return metrics


@pytest.fixture(scope="module")
def runs(train_job, tmp_path_factory):
    """The two jobs of this module, run at the same time (each its own MLflow store): two samplers
    in step for EPOCHS epochs, and one sampler with its rollouts ahead for 2."""
    two = _start(train_job, tmp_path_factory.mktemp("grpo2"), "grpo2", EPOCHS, samplers=2, ahead=0)
    one = _start(train_job, tmp_path_factory.mktemp("grpo1"), "grpo1", 2, samplers=1, ahead=1)
    return {"two": two(), "one": one()}


@pytest.fixture(scope="module")
def two_sampler_run(runs):
    return runs["two"]


def test_grpo_on_the_tiny_flow_model_raises_the_reward(two_sampler_run):
    rewards = two_sampler_run["reward_mean"]
    assert len(rewards) == EPOCHS
    print("reward_mean per epoch:", rewards)
    assert rewards[-1] > rewards[0]
    assert sum(rewards[-2:]) > sum(rewards[:2])
    # MixGRPO's window moved every 3 epochs over the 6 training steps
    assert two_sampler_run["sde_window_start"] == [0, 0, 0, 1, 1, 1]
    # the first update starts on-policy: the learner recomputes the samplers' log-probabilities
    assert two_sampler_run["approx_kl"][0] < 1e-3
    assert two_sampler_run["staleness"] == [0] * EPOCHS  # in step: each epoch sampled with its own weights


def test_grpo_with_one_sampler_and_rollouts_ahead_matches_until_the_rollouts_go_stale(runs, two_sampler_run):
    """One sampler actor, rolling out epoch k+1 while the learner trains on epoch k
    (``trainer.rollout_ahead=1``): epoch 0 samples the same images with the same weights as the
    two samplers in step, so every metric matches exactly; epoch 1's rollouts were drawn with the
    weights before epoch 0's update (staleness 1), so its rewards differ."""
    one = runs["one"]
    for key in DETERMINISTIC:
        assert len(one[key]) == 2, key
        assert one[key][0] == two_sampler_run[key][0], key
    assert one["staleness"] == [0, 1]
    assert one["reward_mean"][1] != two_sampler_run["reward_mean"][1]
