"""The online feedback loop: the simulated annotator and the pre-filter (fast), the config, and a
few rounds of `armature train algo=online_dpo` on the tiny model (slow)."""

import numpy as np
import pytest

from armature.data.pairs import read_pairs
from armature.feedback.simulated import SimulatedAnnotator, select_pairs, uncertainty
from armature.feedback.store import PreferenceStore
from armature.rewards import load


def _gray_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 256, size=(n, 2))
    levels[levels[:, 0] == levels[:, 1], 1] ^= 1  # no exact ties
    pairs = [
        {"prompt": "p", "image_a": np.full((8, 8, 3), a, np.uint8), "image_b": np.full((8, 8, 3), b, np.uint8)}
        for a, b in levels
    ]
    return pairs, levels


def test_noiseless_annotator_follows_the_reward_through_the_shuffle(tmp_path):
    store = PreferenceStore(tmp_path / "fb.db")
    pairs, levels = _gray_pairs(30)
    ids = store.add_pairs(pairs)
    annotator = SimulatedAnnotator(load("brightness"), name="sim", noise=0.0, tie_rate=0.0, seed=1)
    assert annotator.label(store) == 30
    labels = {lab["pair_id"]: lab for lab in store.labels()}
    shown = {lab["shown_left"] for lab in labels.values()}
    assert shown == {"a", "b"}  # served in both orders
    for pair_id, (a, b) in zip(ids, levels):
        assert labels[pair_id]["decision"] == ("w" if a > b else "l")  # brighter image a: w


def test_noise_and_tie_rates(tmp_path):
    store = PreferenceStore(tmp_path / "fb.db")
    pairs, levels = _gray_pairs(200, seed=2)
    ids = store.add_pairs(pairs)
    SimulatedAnnotator(load("brightness"), name="sim", noise=0.3, tie_rate=0.2, seed=3).label(store)
    truth = {pair_id: "w" if a > b else "l" for pair_id, (a, b) in zip(ids, levels)}
    decisions = [(lab["decision"], truth[lab["pair_id"]]) for lab in store.labels()]
    ties = sum(d == "tie" for d, _ in decisions)
    flips = sum(d != t for d, t in decisions if d != "tie")
    # binomial: 200 * 0.2 = 40 ties (sd 5.7); 160 * 0.3 = 48 flips (sd 5.8): 4 sd bounds
    assert abs(ties - 40) < 23 and abs(flips - 0.3 * (200 - ties)) < 24
    with pytest.raises(ValueError, match="noise"):
        SimulatedAnnotator(load("brightness"), noise=1.5)


def test_uncertainty_is_one_over_one_plus_gap_over_median():
    a, b = np.array([0.0, 1.0, 5.0, 2.0]), np.array([0.0, 0.0, 1.0, 4.0])
    gaps = [0.0, 1.0, 4.0, 2.0]
    median = sorted(gaps)[1] / 2 + sorted(gaps)[2] / 2  # 1.5
    expected = [1 / (1 + g / median) for g in gaps]
    np.testing.assert_allclose(uncertainty(a, b), expected)
    assert uncertainty(np.zeros(3), np.zeros(3)).tolist() == [1.0, 1.0, 1.0]  # all ties: median 0 -> scale 1


def test_select_pairs_keeps_least_or_most_certain_in_sampling_order_on_ties():
    unsure = np.array([0.2, 0.9, 0.5, 0.9, 1.0, 0.1])
    assert select_pairs(unsure, 3).tolist() == [4, 1, 3]  # 1.0, then the two 0.9s in sampling order
    assert select_pairs(unsure, 3, "confident").tolist() == [5, 0, 2]  # 0.1, 0.2, 0.5
    assert sorted(select_pairs(unsure, 6, "confident").tolist()) == list(range(6))
    with pytest.raises(ValueError, match="prefilter_order"):
        select_pairs(unsure, 3, "random")


def test_online_dpo_config_and_errors():
    from armature.platform.algorithms import get
    from armature.platform.config import ConfigError, compose

    cfg = compose("train", ["algo=online_dpo"])
    assert (
        cfg.algo.name == "online_dpo"
        and cfg.data.heldout_fraction == 0.25
        and "brightness" in cfg.algo.annotator_reward
    )
    assert get("online_dpo").run.__module__ == "armature.jobs.online_dpo"
    for bad, key in (
        ("algo.prefilter_keep=0", "algo.prefilter_keep"),
        ("algo.annotator=crowd", "algo.annotator"),
        ("algo.labels_per_pair=3", "algo.labels_per_pair"),
        ("algo.annotator_noise=2", "annotator_noise"),
        ("data.heldout_fraction=0", "data.heldout_fraction"),
        ("algo.probe_pairs=-1", "algo.probe_pairs"),
        ("algo.prefilter_order=random", "algo.prefilter_order"),
    ):
        with pytest.raises(ConfigError, match=key):
            compose("train", ["algo=online_dpo", bad])


@pytest.mark.slow
def test_online_loop_rounds_labels_weights_and_metrics(train_job, tmp_path):
    """Rounds of sample -> simulated labels -> Diffusion-DPO -> new weights on the tiny model, the
    samplers one round ahead (``trainer.rollout_ahead=1``): every round stores fresh pairs that
    name the policy version that drew them, two annotators label each, the
    labels stream into the learner and every round is an MLflow step with counts, agreement
    and the held-out implicit accuracy against the annotators.

    The accuracy is printed, not asserted to rise: the random tiny model's samples are
    noise-like textures whose global statistics barely differ (brightness std 0.003 across
    seeds), so a few dozen on-policy pairs carry too little signal (see the closing note)."""
    run = train_job(
        tmp_path,
        "online",
        "algo=online_dpo",
        "model=tiny_lora",
        "reward=brightness",
        "algo.num_rounds=3",
        "algo.pairs_per_round=16",
        "algo.epochs_per_round=2",
        "algo.train_batch_size=4",
        "algo.learning_rate=1e-3",
        "algo.heldout_draws=4",
        "algo.probe_pairs=6",
        "sampling.num_steps=2",
        # the samplers draw round r+1's pairs while round r is labeled and trained on
        "trainer.rollout_ahead=1",
        "reward.num_cpus=0.5",
        "tracking.registered_model=null",
    )
    out, history = run.out, run.history
    assert "[armature] round 3/3" in out

    accuracy = history("heldout_implicit_acc")
    print(
        "held-out implicit accuracy by round:",
        accuracy,
        "by pair:",
        history("heldout_pair_acc"),
        "held-out pairs:",
        history("heldout_pairs"),
        "agreement:",
        history("annotators_agreement"),
    )
    assert "[armature] probe: 6 base-policy pairs, 12 labels" in out  # labeled before round 1
    assert history("store_labels") == [44, 76, 108]  # the probe's 12, then 16 pairs a round, 2 annotators each
    assert history("labels_new") == [32, 32, 32] and history("pairs_new") == [16, 16, 16]
    assert history("policy_version") == [1, 2, 3]
    assert len(accuracy) == 3 and all(0 <= a <= 1 for a in accuracy)
    heldout, train = history("heldout_pairs"), history("train_pairs")
    assert heldout == sorted(heldout) and train == sorted(train) and train[-1] > train[0]  # labels accumulate
    assert all(b > 0 for b in history("train_batches"))
    probe = history("probe_pairs")  # the base policy's pairs: the same set every round, never trained on
    assert len(probe) == 3 and len(set(probe)) == 1 and 0 < probe[0] <= 6
    # two annotators, 10 % flips and 5 % ties each: expected agreement ~0.76; 16 to 48 pairs
    assert all(0.5 < a < 1.0 for a in history("annotators_agreement"))

    store = PreferenceStore(tmp_path / "ray" / "online" / "feedback.db")
    assert store.counts()["pairs"] == 54 and sorted(store.counts_by_round()) == [-1, 0, 1, 2]
    # the probe's pairs (round -1) come from the base policy (version 0); rounds 0 and 1 were drawn
    # with the weights before round 0's update (version 1), round 2's with those after it (2)
    versions = {}
    for pid in store.decisions():
        versions.setdefault(store.pair(pid)["round"], set()).add(store.pair(pid)["policy_version"])
    assert versions == {-1: {0}, 0: {1}, 1: {1}, 2: {2}}, versions
    assert history("staleness") == [0, 1, 1]
    exported = read_pairs(tmp_path / "ray" / "online" / "labels" / "round_0002.parquet")
    assert exported.num_rows == 54 and set(exported["label"].to_pylist()) <= {"w", "l", "tie"}
    assert sum(pid.startswith("probe-") for pid in exported["pair_id"].to_pylist()) == 6
