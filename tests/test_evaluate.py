"""The evaluation runner: AER / RSI math, the oracle as a reward and judge, suites, the job."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from armature.jobs.evaluate import load_suite, markdown, summarize
from armature.losses.evaluation import (
    anatomical_error_rate,
    best_of_n_expectation,
    pairwise_decisions,
    ranking_auc,
    relative_superiority_index,
)


def test_aer_and_rsi_against_counting_by_hand():
    passed = [True, False, False, True, True, False, True, True]
    assert anatomical_error_rate(passed) == pytest.approx(3 / 8)
    assert math.isnan(anatomical_error_rate([]))
    ours = [0.0, -3.0, -1.0, 0.0, -2.0, 0.0]
    base = [-3.0, -3.0, 0.0, 0.0, -1.0, -0.05]
    decisions = pairwise_decisions(ours, base, tie_tolerance=0.1)
    assert decisions.tolist() == [1, 0, -1, 0, -1, 0]
    wins = ties = losses = 0
    for a, b in zip(ours, base):  # eq. 8 counted directly
        if abs(a - b) <= 0.1:
            ties += 1
        elif a > b:
            wins += 1
        else:
            losses += 1
    result = relative_superiority_index(decisions)
    assert (result["wins"], result["ties"], result["losses"]) == (wins, ties, losses) == (1, 3, 2)
    assert result["rsi"] == pytest.approx((1 + 3) / (2 + 3))
    assert relative_superiority_index([1, 1])["rsi"] == math.inf
    with pytest.raises(ValueError, match="pair up"):
        pairwise_decisions([1.0], [1.0, 2.0])


def test_gym_oracle_reward_is_minus_severity_at_any_size():
    from armature.gym import render, sample_defective
    from armature.rewards import load

    reward = load("gym_oracle")
    rng = np.random.default_rng(3)
    intact, broken = sample_defective(rng, "missing")
    images = [
        Image.fromarray(render(intact)),
        Image.fromarray(render(broken)),
        Image.fromarray(render(broken)).resize((128, 128), Image.NEAREST),
    ]
    scores = reward(images, [intact.prompt] * 3)
    assert scores.tolist() == [0.0, -reward.last_verdicts[1].severity, -reward.last_verdicts[1].severity]
    assert scores[1] <= -2


def test_suites(tmp_path):
    from armature.gym.figures import POSES

    gym = load_suite("gym")
    assert len(gym) == len(POSES) and gym[0] == (POSES["standing"][0], "standing")
    (tmp_path / "s.jsonl").write_text('{"prompt": "a hand waving", "category": "gestures"}\n\n{"prompt": "a man"}\n')
    assert load_suite(str(tmp_path / "s.jsonl")) == [("a hand waving", "gestures"), ("a man", "all")]
    (tmp_path / "s.txt").write_text("a runner\na dancer\n")
    assert load_suite(str(tmp_path / "s.txt")) == [("a runner", "all"), ("a dancer", "all")]
    (tmp_path / "bad.jsonl").write_text('{"category": "x"}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_suite(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="algo.suite"):
        load_suite(str(tmp_path / "missing.jsonl"))


def test_summary_rows():
    base = np.array([[0.0, -3.0], [-1.0, 0.0], [-3.0, -3.0]])  # 3 prompts x 2 samples
    tuned = np.array([[0.0, 0.0], [-1.0, -3.0], [0.0, -3.0]])
    rows = summarize(
        {"base": base, "tuned": tuned},
        ["a", "a", "b"],
        threshold=0.0,
        tie_tolerance=0.0,
        components={"base": {"gym_oracle": base}, "tuned": {"gym_oracle": tuned}},
    )
    assert rows[0]["aer"] == pytest.approx(4 / 6) and rows[1]["aer"] == pytest.approx(3 / 6)
    assert rows[0]["aer/a"] == pytest.approx(2 / 4) and rows[0]["aer/b"] == 1.0 and rows[1]["aer/b"] == 0.5
    # tuned vs base per (prompt, seed): tie, win, tie, lose, win, tie
    assert (rows[1]["rsi_wins"], rows[1]["rsi_ties"], rows[1]["rsi_losses"]) == (2, 3, 1)
    assert rows[1]["rsi"] == pytest.approx(5 / 4) and "rsi" not in rows[0]
    assert rows[1]["mean/gym_oracle"] == pytest.approx(tuned.mean())
    assert markdown(rows).splitlines()[0].startswith("| policy | samples | aer |")


def test_best_of_n_selection_by_hand():
    """2 prompts x 2 groups of 3 candidates; N=2 picks in each group the better of the first two by
    the selector, N=3 the best of three; every component follows the pick."""
    from armature.jobs.evaluate import select_best_of

    sel = np.array([[0.1, 0.5, 0.9, 0.3, 0.2, 0.1], [0.0, 0.0, 1.0, 0.7, 0.8, 0.6]])
    judge = np.arange(12, dtype=float).reshape(2, 6)
    one = select_best_of({"s": sel, "j": judge}, "s", samples=2, n=1)
    two = select_best_of({"s": sel, "j": judge}, "s", samples=2, n=2)
    three = select_best_of({"s": sel, "j": judge}, "s", samples=2, n=3)
    assert one["j"].tolist() == [[0, 3], [6, 9]]  # each group's first candidate
    assert two["j"].tolist() == [[1, 3], [6, 10]]  # ties keep the first (argmax)
    assert three["j"].tolist() == [[2, 3], [8, 10]]
    assert three["s"].tolist() == [[0.9, 0.3], [1.0, 0.8]]
    rows = summarize(
        {"x": np.array([[0.0, -3.0, -1.0]])},
        ["c"],
        threshold=0.0,
        tie_tolerance=0.0,
        components={"x": {}},
        severe_at=-3.0,
    )
    assert rows[0]["severe_rate"] == pytest.approx(1 / 3) and rows[0]["aer"] == pytest.approx(2 / 3)


def test_pool_expectation_against_every_subset():
    """Best-of-N over a prompt's whole pool: the mean, over every N-subset of each prompt's
    candidates, of the judge at the selector's best (and of judge <= severe_at), then over prompts."""
    from itertools import combinations

    from armature.jobs.evaluate import pool_expectation

    rng = np.random.default_rng(3)
    sel = rng.normal(size=(3, 7))
    judge = -rng.integers(0, 4, size=(3, 7)).astype(float)  # minus a severity 0..3
    for n in (1, 3, 7):
        picks = [[judge[p][list(c)][np.argmax(sel[p][list(c)])] for c in combinations(range(7), n)] for p in range(3)]
        got = pool_expectation(sel, judge, n, severe_at=-3.0)
        assert got["pool/judge"] == pytest.approx(np.mean([np.mean(x) for x in picks]))
        assert got["pool/severe_rate"] == pytest.approx(np.mean([np.mean(np.array(x) <= -3.0) for x in picks]))
    assert pool_expectation(sel, judge, 1, -3.0)["pool/severe_rate"] == pytest.approx(np.mean(judge <= -3.0))


def test_eval_job_two_policies(ray_cluster, tmp_path):
    """Two policies on one suite: the same base model twice ties everywhere (RSI 1, equal AER);
    a perturbed adapter is compared on every (prompt, seed)."""
    import torch
    from mlflow.tracking import MlflowClient

    from armature.jobs import evaluate
    from armature.platform.config import compose
    from armature.policies import build_policy

    trained = build_policy(
        {"family": "tiny", "tiny": {"image_size": 16}, "lora": {"enabled": True, "rank": 2}}, {"num_steps": 3}
    )
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))
    adapter = trained.save_adapter(tmp_path / "adapter")
    suite = tmp_path / "suite.jsonl"
    suite.write_text("\n".join(json.dumps({"prompt": f"a person {i}", "category": "ab"[i % 2]}) for i in range(4)))
    cfg = compose(
        "train",
        [
            "algo=eval",
            "model=tiny",
            "reward=gym_oracle",
            "+reward.components.brightness={weight: 0.0}",
            "+reward.components.colorfulness={weight: 0.0}",
            "algo.best_of=[1,2]",
            "algo.selector=colorfulness",
            "algo.judge=brightness",
            "algo.threshold=0.5",
            f"algo.suite={suite}",
            "algo.samples_per_prompt=2",
            "+algo.policies.same=null",
            f"+algo.policies.tuned={adapter}",
            "sampling.num_steps=3",
            "sampling.batch_size=8",
            "model.tiny.image_size=16",
            "cluster.sampler_num_cpus=0.5",
            "reward.num_cpus=0.5",
            "cluster.torch_threads=1",
            f"trainer.storage_path={tmp_path / 'ray'}",
            f"tracking.local_dir={tmp_path / 'track'}",
            "tracking.run_name=ev",
        ],
    )
    evaluate.run(cfg)
    info = json.loads((tmp_path / "ray" / "ev" / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    client.download_artifacts(info["mlflow_run_id"], "eval.json", str(tmp_path))
    rows = {r["policy"]: r for r in json.loads((tmp_path / "eval.json").read_text())}
    assert list(rows) == ["base", "base+bon2", "same", "same+bon2", "tuned", "tuned+bon2"]
    assert all(r["samples"] == 8 for r in rows.values())
    for name in ("base", "tuned"):  # the best of two by the selector, on the same draws
        assert rows[f"{name}+bon2"]["mean/colorfulness"] > rows[name]["mean/colorfulness"]
        assert rows[f"{name}+bon2"]["sample_s"] == pytest.approx(2 * rows[name]["sample_s"])
    assert rows["same"]["rsi_ties"] == 8 and rows["same"]["rsi"] == 1.0
    assert rows["same"]["aer"] == rows["base"]["aer"] and rows["same"]["aer/a"] == rows["base"]["aer/a"]
    assert rows["tuned"]["rsi_wins"] + rows["tuned"]["rsi_ties"] + rows["tuned"]["rsi_losses"] == 8
    assert rows["tuned"]["mean/brightness"] != rows["base"]["mean/brightness"]  # the adapter was loaded
    assert rows["base"]["mean/gym_oracle"] == -3.0  # a random model draws no figure: severe
    for name in rows:  # the pool estimate (its math: test_pool_expectation_against_every_subset) is in every row
        assert 0.0 < rows[name]["pool/judge"] < 1.0  # a mean brightness
        assert rows[name]["pool/severe_rate"] == 0.0  # brightness is never <= algo.severe_at (-3)
    assert client.get_run(info["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_best_of_n_expectation_matches_every_subset(n):
    """Against brute force over all n-subsets of a pool of 7: the judged value of the pick, and
    with values = scores the expected maximum."""
    import itertools

    rng = np.random.default_rng(n)
    scores, values = rng.normal(size=7), rng.integers(0, 4, size=7).astype(float)
    subsets = [list(s) for s in itertools.combinations(range(7), n)]
    assert best_of_n_expectation(scores, values, n) == pytest.approx(
        np.mean([values[s][np.argmax(scores[s])] for s in subsets])
    )
    assert best_of_n_expectation(scores, scores, n) == pytest.approx(np.mean([scores[s].max() for s in subsets]))
    with pytest.raises(ValueError, match="candidates"):
        best_of_n_expectation(scores, values, 8)


def test_ranking_auc_counts_pairs():
    scores, bad = np.array([0.1, 0.4, 0.35, 0.8]), np.array([True, False, True, False])
    assert ranking_auc(scores, bad) == 1.0  # both bad ones below both good ones
    assert ranking_auc(-scores, bad) == 0.0
    assert ranking_auc(np.zeros(4), bad) == 0.5  # all ties
    assert ranking_auc(np.array([0.2, 0.1, 0.5]), np.array([True, False, False])) == 0.5  # 1 of 2 pairs
    assert np.isnan(ranking_auc(scores, np.zeros(4, dtype=bool)))


def test_gym_reward_ranking_refuses_bad_flags_before_sampling(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gym_reward_ranking.py"
    run = subprocess.run(
        [sys.executable, str(script), "--scorer", str(tmp_path), "--per-prompt", "8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "--per-prompt" in run.stderr and "--ns" in run.stderr
    run = subprocess.run(
        [sys.executable, str(script), "--scorer", str(tmp_path), "--ns", "1", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "--scorer" in run.stderr and "scorer.json" in run.stderr
