"""``trainer.time_budget_s``: a learner stops after the epoch in which its training time (summed
over resumes) reaches the budget; the checkpoint keeps the time spent, so a resumed run counts it
and a run that spent its budget trains no further. The learner core's real ``Worker.end_epoch`` and
``Worker.start`` run here, with the DeepSpeed engine, the checkpoint store and MLflow replaced."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from armature.platform import learner
from armature.platform.config import TrainConfig


def worker(budget: float, spent_before: float = 0.0, num_epochs: int = 5) -> learner.Worker:
    c = TrainConfig()
    c.trainer.time_budget_s = budget
    c.algo = SimpleNamespace(num_epochs=num_epochs)
    c.tracking.log_images_every = 0
    w = learner.Worker.__new__(learner.Worker)  # no Ray Train context here
    w.c, w.algo, w.trainer, w.rank, w.guard, w.logger = c, c.algo, c.trainer, 0, None, None
    w.hooks = []  # no work between epochs (e.g. refresh.*) added by a job
    w.trained_before, w.began = spent_before, time.monotonic()
    w.commits = []
    w.commit = lambda step, metrics, checkpoint, state=None, extra_fn=None: w.commits.append(
        (step, dict(metrics), checkpoint, dict(state or {}))
    )
    return w


def test_the_budget_stops_after_the_epoch_that_spends_it_and_checkpoints_it():
    w = worker(budget=30.0, spent_before=10.0)
    assert w.end_epoch(0, {"reward_mean": 1.0}) is False  # 10 s of 30 spent
    step, metrics, checkpoint, state = w.commits[-1]
    assert "time_budget_stopped" not in metrics and 10.0 <= state[learner.TRAINED_S] < 11.0
    w.trained_before = 31.0  # the next epoch took the job past its budget
    assert w.end_epoch(1, {"reward_mean": 2.0}) is True
    step, metrics, checkpoint, state = w.commits[-1]
    assert step == 1 and metrics["time_budget_stopped"] == 1 and checkpoint is True
    assert state[learner.BUDGET_SPENT] is True and state[learner.TRAINED_S] >= 31.0


def test_no_budget_and_the_last_epoch_never_stop_early():
    w = worker(budget=0.0, spent_before=1e9)
    assert w.end_epoch(0, {}) is False and "time_budget_stopped" not in w.commits[-1][1]
    w = worker(budget=5.0, spent_before=100.0, num_epochs=3)
    assert w.end_epoch(2, {}) is False  # the last epoch ends the run anyway: nothing to stop
    assert learner.BUDGET_SPENT not in w.commits[-1][3]


@pytest.mark.parametrize(
    ("state", "start", "spent_before"),
    [
        ({}, 0, 0.0),  # a fresh run
        ({learner.TRAINED_S: 42.0}, 3, 42.0),  # resumed: the earlier runs' time counts
        ({learner.TRAINED_S: 99.0, learner.BUDGET_SPENT: True}, 5, 99.0),  # spent: trains no further
    ],
)
def test_a_resumed_run_counts_the_time_spent_and_a_spent_one_trains_no_further(monkeypatch, state, start, spent_before):
    w = worker(budget=60.0)
    w.logger = object()  # rank 0's logger is open
    monkeypatch.setattr(learner, "deepspeed_engine", lambda *args: ("engine", "optimizer", []))
    restored = 3 if state else 0
    monkeypatch.setattr(learner, "restore_checkpoint", lambda engine, logger: (restored, dict(state), None))
    model = SimpleNamespace(denoiser=None)
    assert w.start(model, accumulation=1) == "engine" and model.denoiser == "engine"
    assert w.start_epoch == start and w.trained_before == spent_before
    assert spent_before <= w.trained_s() < spent_before + 5.0
    w.algo = SimpleNamespace(num_epochs=None, num_rounds=7)  # online DPO counts rounds
    if state.get(learner.BUDGET_SPENT):
        w.start(model, accumulation=1)
        assert w.start_epoch == 7
