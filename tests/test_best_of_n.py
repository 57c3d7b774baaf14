"""Best-of-N on sampler and reward actors: every score belongs to its image, the kept candidates
are each prompt's best, the kept mean is above the single-sample mean, candidates are
reproducible per seed, and (best, worst) pairs round-trip through the pair format."""

import numpy as np
import PIL.Image
import pytest

from armature.rewards import load
from armature.rewards.selection import best_of, rank_candidates

MODEL = {"family": "tiny", "tiny": {"seed": 0, "image_size": 16}, "lora": {"enabled": False}}
SAMPLING = {"num_steps": 3, "guidance_scale": 1.0, "eta": 1.0}


def test_ranking_rule():
    scores = np.array([[0.1, 0.5, np.nan, 0.5], [3.0, -1.0, 2.0, 2.5]])
    # explicit: sort by (-score, index) with NaN last
    expected = [sorted(range(4), key=lambda j: (np.isnan(r[j]), -np.nan_to_num(r[j]), j)) for r in scores]
    np.testing.assert_array_equal(rank_candidates(scores), expected)
    np.testing.assert_array_equal(best_of(scores[0], 2), [1, 3])


@pytest.fixture(scope="module")
def actors(ray_cluster):
    import ray

    from armature.actors import start_reward_actors, start_samplers

    samplers = start_samplers(2, MODEL, SAMPLING, seed=0, num_cpus=0.5, num_gpus=0, max_restarts=0, threads=1)
    rewards = start_reward_actors(
        1, {"brightness": {"weight": 2.0}, "colorfulness": {"weight": 1.0}}, num_cpus=0.5, num_gpus=0, max_restarts=0
    )
    yield samplers, rewards
    for actor in samplers + rewards:
        ray.kill(actor)


def test_best_of_n_keeps_each_prompts_best(actors, tmp_path):
    from armature.actors.best_of_n import best_of_n
    from armature.data.pairs import read_pairs, write_pairs

    samplers, rewards = actors
    prompts = ["a cat", "a dog", "a horse"]
    result = best_of_n(samplers, rewards, prompts, n=6, k=2, seed=3, batch_size=4)
    assert result.images.shape == (3, 6, 16, 16, 3) and result.scores.shape == (3, 6)

    # every score is its own image's: rescore here with plain reward objects
    brightness, colorfulness = load("brightness"), load("colorfulness")
    for i, prompt in enumerate(prompts):
        pil = [PIL.Image.fromarray(a) for a in result.images[i]]
        expected = 2.0 * brightness(pil, [prompt] * 6) + colorfulness(pil, [prompt] * 6)
        np.testing.assert_allclose(result.scores[i], expected, rtol=1e-5)
        np.testing.assert_allclose(result.components["colorfulness"][i], colorfulness(pil, [prompt] * 6), rtol=1e-5)
        top2 = sorted(result.scores[i], reverse=True)[:2]
        np.testing.assert_allclose(result.kept_scores[i], top2)
    summary = result.summary()
    assert summary["kept_reward_mean"] > summary["single_reward_mean"]
    assert summary["best_reward_mean"] >= summary["kept_reward_mean"]

    # the same seed gives the same candidates, whatever the batching
    again = best_of_n(samplers, rewards, prompts, n=6, k=2, seed=3, batch_size=5, keep_latents=True)
    np.testing.assert_array_equal(again.images, result.images)
    # keep_latents: each candidate's final latent decodes to its image
    import torch

    from armature.policies import build_policy

    assert again.latents.shape[:2] == (3, 6)
    policy = build_policy(MODEL, SAMPLING)
    decoded = policy.decode(torch.from_numpy(again.latents[1]))
    assert np.abs(decoded.astype(int) - again.images[1].astype(int)).max() <= 1

    # (best, worst) pairs in the pair format
    records = result.preference_pairs()
    assert len(records) == 3
    write_pairs(records, tmp_path / "pairs.parquet")
    table = read_pairs(tmp_path / "pairs.parquet").to_pylist()
    assert [r["prompt"] for r in table] == prompts and {r["label"] for r in table} == {"w"}
    from armature.data.pairs import decode_image

    for i, row in enumerate(table):
        np.testing.assert_array_equal(decode_image(row["image_w"]), result.images[i, result.order[i, 0]])
        np.testing.assert_array_equal(decode_image(row["image_l"]), result.images[i, result.order[i, -1]])


def test_bad_requests(actors):
    from armature.actors.best_of_n import best_of_n

    samplers, rewards = actors
    with pytest.raises(ValueError, match="1 <= k <= n"):
        best_of_n(samplers, rewards, ["a"], n=2, k=3)
    with pytest.raises(ValueError, match="at least one prompt"):
        best_of_n(samplers, rewards, [], n=2)


def test_bon_job_logs_kept_and_rejected_and_writes_pairs(ray_cluster, tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from armature.data.pairs import read_pairs
    from armature.jobs import bon
    from armature.platform.config import compose

    cfg = compose(
        "train",
        [
            "algo=bon",
            "model=tiny",
            "reward=brightness",
            "prompts.file=null",
            "algo.n=4",
            "algo.k=1",
            "algo.log_prompts=1",
            f"algo.pairs_path={tmp_path / 'pairs.parquet'}",
            "sampling.num_steps=3",
            "sampling.batch_size=8",
            "model.tiny.image_size=16",
            "cluster.sampler_num_cpus=0.5",
            "reward.num_cpus=0.5",
            "cluster.torch_threads=1",
            f"trainer.storage_path={tmp_path / 'ray'}",
            f"tracking.local_dir={tmp_path / 'track'}",
            "tracking.run_name=bon",
        ],
    )
    metrics = bon.run(cfg)
    assert metrics["candidates"] == 16 and metrics["best_reward_mean"] > metrics["single_reward_mean"]
    info = json.loads((tmp_path / "ray" / "bon" / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["kept_reward_mean"] == pytest.approx(metrics["kept_reward_mean"])
    files = {a.path for a in client.list_artifacts(run.info.run_id, "candidates")}
    assert files == {"candidates/prompt_000_kept.png", "candidates/prompt_000_rejected.png"}
    table = json.loads(
        client.download_artifacts(run.info.run_id, "candidates.json", str(tmp_path))
        and (tmp_path / "candidates.json").read_text()
    )
    assert len(table) == 16 and sum(r["kept"] for r in table) == 4
    for i in range(4):  # the kept candidate is each prompt's highest reward
        rows = [r for r in table if r["prompt_index"] == i]
        assert max(rows, key=lambda r: r["reward"])["kept"]
    assert read_pairs(tmp_path / "pairs.parquet").num_rows == metrics["pairs_written"] == 4


def test_bon_config_checks():
    from armature.platform.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"algo.n=2, algo.k=3"):
        compose("train", ["algo=bon", "algo.n=2", "algo.k=3"])
