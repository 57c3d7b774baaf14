"""Guards against reward over-optimisation: the ensemble-uncertainty penalty."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest


def _figures(n: int = 6) -> list[PIL.Image.Image]:
    """Intact figures and broken copies of them: images the scorers rank differently."""
    from armature.gym import inject, render, sample_figure

    rng = np.random.default_rng(5)
    figures = [sample_figure(rng) for _ in range(n // 2)]
    broken = [inject(figure, kind, rng) for figure, kind in zip(figures, ("missing", "detached", "reversed"))]
    return [PIL.Image.fromarray(render(f)) for f in figures + broken]


def test_uncertainty_penalty_is_the_members_mean_less_lambda_times_their_std():
    """Checked against the members scored one by one and numpy's population std."""
    from armature.rewards.registry import load

    images, prompts = _figures(), ["a person"] * 6
    plain = load("gym_anatomy")
    guarded = load("gym_anatomy", uncertainty_penalty=0.5)
    members = np.stack([member(images, prompts) for member in plain.members])  # [5, N]
    np.testing.assert_allclose(plain(images, prompts), members.mean(0), rtol=1e-5, atol=1e-5)
    expected = members.mean(0) - 0.5 * members.std(0)
    assert np.ptp(members.std(0)) > 1e-3  # the members do disagree, by different amounts
    np.testing.assert_allclose(guarded(images, prompts), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value, message", [(-0.1, "must be >= 0"), (0.5, "needs an ensemble")])
def test_uncertainty_penalty_refuses_a_negative_weight_and_a_single_scorer(value, message):
    from armature.gym.base_policy import shipped_scorers
    from armature.rewards.registry import load

    paths = shipped_scorers() if value < 0 else shipped_scorers()[:1]
    with pytest.raises(ValueError, match=message):
        load("learned", path=paths, uncertainty_penalty=value)


def _metrics(trained: float, oracle: float) -> dict:
    return {"reward_mean": trained, "reward_gym_oracle_mean": oracle}


def test_monitor_guard_stops_when_the_monitor_falls_while_the_trained_reward_rises():
    import json

    from armature.platform.overoptimisation import MonitorGuard

    guard = MonitorGuard("gym_oracle", patience=2)
    # epochs 0-2: both rise; 3: the monitor dips while the reward rises (1 epoch, patience 2);
    # 4: the monitor falls again, the reward rises past epoch 2's: stop, back to epoch 2
    run = [(1.0, -2.0), (2.0, -1.5), (3.0, -1.0), (4.0, -1.2), (5.0, -1.3)]
    stops = [guard.update(epoch, _metrics(*m)) for epoch, m in enumerate(run)]
    assert stops == [False, False, False, False, True]
    assert guard.best_epoch == 2 and guard.best_monitor == -1.0
    restored = MonitorGuard.from_state(json.loads(json.dumps(guard.state_dict())))
    assert restored == guard


def test_monitor_guard_waits_while_both_fall_and_resets_on_a_new_best():
    from armature.platform.overoptimisation import MonitorGuard

    guard = MonitorGuard("gym_oracle", patience=2)
    # the monitor falls but so does the reward: a bad step, not over-optimisation
    run = [(3.0, -1.0), (2.0, -1.5), (1.0, -2.0), (2.5, -0.5), (2.6, -0.6)]
    assert [guard.update(e, _metrics(*m)) for e, m in enumerate(run)] == [False] * 5
    assert guard.best_epoch == 3 and guard.since_best == 1


def test_curve_points_and_png():
    import io

    import PIL.Image

    from armature.platform.overoptimisation import curve_png, curve_points, monitors

    assert monitors({"gym_anatomy": {"weight": 1.0}, "gym_oracle": {"weight": 0.0}, "x": None}) == ["gym_oracle"]
    history = [(1, _metrics(2.0, -1.5)), (0, _metrics(1.0, -2.0)), (2, {"reward_mean": 3.0})]
    points = curve_points(history, "gym_oracle")
    np.testing.assert_array_equal(points, [[0, 1.0, -2.0], [1, 2.0, -1.5]])
    image = PIL.Image.open(io.BytesIO(curve_png({"ddpo": points, "ddpo + guard": points[:1]}, "gym_oracle")))
    assert image.size == (500, 400) and np.asarray(image.convert("L")).std() > 0


class _Policy:
    """A policy's weights interface, one tensor."""

    def __init__(self):
        import torch

        self.w = torch.zeros(3)

    def trainable_state_dict(self):
        return {"w": self.w.clone()}

    def load_trainable_state_dict(self, state):
        self.w = state["w"].clone()


def test_worker_guard_keeps_the_best_weights_stops_and_rolls_back_through_a_checkpoint():
    import json
    from types import SimpleNamespace

    import torch

    from armature.platform.learner import GUARD_PREFIX, Guard

    cfg = SimpleNamespace(monitor="gym_oracle", patience=2, min_delta=0.0, rollback=True)
    guard, policy = Guard(cfg), _Policy()
    run = [(1.0, -2.0), (2.0, -1.0), (3.0, -1.2), (4.0, -1.4), (5.0, -1.5)]
    logged = []
    for epoch, m in enumerate(run):
        policy.w += 1  # the epoch's update: the weights after epoch e are e + 1
        metrics = _metrics(*m)
        if guard.update(epoch, metrics, policy, last=epoch == len(run) - 1, rank=0):
            break
        logged.append(metrics)
    assert epoch == 3 and guard.stopped  # epochs 2 and 3 below epoch 1's oracle, reward above it
    assert metrics["guard_stopped"] == 3 and metrics["guard_rolled_back_to"] == 1
    assert torch.equal(policy.w, torch.full((3,), 2.0))  # epoch 1's weights
    assert [m["guard_best_epoch"] for m in logged] == [0, 1, 1]

    # the checkpoint: the guard's JSON state and the best weights beside the job's own tensors
    extra = guard.with_best(lambda: {"old": torch.ones(2)})()
    assert set(extra) == {"old", GUARD_PREFIX + "w"}
    state = json.loads(json.dumps({"guard": guard.state()}))
    restored = Guard(cfg)
    assert restored.restore(state, extra).keys() == {"old"}
    assert restored.stopped and restored.monitor == guard.monitor
    assert torch.equal(restored.best["w"], torch.full((3,), 2.0))


def test_the_last_epoch_rolls_back_without_a_stop_and_rollback_false_keeps_the_weights():
    from types import SimpleNamespace

    import torch

    from armature.platform.learner import Guard

    for rollback, expected in ((True, 1.0), (False, 3.0)):
        guard = Guard(SimpleNamespace(monitor="gym_oracle", patience=5, min_delta=0.0, rollback=rollback))
        policy = _Policy()
        for epoch, m in enumerate([(1.0, -1.0), (2.0, -1.5), (3.0, -1.6)]):
            policy.w += 1
            assert not guard.update(epoch, _metrics(*m), policy, last=epoch == 2, rank=0)
        assert torch.equal(policy.w, torch.full((3,), expected))


def test_the_curve_is_logged_from_the_runs_metric_history(tmp_path):
    import mlflow
    import PIL.Image

    from armature.platform.learner import log_curves
    from armature.platform.tracking import RunLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.tracking.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", artifact_location=str(tmp_path / "art"))).info.run_id
    logger = RunLogger(uri, run_id)
    for epoch, m in enumerate([(1.0, -2.0), (2.0, -1.0), (3.0, -1.2)]):
        logger.log_metrics(_metrics(*m), step=epoch)
    log_curves(logger, {"gym_anatomy": {"weight": 1.0}, "gym_oracle": {"weight": 0.0}})
    path = client.download_artifacts(run_id, "overoptimisation/gym_oracle.png", str(tmp_path))
    assert PIL.Image.open(path).size == (500, 400)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["guard.monitor=gym_anatomy"], "a monitor has weight 0"),
        (["guard.monitor=pose"], "not a reward component"),
        (["guard.monitor=gym_oracle", "guard.patience=0"], "guard.patience=0"),
    ],
)
def test_a_guard_on_a_trained_or_absent_component_is_refused(overrides, message):
    from armature.platform.config import ConfigError, compose

    assert compose("train", ["guard.monitor=gym_oracle"]).guard.monitor == "gym_oracle"
    with pytest.raises(ConfigError, match=message):
        compose("train", overrides)
