"""The anatomy gym: renderer, oracle and defect injectors (numpy only, no Ray)."""

import json

import numpy as np
import pytest

from armature.data.pairs import check_record, decode_image
from armature.gym import KINDS, AnatomyOracle, agreement, make_pair, render, sample_defective, sample_figure
from armature.gym.figures import PALETTE, POSES, SIZE, TYPES, build_parts, sample_pose


def test_intact_figure_draws_every_part_in_its_colour():
    rng = np.random.default_rng(0)
    for name in POSES:
        figure = sample_figure(rng, name)
        image = render(figure)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert figure.prompt == POSES[name][0]
        for type_ in TYPES:  # every part type shows, in exactly its palette colour
            assert (image == PALETTE[type_]).all(-1).sum() >= 4, (name, type_)
        assert len(figure.parts) == 14 and not figure.defects


def test_bending_the_elbow_turns_the_forearm_inward_by_that_angle():
    """The renderer's convention, checked on its geometry (the oracle reads angles this way)."""
    pose = sample_pose(np.random.default_rng(1), "arms_out")
    pose.lean = 0.0
    for side, outward in (("left", 1.0), ("right", -1.0)):
        pose.angles[side].update(shoulder=90.0, elbow=90.0)
        parts = {(p.type, p.side): p for p in build_parts(pose)}
        (x0, y0), (x1, y1) = parts[("upper_arm", side)].points
        assert np.sign(x1 - x0) == outward and abs(y1 - y0) < 1e-6  # straight out sideways
        (x0, y0), (x1, y1) = parts[("forearm", side)].points
        assert abs(x1 - x0) < 1e-6 and y1 > y0  # bent 90 degrees inward from "out": pointing down


@pytest.mark.parametrize("kind", KINDS)
def test_oracle_reads_each_injected_defect(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    oracle = AnatomyOracle()
    for _ in range(6):
        intact, broken = sample_defective(rng, kind)
        assert oracle(render(intact)).defects == []
        verdict = oracle(render(broken))
        assert verdict.defects == sorted(set(broken.defects)), kind
        assert {k for k, _ in verdict.defects} == {kind}
        assert verdict.severity == {"proportion": 1, "reversed": 2, "overbent": 2}.get(kind, verdict.severity)
        assert verdict.severity >= (1 if kind == "proportion" else 2)


def test_severity_follows_the_worst_defect():
    oracle = AnatomyOracle()
    rng = np.random.default_rng(5)
    figure = sample_figure(rng, "standing")
    image = render(figure)
    assert oracle(image).severity == 0
    no_head = image.copy()
    no_head[(image == PALETTE["head"]).all(-1)] = image[0, 0]  # paint the head out: severe
    verdict = oracle(no_head)
    assert ("missing", "head") in verdict.defects and verdict.severity == 3
    no_hand = image.copy()
    hands = (image == PALETTE["hand"]).all(-1)
    hands[:, SIZE // 2 :] = False  # one hand (the figure's right: the image's left half)
    no_hand[hands] = image[0, 0]
    assert oracle(no_hand).defects == [("missing", "hand")] and oracle(no_hand).severity == 2


def test_oracle_forgives_a_blurred_seam_but_not_a_detached_part():
    """A decoder blurs the seam between two parts into a colour that is neither: parts within
    ATTACH_GAP pixels (chessboard distance) of each other are still joined; the detached injector
    leaves wider gaps."""
    from scipy import ndimage

    from armature.gym.figures import ATTACH_GAP

    rng = np.random.default_rng(8)
    image = render(sample_figure(rng, "standing"))
    shin = (image == PALETTE["shin"]).all(-1)
    foot = (image == PALETTE["foot"]).all(-1)
    seam = foot & ndimage.binary_dilation(shin, np.ones((3, 3)), iterations=ATTACH_GAP - 1)
    assert seam.any() and (foot & ~seam).sum() >= 8  # the foot now starts ATTACH_GAP px from the shin
    cut = image.copy()
    cut[seam] = (128, 128, 128)  # a grey no part is near
    assert AnatomyOracle()(cut).defects == []
    assert ("detached", "foot") in AnatomyOracle(attach_gap=1)(cut).defects  # stricter: detached
    for _ in range(4):  # every injected detachment is wider than the gap
        _, broken = sample_defective(rng, "detached")
        assert AnatomyOracle()(render(broken)).defects == sorted(set(broken.defects))


def test_agreement_judges_the_transformed_drawings():
    assert agreement(n_intact=6, n_per_kind=1, seed=3, transform=lambda images: images.copy())["agreement"] == 1.0
    blank = agreement(n_intact=6, n_per_kind=1, seed=3, transform=lambda images: np.full_like(images, 128))
    assert blank["agreement"] == 0.0 and all(("missing", "torso") in m["found"] for m in blank["mistakes"])


def test_oracle_agrees_with_ground_truth():
    """Intact and broken figures of every kind; the closing note's figure comes from
    ``armature gym check`` on a few thousand."""
    result = agreement(n_intact=60, n_per_kind=20, seed=11)
    assert result["figures"] == 180
    assert result["agreement"] >= 0.99, result["mistakes"]


def test_pairs_are_valid_records_that_differ_only_inside_the_mask():
    rng = np.random.default_rng(7)
    for kind in KINDS:
        intact, broken = sample_defective(rng, kind)
        record = make_pair(intact, broken)
        reason, decoded = check_record(record)
        assert reason is None, reason
        good, bad = decode_image(record["image_w"]), decode_image(record["image_l"])
        mask = decode_image(record["mask"], mode="L") > 0
        assert (good != bad).any() and not (good != bad)[~mask].any()
        assert record["severity_w"] == 0 and record["severity_l"] >= 1
        assert record["source"] == f"gym:{kind}" and record["prompt"] == intact.prompt


def test_pairs_take_a_transform_and_cross_figures():
    """``transform`` changes what is stored (the mask stays the drawings' difference); a crossed
    pair sets the next figure's intact drawing against this figure's broken one."""
    from armature.gym import pairs

    plain = pairs(12, seed=5)
    inverted = pairs(12, seed=5, transform=lambda images: 255 - images)
    for a, b in zip(plain, inverted):
        assert a["mask"] == b["mask"] and a["pair_id"] == b["pair_id"]
        np.testing.assert_array_equal(decode_image(b["image_w"]), 255 - decode_image(a["image_w"]))
        np.testing.assert_array_equal(decode_image(b["image_l"]), 255 - decode_image(a["image_l"]))
    crossed = pairs(12, seed=5, crossed=1.0)
    for i, record in enumerate(crossed):  # the same broken figures, the next one's intact drawing
        assert record["image_l"] == plain[i]["image_l"] and record["severity_l"] == plain[i]["severity_l"]
        assert record["image_w"] == plain[(i + 1) % 12]["image_w"] and record["prompt"] == plain[(i + 1) % 12]["prompt"]
        assert check_record(record)[0] is None
    with pytest.raises(ValueError, match="crossed=1.5"):
        pairs(2, crossed=1.5)
    half = pairs(200, seed=5, crossed=0.5)
    same = sum(r["image_w"] == p["image_w"] for r, p in zip(half, pairs(200, seed=5)))
    assert 60 < same < 140


def test_missing_can_cut_a_limb_off_at_the_elbow_or_knee():
    """The gym policy's commonest severe error, a forearm gone with its hand, has its own injection:
    the upper arm stays, and the oracle reads both parts missing, severe."""
    from armature.gym.defects import inject

    rng = np.random.default_rng(4)
    cuts = {}
    for _ in range(80):
        figure = sample_figure(rng)
        broken = inject(figure, "missing", rng)
        kinds = tuple(sorted(part for _, part in broken.defects))
        if kinds in (("forearm", "hand"), ("foot", "shin")):
            cuts[kinds] = broken
            image = render(broken)
            upper = "upper_arm" if "hand" in kinds else "thigh"
            assert (image == PALETTE[upper]).all(-1).sum() >= 8  # both upper bones still drawn
            verdict = AnatomyOracle()(image)
            assert verdict.defects == sorted(set(broken.defects)) and verdict.severity == 3
    assert set(cuts) == {("forearm", "hand"), ("foot", "shin")}


def test_graded_pairs_set_a_milder_defect_against_a_severe_one_on_the_same_figure():
    """``graded``: a severe broken figure is set against the same figure (same pose, same
    background) carrying a milder defect; the severities stored are the injectors' ground truth;
    graded=0 leaves a seed's pairs exactly as they were."""
    from armature.gym import pairs

    plain = pairs(40, seed=5, crossed=0.5)
    assert [r["image_w"] for r in pairs(40, seed=5, crossed=0.5, graded=0.0)] == [r["image_w"] for r in plain]
    graded = pairs(40, seed=5, crossed=0.5, graded=1.0)
    severe = [i for i, r in enumerate(plain) if r["severity_l"] == 3]
    assert len(severe) >= 8
    for i, (p, g) in enumerate(zip(plain, graded)):
        assert g["image_l"] == p["image_l"] and check_record(g)[0] is None
        if i not in severe:
            assert g["image_w"] == p["image_w"] and g["severity_w"] == 0
            continue
        assert g["severity_w"] in (1, 2) and " over " in g["source"], g["source"]
        good, bad = decode_image(g["image_w"]), decode_image(g["image_l"])
        corner = np.zeros(good.shape[:2], bool)
        corner[:3, :3] = True  # figures stay clear of the border: the background shows there
        assert (good[corner] == bad[corner]).all()  # same figure, same background
        assert AnatomyOracle()(good).severity == g["severity_w"]
    with pytest.raises(ValueError, match="graded=1.5"):
        pairs(2, graded=1.5)


def test_bench_refuses_unknown_learners_and_domains_before_any_stage(tmp_path):
    from armature.jobs.gym_bench import BenchConfig, run

    with pytest.raises(ValueError, match="bench.learners"):
        run(BenchConfig(out=str(tmp_path / "b"), learners=["ddpo", "ppo"]))
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="bench.pair_domain"):
        run(BenchConfig(out=str(tmp_path / "c"), pairs=2, pair_domain="pixels"))
    with pytest.raises(ValueError, match="bench.crossed"):
        run(BenchConfig(out=str(tmp_path / "d"), pairs=2, crossed=-0.1))
    with pytest.raises(ValueError, match="bench.graded"):
        run(BenchConfig(out=str(tmp_path / "e"), pairs=2, graded=2.0))
    with pytest.raises(ValueError, match="bench.reward_seeds"):
        run(BenchConfig(out=str(tmp_path / "f"), pairs=2, reward_seeds=0))
    with pytest.raises(ValueError, match="bench.best_of"):
        run(BenchConfig(out=str(tmp_path / "g"), pairs=2, best_of=[0, 4]))
    with pytest.raises(ValueError, match="bench.ceiling"):  # the oracle is not differentiable
        run(BenchConfig(out=str(tmp_path / "h"), ceiling=["alignprop"]))
    with pytest.raises(ValueError, match="bench.scorers"):
        run(BenchConfig(out=str(tmp_path / "i"), scorers="pretrained"))
    with pytest.raises(ValueError, match="bench.epochs.*missing: \\['grpo'\\]"):
        run(BenchConfig(out=str(tmp_path / "j"), learners=["grpo"], epochs={"ddpo": 3}))
    with pytest.raises(ValueError, match="bench.train_s"):
        run(BenchConfig(out=str(tmp_path / "k"), train_s=-1))
    with pytest.raises(ValueError, match=r"bench.guards: \['clip'\]"):
        run(BenchConfig(out=str(tmp_path / "l"), guards=["clip"]))
    with pytest.raises(ValueError, match="no learner to guard"):
        run(BenchConfig(out=str(tmp_path / "m"), learners=["dpo"], guards=["kl"]))
    with pytest.raises(ValueError, match=r"bench.kl_beta.*\['grpo'\]"):
        run(BenchConfig(out=str(tmp_path / "n"), learners=["grpo"], guards=["kl"], kl_beta={"ddpo": 0.1}))
    with pytest.raises(ValueError, match="reward_seeds=1: the penalty needs an ensemble"):
        run(BenchConfig(out=str(tmp_path / "o"), learners=["ddpo"], guards=["uncertainty"], reward_seeds=1))
    with pytest.raises(ValueError, match=r"guards=\[heldout\] with bench.reward_seeds=1"):
        run(BenchConfig(out=str(tmp_path / "p"), learners=["ddpo"], guards=["heldout"], reward_seeds=1))
    with pytest.raises(ValueError, match="bench.refresh_every=0"):
        run(BenchConfig(out=str(tmp_path / "q"), learners=["ddpo"], guards=["refresh"], refresh_every=0))
    assert not any((tmp_path / name).exists() for name in "cdefghijklmnopq")


def test_every_bench_learner_composes_a_valid_job_on_the_learned_reward_and_on_the_oracle(tmp_path):
    """Each learner's stage (and each ceiling's) is a job config that composes and passes its
    checks: the learned reward trained on with the oracle at weight 0 beside it (a monitor), or the
    oracle alone at weight 1; the reward-gradient learners backpropagate only the learned reward;
    online DPO's annotator is the learned reward alone (the default brightness annotator replaced,
    not joined); the time budget reaches every learner."""
    from armature.jobs import gym_bench
    from armature.jobs.alignprop import build_reward
    from armature.platform.config import compose

    cfg = gym_bench.BenchConfig(out=str(tmp_path), train_s=120.0, epochs={**gym_bench.EPOCHS, "grpo": 3})
    spec = "{weight: 1.0, path: [/s/a, /s/b]}"
    base = ["cluster.num_cpus=8", "sampling.num_steps=20", "sampling.guidance_scale=1.0"]
    for name in gym_bench.LEARNERS:
        c = compose("train", base + gym_bench.recipe(name, cfg, tmp_path, tmp_path / "p.txt", spec))
        assert c.algo.name == name and c.trainer.time_budget_s == 120.0 and c.model.lora.enabled
        if name in ("dpo", "asap_dpo"):
            assert c.data.pairs == str(tmp_path / "pairs")
            continue
        assert dict(c.reward.components) == {
            "gym_oracle": {"weight": 0.0},
            "learned": {"weight": 1.0, "path": ["/s/a", "/s/b"]},
        }
        if name == "online_dpo":
            assert dict(c.algo.annotator_reward) == {"learned": {"weight": 1.0, "path": ["/s/a", "/s/b"]}}
            assert (c.algo.annotator_noise, c.algo.annotator_tie_rate, c.algo.labels_per_pair) == (0.0, 0.0, 1)
        if name in gym_bench.CEILINGS:
            ceiling = compose("train", base + gym_bench.recipe(name, cfg, tmp_path, tmp_path / "p.txt", None))
            assert dict(ceiling.reward.components) == {"gym_oracle": {"weight": 1.0}}
            if name == "online_dpo":
                assert dict(ceiling.algo.annotator_reward) == {"gym_oracle": {"weight": 1.0}}
    assert compose("train", gym_bench.recipe("grpo", cfg, tmp_path, tmp_path / "p.txt", spec)).algo.num_epochs == 3
    c = compose("train", base + gym_bench.recipe("draft", cfg, tmp_path, tmp_path / "p.txt", None))
    with pytest.raises(ValueError, match="not differentiable"):  # the oracle cannot be backpropagated
        build_reward(c)
    shipped = compose(
        "train",
        base
        + gym_bench.recipe(
            "refl", cfg, tmp_path, tmp_path / "p.txt", "{weight: 1.0, path: " + str(gym_bench_shipped()) + "}"
        ),
    )
    trained, monitors = build_reward(shipped)
    assert trained.differentiable and list(monitors.rewards) == ["gym_oracle"] and monitors.weights["gym_oracle"] == 0.0


def test_every_guard_turns_on_for_every_guarded_learner(tmp_path):
    """A ``<learner>-<guard>`` stage is the learner's own stage plus its guard, and composes a valid
    job: the monitor guard on the oracle with roll back, the same stop on a held-out scorer (trained
    on the other scorers), the ensemble's uncertainty penalty on the learned reward (the oracle still
    a weight-0 monitor), the learner's own KL weight."""
    from armature.jobs import gym_bench
    from armature.platform.config import compose

    cfg = gym_bench.BenchConfig(out=str(tmp_path), guard_patience=4, uncertainty_penalty=0.5)
    scorers = ["/s/a", "/s/b", "/s/c"]
    spec = "{weight: 1.0, path: [/s/a, /s/b, /s/c]}"
    monitor = {"monitor": "gym_oracle", "heldout": "gym_anatomy"}
    for name in gym_bench.GUARDED:
        plain = gym_bench.recipe(name, cfg, tmp_path, tmp_path / "p.txt", spec)
        for guard in gym_bench.GUARDS:
            c = compose("train", plain + gym_bench.guard_overrides(guard, name, cfg, scorers))
            assert c.algo.name == name
            assert (c.guard.monitor, c.guard.patience, c.guard.rollback) == (
                (monitor[guard], 4, True) if guard in monitor else (None, 2, True)
            )
            learned = dict(c.reward.components.learned)
            assert list(learned["path"]) == (["/s/a", "/s/b"] if guard == "heldout" else scorers)
            held_out = c.reward.components.get("gym_anatomy")
            assert (held_out and (held_out.path, held_out.weight)) == (("/s/c", 0.0) if guard == "heldout" else None)
            assert learned.get("uncertainty_penalty", 0.0) == (0.5 if guard == "uncertainty" else 0.0)
            assert c.reward.components.gym_oracle.weight == 0.0 and learned["weight"] == 1.0
            assert c.algo.beta == (cfg.kl_beta[name] if guard == "kl" else 0.0)
            assert c.refresh.every == (cfg.refresh_every if guard == "refresh" else 0)


def test_curves_name_each_stage_and_the_roll_back(tmp_path):
    """``overoptimisation.md`` and the per-learner plot, from the stages' MLflow runs (a real file store)."""
    from mlflow.tracking import MlflowClient

    from armature.jobs import gym_bench

    uri, run_dirs = f"sqlite:///{tmp_path / 'mlflow.db'}", {}
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=(tmp_path / "artifacts").as_uri())
    curves = {
        "alignprop": [(10.0, -1.2, 0.4), (12.0, -0.8, 0.2), (14.0, -2.5, 0.9)],
        "alignprop-monitor": [(10.0, -1.2, 0.4), (12.0, -0.8, 0.2), (14.0, -2.5, 0.9)],
        "alignprop-heldout": [(9.0, -1.0, 0.5), (11.0, -0.9, 0.3)],
        "ddpo-oracle": [(-1.9, -1.9, 0.35), (-1.7, -1.7, 0.30)],
    }
    for name, points in curves.items():
        run = client.create_run(experiment).info.run_id
        for epoch, (trained, oracle, severe) in enumerate(points):
            client.log_metric(run, "reward_mean", trained, step=epoch)
            client.log_metric(run, "reward_gym_oracle_mean", oracle, step=epoch)
            client.log_metric(run, "reward_gym_oracle_severe_rate", severe, step=epoch)
            if name == "alignprop-heldout":
                client.log_metric(run, "reward_gym_anatomy_mean", trained / 2, step=epoch)
        if name == "alignprop-monitor":
            client.log_metric(run, "guard_rolled_back_to", 1, step=2)
        run_dirs[name] = tmp_path / name
        run_dirs[name].mkdir()
        (run_dirs[name] / "armature_run.json").write_text(json.dumps({"tracking_uri": uri, "mlflow_run_id": run}))
    gym_bench.write_curves(tmp_path, run_dirs, print)
    table = (tmp_path / "overoptimisation.md").read_text()
    assert "| alignprop | 2 | +12.000 | -0.800 | 0.200 |  |" in table
    assert "| alignprop-monitor | 3 (rolled back to epoch 2) | +14.000 | -2.500 | 0.900 |  |" in table
    assert "| alignprop-heldout | 2 | +11.000 | -0.900 | 0.300 | +5.500 |" in table  # the held-out scorer
    assert "| ddpo-oracle | 2 | -1.700 | -1.700 | 0.300 |  |" in table
    assert (tmp_path / "overoptimisation-alignprop.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "overoptimisation-ddpo.png").exists()  # a ceiling trains on the oracle itself


def gym_bench_shipped():
    from armature.rewards.learned import shipped_scorers

    return "[" + ", ".join(str(p) for p in shipped_scorers()) + "]"


def test_bench_counts_the_reward_training_in_every_row_that_uses_the_reward():
    from armature.jobs.gym_bench import training_seconds

    seconds, reward_s = {"base": 0.0, "ddpo": 400.0, "dpo": 90.0}, 500.0
    assert training_seconds("base", seconds, reward_s) == 0.0  # the plain base policy uses no reward
    assert training_seconds("base+bon16", seconds, reward_s) == 500.0  # Best-of-N ranks by it
    assert training_seconds("ddpo", seconds, reward_s) == 900.0  # DDPO trains on it
    assert training_seconds("ddpo+bon4", seconds, reward_s) == 900.0  # counted once, not twice
    assert training_seconds("dpo", seconds, reward_s) == 90.0  # DPO learns from the pairs alone
    assert training_seconds("dpo+bon8", seconds, reward_s) == 590.0
    seconds.update({"grpo": 300.0, "online_dpo": 200.0, "ddpo-oracle": 350.0})
    assert training_seconds("grpo", seconds, reward_s) == 800.0  # every RL learner trains on it
    assert training_seconds("online_dpo", seconds, reward_s) == 700.0  # its annotator is the reward
    assert training_seconds("ddpo-oracle", seconds, reward_s) == 350.0  # the ceiling: the oracle, not it
    assert training_seconds("ddpo-oracle+bon16", seconds, reward_s) == 850.0
    seconds.update({"alignprop-kl": 300.0, "grpo-monitor": 250.0})
    assert training_seconds("alignprop-kl", seconds, reward_s) == 800.0  # a guarded learner trains on it
    assert training_seconds("grpo-monitor+bon16", seconds, reward_s) == 750.0


def test_gym_cli_passes_pair_flags_and_refuses_a_bad_best_of(tmp_path, capsys):
    """`armature gym pairs --graded 1 --crossed 1` reaches pairs(); `gym bench` is configured by its
    keys: a former flag (`--best-of`) stops naming the key, a bad value (`best_of=[4,x]`) naming the
    key, both before any stage writes anything."""
    import pyarrow.parquet as pq

    from armature.cli import main

    assert main(["gym", "pairs", "--n", "24", "--out", str(tmp_path / "p"), "--graded", "1.0", "--crossed", "1.0"]) == 0
    table = pq.read_table(next((tmp_path / "p").glob("*.parquet"))).to_pylist()
    assert len(table) == 24
    graded = [r for r in table if " over " in r["source"]]
    assert graded and all(r["severity_w"] in (1, 2) for r in graded)  # every severe pair graded
    assert main(["gym", "pairs", "--n", "24", "--out", str(tmp_path / "q")]) == 0
    plain = pq.read_table(next((tmp_path / "q").glob("*.parquet"))).to_pylist()
    assert not any(" over " in r["source"] for r in plain)  # the defaults: none graded
    same_background = lambda r: (decode_image(r["image_w"])[:3, :3] == decode_image(r["image_l"])[:3, :3]).all()
    assert all(same_background(r) for r in plain)  # none crossed: one figure, its broken copy
    assert not any(same_background(r) for r in table if " over " not in r["source"])  # crossed: two figures
    assert main(["gym", "bench", "--best-of", "4,8", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--best-of: set the key instead, e.g. best_of=[1,4,8,16]" in err and "e.g. out=gym-bench" in err
    assert main(["gym", "bench", "best_of=[4,x]", f"out={tmp_path / 'b'}"]) == 2
    assert "best_of" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_the_shipped_anatomy_reward_ranks_unseen_decoded_pairs():
    """``reward=gym_anatomy`` (the default job's reward) loads the five conv scorers shipped in
    the package, trained on the injector pairs of seeds 0-4; on pairs of another seed, through
    the gym VAE as the policy's samples are, their mean prefers the intact figure far above
    chance (0.98-0.99 held out in their training runs)."""
    import PIL.Image

    from armature.gym import pairs
    from armature.gym.base_policy import SHIPPED_SCORER, policy_path
    from armature.jobs.gym_pretrain import load_round_trip
    from armature.rewards.registry import load

    assert json.loads((SHIPPED_SCORER / "provenance.json").read_text())["made_by"].startswith("armature gym bench")
    reward = load("gym_anatomy")
    assert reward.name == "gym_anatomy" and len(reward.members) == 5
    records = pairs(96, seed=123, transform=load_round_trip(policy_path()), crossed=0.5)
    won = [PIL.Image.fromarray(decode_image(r["image_w"])) for r in records]
    lost = [PIL.Image.fromarray(decode_image(r["image_l"])) for r in records]
    prompts = [r["prompt"] for r in records]
    accuracy = float(np.mean(reward(won, prompts) > reward(lost, prompts)))
    assert accuracy > 0.85, accuracy


def test_a_missing_shipped_reward_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    import armature.gym.base_policy as base_policy

    (tmp_path / "seed-0").mkdir()  # a member folder without its scorer.json does not count
    monkeypatch.setattr(base_policy, "SHIPPED_SCORER", tmp_path)
    with pytest.raises(FileNotFoundError, match="reward.components.gym_anatomy.path") as err:
        base_policy.shipped_scorers()
    assert str(tmp_path) in str(err.value)


def test_reward_components_report_their_own_summary_metrics():
    """The gym oracle reports its severe-error rate itself; a learner logs what each reward reports."""
    from armature.platform.learner import reward_metrics

    oracle = np.array([0.0, -3.0, -1.0, -3.0, -2.0, -3.0, 0.0, -1.0])  # -severity, three severe of eight
    learned = np.array([0.5, -1.5])
    m = reward_metrics({"gym_oracle": oracle, "gym_anatomy": learned})
    assert m["reward_gym_oracle_severe_rate"] == 3 / 8
    assert m["reward_gym_oracle_mean"] == pytest.approx(-13 / 8) and m["reward_gym_anatomy_mean"] == pytest.approx(-0.5)
    assert "reward_gym_anatomy_severe_rate" not in reward_metrics({"gym_anatomy": learned})


@pytest.fixture
def stage_jobs(monkeypatch):
    """Bench stages run without Ray: each job config a stage composes is recorded (its run folder
    made, as a job would) instead of trained; the algorithms' schemas and checks stay real."""
    from pathlib import Path
    from types import SimpleNamespace

    from armature.platform import algorithms

    jobs, real = [], algorithms.get

    def run(job_cfg):
        jobs.append(job_cfg)
        Path(job_cfg.trainer.storage_path, job_cfg.tracking.run_name).mkdir(parents=True, exist_ok=True)
        return {"done": 1}

    monkeypatch.setattr(algorithms, "get", lambda name: SimpleNamespace(**{**vars(real(name)), "run": run}))
    return jobs


def test_a_bench_stage_done_is_kept_and_one_with_other_overrides_runs_afresh(tmp_path, stage_jobs):
    """The bench's ledger: a rerun in the same folder does not repeat a finished stage (same
    overrides: same metrics, seconds and folder, the job not called); other overrides run under another
    run name, so they never resume the first one's checkpoint."""
    from armature.jobs import gym_bench

    cfg = gym_bench.BenchConfig(out=str(tmp_path))
    logs = []
    first = gym_bench._stage(cfg, "ddpo", ["algo.num_epochs=2"], logs.append)
    again = gym_bench._stage(cfg, "ddpo", ["algo.num_epochs=2"], logs.append)
    other = gym_bench._stage(cfg, "ddpo", ["algo.num_epochs=3"], logs.append)
    ran = [job.tracking.run_name for job in stage_jobs]
    assert len(ran) == 2 and ran[0] != ran[1] and ran[0].startswith("bench-ddpo-")
    assert first[0] == {"done": 1} and again[0] == {"done": 1.0} and again[1:] == first[1:]
    assert other[2] != first[2] and "kept" in logs[1]
    ledger = json.loads((tmp_path / gym_bench.LEDGER).read_text())
    assert ledger["ddpo"]["folder"] == str(other[2])  # the latest run of the stage


def test_a_bench_stage_that_resumes_a_ledger_run_counts_its_earlier_seconds(tmp_path, stage_jobs):
    """A stage whose run folder the ledger already holds under other recorded overrides (an older
    bench's fixed ones) resumes that run's checkpoint: its seconds are the earlier run's plus this one's."""
    from armature.jobs import gym_bench

    cfg = gym_bench.BenchConfig(out=str(tmp_path))
    first = gym_bench._stage(cfg, "alignprop", ["algo.num_epochs=2"], print)
    path = tmp_path / gym_bench.LEDGER
    ledger = json.loads(path.read_text())
    ledger["alignprop"]["overrides"] = ledger["alignprop"]["overrides"][1:]  # as recorded by an older bench
    ledger["alignprop"]["seconds"] = 350.0
    path.write_text(json.dumps(ledger))
    again = gym_bench._stage(cfg, "alignprop", ["algo.num_epochs=2"], print)
    assert len(stage_jobs) == 2 and again[2] == first[2]  # run again, in the same folder
    assert 350.0 < again[1] < 350.0 + 60
    assert json.loads(path.read_text())["alignprop"]["seconds"] == again[1]


def test_each_bench_stage_runs_with_its_own_seed(tmp_path, stage_jobs):
    """The reward stages train scorer k from seed ``bench.seed + k``: the job gets that seed."""
    from armature.jobs import gym_bench

    cfg = gym_bench.BenchConfig(out=str(tmp_path), seed=5)
    gym_bench._stage(cfg, "reward-2", ["algo.num_epochs=1"], print, seed=7)
    gym_bench._stage(cfg, "ddpo", ["algo.num_epochs=1"], print)
    assert [job.trainer.seed for job in stage_jobs] == [7, 5]
