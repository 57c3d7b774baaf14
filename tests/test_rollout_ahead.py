"""The learner core's rollouts one epoch ahead (``RolloutAhead``), without Ray: which weights each
epoch's rollouts are submitted with, when, and the staleness it reports; and the threads each
process gets from its CPU share."""

import pytest

from armature.platform.launch import job_threads
from armature.platform.learner import RolloutAhead, idle_shares


def _drive(ahead: int, num_epochs: int, start: int = 0):
    """Run the pipeline as a job does: the weights of epoch k are 'w<k>', version k + 1."""
    submitted, taken = [], []

    def submit(epoch, weights, version):
        submitted.append((epoch, weights, version, len(taken)))  # len(taken): epochs begun so far
        return f"rollouts {epoch} with {weights}"

    pipeline = RolloutAhead(submit, ahead, num_epochs)
    for epoch in range(start, num_epochs):
        taken.append(pipeline.take(epoch, f"w{epoch}", epoch + 1))
    return submitted, taken


def test_in_step_each_epoch_samples_with_its_own_weights():
    submitted, taken = _drive(0, 3)
    assert submitted == [(0, "w0", 1, 0), (1, "w1", 2, 1), (2, "w2", 3, 2)]
    assert taken == [("rollouts 0 with w0", 0), ("rollouts 1 with w1", 0), ("rollouts 2 with w2", 0)]


def test_one_ahead_samples_the_next_epoch_with_the_weights_before_the_update():
    submitted, taken = _drive(1, 4)
    # epoch 0 submits its own rollouts and epoch 1's, both with w0, before it trains; epoch k
    # (k >= 1) submits epoch k + 1's with w<k>; the last epoch submits nothing beyond the run
    assert submitted == [(0, "w0", 1, 0), (1, "w0", 1, 0), (2, "w1", 2, 1), (3, "w2", 3, 2)]
    assert taken == [
        ("rollouts 0 with w0", 0),
        ("rollouts 1 with w0", 1),
        ("rollouts 2 with w1", 1),
        ("rollouts 3 with w2", 1),
    ]


def test_a_resumed_run_starts_in_step():
    submitted, taken = _drive(1, 4, start=2)
    assert submitted == [(2, "w2", 3, 0), (3, "w2", 3, 0)]
    assert [staleness for _, staleness in taken] == [0, 1]


def test_staleness_past_the_bound_is_refused():
    pipeline = RolloutAhead(lambda epoch, weights, version: epoch, 1, 5)
    pipeline.take(0, "w0", 1)
    with pytest.raises(RuntimeError, match="2 weight versions behind"):
        pipeline.take(1, "w1", 3)  # a learner that skipped a version
    with pytest.raises(ValueError, match="trainer.rollout_ahead=2"):
        RolloutAhead(lambda *a: None, 2, 5)


def test_idle_shares():
    shares = idle_shares(learner_wait_s=2.0, sampler_busy_s=6.0, num_samplers=2, epoch_s=10.0)
    assert shares == pytest.approx({"learner_idle_share": 0.2, "sampler_idle_share": 0.7})


def test_threads_follow_the_cpu_shares_when_samplers_and_learner_overlap(monkeypatch):
    from dataclasses import replace

    from armature.platform.config import ClusterConfig, TrainerConfig

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    cluster = ClusterConfig(sampler_num_cpus=3.0)
    trainer, ahead = TrainerConfig(cpus_per_worker=5.0), TrainerConfig(cpus_per_worker=5.0, rollout_ahead=1)
    assert job_threads(cluster, trainer, local=True) == (8, 8)  # in turn: every core each
    assert job_threads(cluster, ahead, local=True) == (5, 3)
    assert job_threads(replace(cluster, sampler_num_cpus=0.5), ahead, local=True) == (5, 1)
    assert job_threads(replace(cluster, torch_threads=2), ahead, local=True) == (2, 2)
    assert job_threads(cluster, ahead, local=False) == (None, None)
