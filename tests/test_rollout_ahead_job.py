"""End to end: a tiny DDPO job with the samplers one epoch ahead of the learner
(``trainer.rollout_ahead=1``) on the session's Ray cluster repeats its metrics exactly with the
same seed and logs its staleness; the NFT learner trains with its rollouts ahead too.

The other on-policy learners run ahead in their own job tests (test_grpo_job.py,
test_feedback_loop.py's online DPO), and every other DDPO job test runs in step (the default),
so no Ray Train start-up is paid twice for the same path. Which weights each epoch samples
with, ahead or in step, is test_rollout_ahead.py's."""

import pytest

pytestmark = pytest.mark.slow

EPOCHS = 3
DETERMINISTIC = ["epoch", "samples", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "grad_norm"]
DDPO = [
    "model=tiny",
    "reward=compressibility",
    "prompts.file=null",
    "algo.learning_rate=1e-3",
    f"algo.num_epochs={EPOCHS}",
    "algo.samples_per_epoch=8",
    "algo.train_batch_size=4",
    "algo.stat_min_count=2",
    "algo.final_eval_per_prompt=0",
    "sampling.num_steps=3",
    "sampling.batch_size=4",
    "trainer.rollout_ahead=1",
    "cluster.num_samplers=2",
    "cluster.sampler_num_cpus=0.25",  # 1.75 CPUs a job: both jobs fit the session's 4 at once
    "reward.num_cpus=0.25",
    "tracking.log_images_every=0",
    "tracking.registered_model=null",
]


def test_rollouts_ahead_repeat_exactly_with_the_same_seed(train_job, tmp_path):
    # the two jobs run at the same time (each its own MLflow store): the same metrics however
    # their processes interleave
    wait_first = train_job.start(tmp_path / "a", "ahead_a", *DDPO)
    wait_again = train_job.start(tmp_path / "b", "ahead_b", *DDPO)
    first, again = wait_first(), wait_again()
    assert first.history("staleness") == [0, 1, 1]
    for key in DETERMINISTIC:
        assert len(first.history(key)) == EPOCHS, key
        assert first.history(key) == again.history(key), key
    shares = first.history("learner_idle_share") + first.history("sampler_idle_share")
    assert len(shares) == 2 * EPOCHS and all(0 <= s <= 1 for s in shares)


def test_nft_trains_with_rollouts_ahead(train_job, tmp_path):
    run = train_job(
        tmp_path,
        "ahead",
        *["algo=nft", "model=tiny_flow", "reward=brightness", "algo.num_epochs=3", "algo.prompts_per_epoch=2"],
        *["algo.group_size=4", "algo.train_batch_size=4", "sampling.num_steps=4", "sampling.batch_size=4"],
        *["trainer.rollout_ahead=1", "reward.num_cpus=0.25", "cluster.sampler_num_cpus=0.5"],
        *["tracking.registered_model=null", "tracking.log_images_every=0"],
    )
    assert run.history("staleness") == [0, 1, 1]
