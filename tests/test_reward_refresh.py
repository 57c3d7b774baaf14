"""The on-policy reward refresh (``refresh.*``): the fine-tune math against a hand calculation,
the refresh raising a scorer's accuracy on pairs it ranked wrong, the weights' round trip, the
Worker hook's share of a checkpoint, and the config checks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from armature.rewards.conv_scorer import ConvNet, ConvScorer
from armature.rewards.fine_tune import (
    bradley_terry_step,
    fine_tune,
    load_trainable_state,
    trainable_scorers,
    trainable_state,
)


class _Linear(nn.Module):
    """score = W . pixels + b, pixels flattened: a scorer whose gradient is easy by hand."""

    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, pixels):
        return self.linear(pixels.flatten(1)).squeeze(1)


def _linear_scorer(size=2, seed=0):
    torch.manual_seed(seed)
    return ConvScorer(_Linear(3 * size * size), image_size=size)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _by_hand(w, x_w, x_l, y):
    """Loss and gradient in W of mean_i BCE(sigma(d_i), y_i), d_i = W.(x_w,i - x_l,i) (the bias cancels)."""
    d = (x_w - x_l) @ w
    loss = np.mean(-(y * np.log(_sigmoid(d)) + (1 - y) * np.log(_sigmoid(-d))))
    grad = ((_sigmoid(d) - y)[:, None] * (x_w - x_l)).mean(0)
    return loss, grad


def test_one_bradley_terry_step_matches_a_hand_computed_adam_step():
    scorer = _linear_scorer()
    rng = np.random.default_rng(0)
    images_w, images_l = rng.random((3, 3, 2, 2)), rng.random((3, 3, 2, 2))  # [B, 3, H, W] in [0, 1]
    tie = np.array([False, True, False])
    w0 = scorer.net.linear.weight.detach().double().numpy()[0].copy()
    b0 = float(scorer.net.linear.bias.detach())
    x_w, x_l = (images_w * 2 - 1).reshape(3, -1), (images_l * 2 - 1).reshape(3, -1)  # the scorer's input
    loss, grad = _by_hand(w0, x_w, x_l, np.where(tie, 0.5, 1.0))

    lr, eps = 0.01, 1e-8
    scorer.net.requires_grad_(True)
    optimizer = torch.optim.AdamW(scorer.net.parameters(), lr=lr, eps=eps, weight_decay=0.0)
    got = bradley_terry_step(
        scorer, optimizer, torch.tensor(images_w, dtype=torch.float32), torch.tensor(images_l, dtype=torch.float32), tie
    )
    assert got == pytest.approx(loss, rel=1e-5)
    # Adam's first step (bias-corrected m = g, v = g^2): theta - lr * g / (|g| + eps); b gets no gradient
    expected = w0 - lr * grad / (np.abs(grad) + eps)
    np.testing.assert_allclose(scorer.net.linear.weight.detach().numpy()[0], expected, rtol=1e-5, atol=1e-6)
    assert float(scorer.net.linear.bias.detach()) == pytest.approx(b0, abs=1e-7)


def test_fine_tune_on_one_pair_takes_that_step_and_leaves_the_scorer_frozen():
    scorer = _linear_scorer(seed=1)
    rng = np.random.default_rng(1)
    images_w = (rng.random((1, 2, 2, 3)) * 255).astype(np.uint8)  # [N, H, W, 3] uint8, as stored
    images_l = (rng.random((1, 2, 2, 3)) * 255).astype(np.uint8)
    w0 = scorer.net.linear.weight.detach().double().numpy()[0].copy()
    x_w = (images_w.transpose(0, 3, 1, 2) / 255.0 * 2 - 1).reshape(1, -1)
    x_l = (images_l.transpose(0, 3, 1, 2) / 255.0 * 2 - 1).reshape(1, -1)
    loss, grad = _by_hand(w0, x_w, x_l, np.array([1.0]))
    info = fine_tune({"s.0": scorer}, images_w, images_l, [False], steps=1, learning_rate=0.01, batch_size=8, seed=0)
    assert info["loss_first"] == pytest.approx(loss, rel=1e-5) == pytest.approx(info["loss_last"], rel=1e-5)
    np.testing.assert_allclose(
        scorer.net.linear.weight.detach().numpy()[0], w0 - 0.01 * grad / (np.abs(grad) + 1e-8), rtol=1e-5, atol=1e-6
    )
    assert not any(p.requires_grad for p in scorer.net.parameters()) and not scorer.net.training


def _marked(rng, n, size=16):
    """Noise images; the preferred ones carry a bright 4x4 square somewhere."""
    noise = lambda: (rng.random((n, size, size, 3)) * 128).astype(np.uint8)
    w, l = noise(), noise()
    for i in range(n):
        y, x = rng.integers(0, size - 4, 2)
        w[i, y : y + 4, x : x + 4] = 255
    return w, l


def test_the_refresh_raises_accuracy_on_pairs_the_scorer_ranked_wrong():
    torch.manual_seed(0)
    scorer = ConvScorer(ConvNet((8, 8)), image_size=16)
    w, l = _marked(np.random.default_rng(0), 96)
    from PIL import Image

    def scores(images):
        return scorer([Image.fromarray(a) for a in images], [""] * len(images))

    wrong = scores(w) <= scores(l)
    assert wrong.sum() >= 16  # enough pairs it ranked wrong at the start
    w, l = w[wrong], l[wrong]
    fine_tune({"s.0": scorer}, w, l, np.zeros(len(w), bool), steps=60, learning_rate=3e-3, batch_size=16, seed=0)
    assert np.mean(scores(w) > scores(l)) >= 0.9
    # and on fresh pairs of the same kind, not trained on
    w2, l2 = _marked(np.random.default_rng(1), 64)
    assert np.mean(scores(w2) > scores(l2)) >= 0.8


def test_trainable_members_skip_monitors_and_their_weights_round_trip():
    from armature.rewards import WeightedSum
    from armature.rewards.analytic import Brightness
    from armature.rewards.learned import MeanOfScorers

    torch.manual_seed(0)
    members = [ConvScorer(ConvNet((8,)), image_size=8) for _ in range(2)]
    monitor = ConvScorer(ConvNet((8,)), image_size=8)
    reward = WeightedSum(
        {"learned": (MeanOfScorers(members), 1.0), "watch": (monitor, 0.0), "brightness": (Brightness(), 0.5)}
    )
    scorers = trainable_scorers(reward)
    assert sorted(scorers) == ["learned.0", "learned.1"]
    state = trainable_state(scorers)
    assert state and all(k.startswith(("learned.0.", "learned.1.")) for k in state)
    images = torch.rand(4, 3, 8, 8)
    before = members[1].score_tensor(images, [""] * 4)
    changed = {k: v + 0.1 if k.startswith("learned.1.") else v for k, v in state.items()}
    load_trainable_state(scorers, changed)
    assert not torch.allclose(members[1].score_tensor(images, [""] * 4), before)
    load_trainable_state(scorers, state)
    assert torch.allclose(members[1].score_tensor(images, [""] * 4), before)
    with pytest.raises(KeyError, match="learned.0"):
        load_trainable_state(scorers, {k: v for k, v in state.items() if k.startswith("learned.1.")})
    assert trainable_scorers(Brightness()) == {}
    with pytest.raises(ValueError, match="no trainable member"):
        fine_tune({}, np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8), [False], 1, 1e-3, 1, 0)


def test_the_worker_hook_takes_its_tensors_from_a_checkpoint_and_refreshes_on_schedule():
    from armature.feedback.refresh import PREFIX, RewardRefresh

    cfg = SimpleNamespace(every=2)
    worker = SimpleNamespace(c=SimpleNamespace(refresh=cfg), rank=1, policy=None, seed=0)  # not rank 0: no store
    hook = RewardRefresh(worker)
    extra = hook.restore({"refresh": {"refreshes": 3}}, {PREFIX + "gym_anatomy.0.head.bias": torch.ones(1), "old": 1})
    assert extra == {"old": 1} and hook.refreshes == 3 and set(hook.extra()) == {PREFIX + "gym_anatomy.0.head.bias"}
    assert hook.restore({}, None) is None

    done = []
    hook.rank, hook.refresh = 0, lambda epoch: done.append(epoch) or {"refresh_seconds": 1.0}
    metrics = [{} for _ in range(6)]
    for epoch in range(6):
        hook.end_epoch(epoch, metrics[epoch], last=epoch == 5)
    assert done == [1, 3]  # after every 2nd epoch, never after the last
    assert metrics[1] == {"refresh_seconds": 1.0} and metrics[2] == {}


def test_round_accuracy_leaves_ties_and_unlabelled_pairs_out():
    from armature.feedback.refresh import round_accuracy

    ids = ["p0", "p1", "p2", "p3", "p4"]
    decided = {"p0": "w", "p1": "l", "p2": "tie", "p3": "w"}
    a, b = np.array([1.0, 1.0, 0.0, 0.0, 5.0]), np.array([0.0, 2.0, 1.0, 1.0, 0.0])
    assert round_accuracy(ids, decided, a, b) == pytest.approx(2 / 3)  # p0, p1 right, p3 wrong
    assert np.isnan(round_accuracy(ids, {"p2": "tie"}, a, b))


def test_store_agreement_over_some_pairs(tmp_path):
    from armature.feedback.store import PreferenceStore

    store = PreferenceStore(tmp_path / "s.db", labels_per_pair=2)
    image = np.zeros((4, 4, 3), np.uint8)
    store.add_pairs(
        {"pair_id": p, "prompt": "x", "image_a": image, "image_b": image, "round": r} for p, r in (("a", 0), ("b", 1))
    )
    for name in ("x", "y"):
        store.add_annotator(name)
    for annotator, pair, decision in (("x", "a", "w"), ("y", "a", "w"), ("x", "b", "w"), ("y", "b", "l")):
        store.add_label(annotator, pair, decision)
    assert store.agreement(["a"])["agreement"] == 1.0 and store.agreement(["b"])["agreement"] == 0.0
    assert store.agreement()["agreement"] == 0.5 and store.rounds() == {"a": 0, "b": 1}
    assert store.decisions(["b"]) == {"b": ["w", "l"]}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["refresh.every=1", "reward=compressibility"], "has no trainable member"),
        (["refresh.every=1", "reward.components.gym_anatomy.weight=0"], "has no trainable member"),
        (["refresh.every=1", "algo=dpo"], "algo=dpo does not refresh its reward"),
        (["refresh.every=-1"], "refresh.every=-1"),
        (["refresh.every=1", "refresh.replay=1.5"], "refresh.replay=1.5"),
        (["refresh.every=1", "refresh.labels_per_pair=3"], "at most refresh.num_annotators=2"),
        (["refresh.every=1", "refresh.annotator=crowd"], "refresh.annotator=crowd"),
        (["refresh.every=1", "refresh.learning_rate=0"], "refresh.learning_rate=0"),
        (["refresh.every=1", "trainer.storage_path=s3://bucket/runs"], "give refresh.store a database URL"),
    ],
)
def test_refresh_config_checks_name_the_field_and_the_fix(overrides, message):
    from armature.platform.config import ConfigError, compose

    with pytest.raises(ConfigError, match=message):
        compose("train", overrides)


def test_simulated_annotators_need_a_reward():
    from omegaconf import OmegaConf

    from armature.platform.config import compose, refresh_errors

    cfg = compose("train", ["refresh.every=1"])
    OmegaConf.update(cfg, "refresh.annotator_reward", {}, merge=False)
    assert any("refresh.annotator_reward is empty" in e for e in refresh_errors(cfg))
    OmegaConf.update(cfg, "refresh.annotator", "human")
    assert refresh_errors(cfg) == []  # people need no reward


def test_refresh_is_off_by_default_and_composes_on_the_gym_reward():
    from armature.platform.config import compose

    assert compose("train").refresh.every == 0
    cfg = compose("train", ["refresh.every=2", "refresh.annotator=human"])
    assert cfg.refresh.every == 2 and cfg.refresh.store is None
    # simulated annotators labelling with the trained reward itself too: allowed
    cfg = compose("train", ["refresh.every=1", "+refresh.annotator_reward.gym_anatomy={weight: 1}"])
    assert set(cfg.refresh.annotator_reward) == {"gym_oracle", "gym_anatomy"}


@pytest.mark.slow
def test_a_ddpo_job_refreshes_its_reward_and_the_actors_score_with_the_new_weights(ray_cluster, tmp_path):
    """The default gym job, as small as it goes: 2 epochs, a refresh after the first (4 pairs,
    labelled by 2 simulated oracle annotators), 2 reward actors. The scores after the refresh
    come from the actor that did not fine-tune, and match the refreshed weights the checkpoint
    holds; the scores before match the shipped scorers."""
    import json
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "armature.cli", "train", "algo.num_epochs=2", "algo.samples_per_epoch=8"]
    command += ["algo.train_batch_size=4", "algo.stat_min_count=2", "algo.final_eval_per_prompt=0"]
    command += ["sampling.num_steps=4", "sampling.batch_size=4", "reward.num_actors=2", "reward.num_cpus=0.25"]
    command += ["cluster.sampler_num_cpus=0.5", "tracking.log_images_every=0", "tracking.registered_model=null"]
    command += ["refresh.every=1", "refresh.pairs=4", "refresh.steps=5", "refresh.batch_size=4"]
    command += ["refresh.learning_rate=1e-3", f"trainer.storage_path={tmp_path / 'ray'}"]
    command += [f"tracking.local_dir={tmp_path / 'track'}", "tracking.run_name=refresh"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "refresh after epoch 1: 4 pairs, 8 labels" in out, out[-3000:]

    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "ray" / "refresh"
    info = json.loads((run_dir / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(info["mlflow_run_id"], key)}

    for key in ("refresh_labels", "refresh_ties", "refresh_agreement", "refresh_acc_before", "refresh_acc_after"):
        assert list(history(key)) == [0], key  # after epoch 0 only: nothing trains after the last
    assert history("refresh_labels") == {0: 8.0} and history("refresh_seconds")[0] > 0
    assert set(history("reward_gym_oracle_mean")) == {0, 1}  # the oracle monitor, every epoch
    assert set(history("reward_gym_anatomy_mean")) == {0, 1}

    # the round's images, scored here by the shipped scorers and by the checkpoint's refreshed ones
    from safetensors.torch import load_file

    from armature.feedback.refresh import PREFIX
    from armature.feedback.store import PreferenceStore
    from armature.rewards import load
    from armature.rewards.fine_tune import load_trainable_state, trainable_scorers

    store = PreferenceStore(run_dir / "refresh.db")
    ids = sorted(store.rounds())
    assert len(ids) == 4 and store.counts()["labels"] == 8
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(store.image(p, s))).convert("RGB") for s in "ab" for p in ids]
    reward = load("gym_anatomy")
    shipped = reward(images, [""] * 8)
    last = max(run_dir.glob("checkpoint_*/armature_extra.safetensors"), key=lambda p: p.parent.name)
    extra = load_file(last)
    refreshed = {k[len(PREFIX) :]: v for k, v in extra.items() if k.startswith(PREFIX)}
    assert len({k.split(".")[1] for k in refreshed}) == 5  # the five shipped scorers, each fine-tuned
    load_trainable_state(trainable_scorers(reward), refreshed)
    new = reward(images, [""] * 8)
    assert history("refresh_reward_before_mean")[0] == pytest.approx(float(np.mean(shipped)), rel=1e-4, abs=1e-5)
    assert history("refresh_reward_after_mean")[0] == pytest.approx(float(np.mean(new)), rel=1e-4, abs=1e-5)
    assert not np.allclose(new, shipped, atol=1e-4)


def test_reward_actor_fine_tunes_its_trained_members_and_another_scores_with_the_new_weights():
    """``RewardScorer`` (the class the reward actors run, here without Ray) on the default gym
    reward: only the trained component's scorers move, the oracle monitor at weight 0 keeps its
    scores, and a second scorer loaded with the new weights scores exactly as the fine-tuned one."""
    from armature.actors.reward import RewardScorer

    components = {"gym_anatomy": {"weight": 1.0}, "gym_oracle": {"weight": 0.0}}
    tuned, other = RewardScorer(components), RewardScorer(components)
    state = tuned.trainable_state()
    assert state and {k.split(".")[0] for k in state} == {"gym_anatomy"}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    prompts = [""] * 8
    before = tuned.score(images, prompts)
    new, info = tuned.fine_tune(images[:4], images[4:], np.zeros(4, bool), 3, 1e-2, 4, 0)
    assert set(new) == set(state) and np.isfinite(info["loss_first"]) and np.isfinite(info["loss_last"])
    after = tuned.score(images, prompts)
    assert not np.allclose(after["gym_anatomy"], before["gym_anatomy"])
    np.testing.assert_array_equal(after["gym_oracle"], before["gym_oracle"])
    np.testing.assert_array_equal(other.score(images, prompts)["reward"], before["reward"])
    assert other.load_trainable(new) is True
    np.testing.assert_allclose(other.score(images, prompts)["reward"], after["reward"], rtol=0, atol=1e-6)


def test_an_in_process_refresh_draws_the_policys_pairs_and_fine_tunes_the_learners_own_reward(tmp_path):
    """AlignProp's refresh (``InProcess``: no actors): the pairs are the policy's own draws with the
    plan's seeds (checked against the policy called directly), the fine-tune moves the very reward
    object the learner backpropagates, and the checkpoint's weights load into a fresh copy so that
    it scores exactly as the refreshed one."""
    from omegaconf import OmegaConf

    from armature.feedback.refresh import PREFIX, SLOT_SEED, InProcess, RewardRefresh
    from armature.platform.config import RefreshConfig
    from armature.platform.learner import epoch_plan
    from armature.policies import build_policy
    from armature.rewards.learned import MeanOfScorers

    torch.set_num_threads(1)
    model = {"family": "tiny", "tiny": {"seed": 0, "image_size": 16}}
    policy = build_policy(model, {"num_steps": 2, "guidance_scale": 1.0, "eta": 1.0})

    def ensemble():
        return MeanOfScorers([_linear_scorer(4, 0), _linear_scorer(4, 1)])

    reward, prompts = ensemble(), ["a cat", "a dog", "a horse"]
    cfg = OmegaConf.structured(
        RefreshConfig(every=1, pairs=4, annotator_reward={"brightness": {"weight": 1.0}}, steps=5, learning_rate=1e-2)
    )
    components = {"learned": {"weight": 1.0}}
    c = SimpleNamespace(
        refresh=cfg, prompts=SimpleNamespace(file=None, prompts=prompts), reward=SimpleNamespace(components=components)
    )
    worker = SimpleNamespace(c=c, rank=0, seed=3, config={"run_dir": str(tmp_path)}, policy=policy)
    hook = RewardRefresh(worker, in_process=InProcess(policy, reward, batch_size=3))
    probe = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    before = reward.score_tensor(torch.as_tensor(probe).permute(0, 3, 1, 2) / 255.0, [""] * 6)

    metrics = hook.refresh(epoch=0)
    assert metrics["refresh_pairs"] == 4 and metrics["refresh_labels"] == 8 and metrics["refreshes"] == 1

    plan = epoch_plan(prompts, 3 + SLOT_SEED, 0, 4, 2, rank=0, world=1)
    with torch.no_grad():
        direct = policy.rollout(plan.prompts, [torch.Generator().manual_seed(s) for s in plan.seeds]).images
    stored_a, stored_b, stored_prompts = hook._images(sorted(hook.store.decisions()))
    np.testing.assert_array_equal(stored_a, np.asarray(direct)[0::2])
    np.testing.assert_array_equal(stored_b, np.asarray(direct)[1::2])
    assert stored_prompts == plan.prompts[0::2]

    pixels = torch.as_tensor(probe).permute(0, 3, 1, 2) / 255.0
    after = reward.score_tensor(pixels, [""] * 6)
    assert not torch.allclose(after, before)  # the learner's own reward object moved
    fresh = ensemble()
    torch.testing.assert_close(fresh.score_tensor(pixels, [""] * 6), before)
    rest = RewardRefresh(worker, in_process=InProcess(policy, fresh, batch_size=3)).restore(
        {"refresh": {"refreshes": 1}}, {**hook.extra(), "other": 1}
    )
    assert rest == {"other": 1} and all(k.startswith(PREFIX + "learned.") for k in hook.extra())
    torch.testing.assert_close(fresh.score_tensor(pixels, [""] * 6), after, rtol=0, atol=0)
