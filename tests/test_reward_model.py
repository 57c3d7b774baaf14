"""Reward-model job pieces (choice sets, severity orientation, the saved scorer as the `learned`
reward) and, slow, the job end to end: train on synthetic pairs, evaluate on other drawings."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from armature.jobs.reward_model import RewardModelConfig
from armature.losses.reward_model import bradley_terry_loss, listwise_loss


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    from armature.policies.tiny import build_char_tokenizer
    from armature.rewards.clip_score import build_tiny_clip

    return build_tiny_clip(str(tmp_path_factory.mktemp("backbone")), build_char_tokenizer(32))


def _batch(n=5, seed=0):
    rng = np.random.default_rng(seed)
    w = torch.tensor(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    w[1] = w[0]  # pairs 0, 1, 2 share a prompt and a chosen image: one choice set of 4
    w[2] = w[0]
    return {
        "pixels_w": w,
        "pixels_l": torch.tensor(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)),
        "prompt": ["a cat", "a cat", "a cat", "a dog", "a dog"],
        "tie": torch.tensor([False, False, False, False, True]),
        "severity_w": torch.tensor([0, 0, 0, -1, 1]),
        "severity_l": torch.tensor([3, 1, 2, -1, 1]),
    }


def test_choice_sets():
    from armature.jobs.reward_model import choice_sets

    assert sorted(choice_sets(_batch(), 4)) == [(0, [0, 1, 2]), (3, [3])]  # the tie (row 4) is left out
    assert sorted(choice_sets(_batch(), 2)) == [(0, [0]), (3, [3])]


def test_batch_losses_match_the_loss_functions(tiny_backbone):
    from armature.jobs.reward_model import Scorer, batch_loss

    torch.manual_seed(0)
    scorer = Scorer(tiny_backbone, None).eval()
    batch = _batch()
    with torch.no_grad():
        s_w = scorer(batch["pixels_w"], batch["prompt"])
        s_l = scorer(batch["pixels_l"], batch["prompt"])
    algo = RewardModelConfig(loss="bradley_terry", max_choices=4, severity_weight=0.0)
    loss, _ = batch_loss(scorer, batch, algo)
    assert loss.item() == pytest.approx(bradley_terry_loss(s_w, s_l, batch["tie"]).item(), rel=1e-5)
    loss, info = batch_loss(scorer, batch, replace(algo, loss="listwise"))
    # set 1: chosen w0 among {w0, l0, l1, l2}; set 2: w3 among {w3, l3}; averaged
    first = -s_w[0] + torch.logsumexp(torch.stack([s_w[0], s_l[0], s_l[1], s_l[2]]), 0)
    second = -s_w[3] + torch.logsumexp(torch.stack([s_w[3], s_l[3]]), 0)
    assert loss.item() == pytest.approx(((first + second) / 2).item(), rel=1e-5)
    assert info["choice_set_size"] == pytest.approx(3.0)
    assert listwise_loss(torch.stack([s_w[3:4], s_l[3:4]], 1), torch.tensor([0])).item() == pytest.approx(
        second.item(), rel=1e-5
    )
    loss_sev, info = batch_loss(scorer, batch, replace(algo, severity_weight=0.5))
    assert loss_sev.item() == pytest.approx(info["ranking_loss"] + 0.5 * info["ordinal_loss"], rel=1e-5)


def test_severity_follows_the_preferred_image(tmp_path):
    import pyarrow.parquet as pq

    from armature.data.pairs import encode_image, write_pairs
    from armature.jobs.reward_model import prepare_with_severity

    image = lambda v: encode_image(np.full((8, 8, 3), v, np.uint8))  # noqa: E731
    write_pairs(
        [
            {
                "pair_id": "a",
                "prompt": "x",
                "image_w": image(10),
                "image_l": image(20),
                "label": "w",
                "severity_w": 0,
                "severity_l": 3,
            },
            {
                "pair_id": "b",
                "prompt": "x",
                "image_w": image(10),
                "image_l": image(20),
                "label": "l",
                "severity_w": 2,
                "severity_l": 1,
            },
            {"pair_id": "c", "prompt": "x", "image_w": image(10), "image_l": image(20), "label": "tie"},
        ],
        tmp_path / "p.parquet",
    )
    out = prepare_with_severity(pq.read_table(tmp_path / "p.parquet"), 8, str(tmp_path / "q"), True, 0.0)
    assert list(out["pair_id"]) == ["a", "b", "c"]
    assert out["severity_w"].tolist() == [0, 1, -1] and out["severity_l"].tolist() == [3, 2, -1]
    assert out["pixels_w"][1, 0, 0, 0] == 20  # label l: the images swapped with their severities


def test_saved_scorer_is_the_learned_reward(tiny_backbone, tmp_path):
    from PIL import Image

    from armature.jobs.reward_model import Scorer, save_scorer
    from armature.rewards import load

    scorer = Scorer(tiny_backbone, None)
    with torch.no_grad():  # move the weights off their initial values
        scorer.clip.visual_projection.weight.add_(0.1)
    folder = save_scorer(scorer, tmp_path / "scorer", tiny_backbone, RewardModelConfig(severity_weight=1.0))
    reward = load("learned", path=str(folder))
    pixels = _batch()["pixels_w"][3:5]
    with torch.no_grad():
        expected = scorer.eval()(pixels, ["a dog", "a cat"]).numpy()
    got = reward([Image.fromarray(p.numpy()) for p in pixels], ["a dog", "a cat"])
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert len(reward.severity_thresholds) == 3
    with pytest.raises(FileNotFoundError, match="scorer.json"):
        load("learned", path=str(tmp_path))


class Planted:
    """What an attacker writes into ``trainer.storage_path``: unpickling it would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _overrides(epochs: int, backbone: str) -> list[str]:
    """`armature train algo=reward_model` on synthetic pairs (ties kept, ordinal head on)."""
    extra = ["algo.backbone=conv", "algo.conv_widths=[16,32]", "algo.learning_rate=1e-3"] if backbone == "conv" else []
    return [
        "algo=reward_model",
        "data.keep_ties=true",
        "data.image_size=32",
        "data.synthetic_pairs=128",
        "data.heldout_fraction=0.2",
        f"algo.num_epochs={epochs}",
        "algo.severity_weight=0.2",
        *extra,
    ]


def _reward_model_job(tmp_path, epochs: int, backbone: str) -> dict:
    """One reward-model job run in this process; returns its last epoch's metrics."""
    from armature.jobs import reward_model
    from armature.platform.config import compose

    cfg = compose(
        "train",
        [
            *_overrides(epochs, backbone),
            f"tracking.run_name=rm-{backbone}",
            f"tracking.local_dir={tmp_path}/runs",
            f"trainer.storage_path={tmp_path}/ray",
        ],
    )
    return reward_model.run(cfg)


@pytest.fixture(scope="module")
def tiny_clip_job(train_job, tmp_path_factory):
    """The tiny CLIP scorer's job (4 epochs) as `armature train`, started in the background when
    first asked for: the conv scorer's test asks first and runs its own jobs meanwhile."""
    tmp = tmp_path_factory.mktemp("rm-tiny")
    return tmp, train_job.start(tmp, "rm-tiny", *_overrides(4, "tiny"))


@pytest.mark.slow
def test_conv_reward_model_job_resumes_refuses_a_planted_checkpoint_and_learns(ray_cluster, tmp_path, tiny_clip_job):
    """The convolutional scorer's job, stopped after its first epoch: a rerun refuses (clear error,
    no code run) that checkpoint with its state file replaced by a planted pickle (checkpoints may
    sit in a bucket others can write); with the job's own state back, it resumes after epoch 0,
    trains the one epoch left (not two), and held-out accuracy ends well above chance.
    (``tiny_clip_job`` only starts the next test's job, to run beside these.)"""
    import json
    import shutil

    from ray.train.v2.api.exceptions import TrainingFailedError

    from armature.platform.checkpoints import TORCH_STATE_FILE

    assert _reward_model_job(tmp_path, 1, "conv")["epoch"] == 0
    [state_file] = sorted((tmp_path / "ray" / "rm-conv").glob(f"checkpoint_*/{TORCH_STATE_FILE}"))
    shutil.copy(state_file, tmp_path / "real.pt")
    marker = tmp_path / "pwned"
    torch.save({"scorer": Planted(marker), "epoch": 0}, state_file)
    with pytest.raises(TrainingFailedError, match="refusing to unpickle"):
        _reward_model_job(tmp_path, 2, "conv")
    assert not marker.exists()

    shutil.copy(tmp_path / "real.pt", state_file)
    metrics = _reward_model_job(tmp_path, 2, "conv")
    assert metrics["epoch"] == 1, metrics
    from mlflow.tracking import MlflowClient

    info = json.loads((tmp_path / "ray" / "rm-conv" / "armature_run.json").read_text())
    logged = MlflowClient(info["tracking_uri"]).get_metric_history(info["mlflow_run_id"], "epoch")
    assert sorted(m.step for m in logged) == [0, 1]  # one MLflow run; epoch 0 not trained again
    assert metrics["data_heldout_pairs"] >= 50 and metrics["heldout_acc"] > 0.7, metrics
    meta = json.loads((tmp_path / "ray" / "rm-conv" / "scorer" / "scorer.json").read_text())
    assert meta["kind"] == "conv"


@pytest.mark.slow
def test_reward_model_job_learns_with_the_tiny_clip(tiny_clip_job):
    """Train the tiny CLIP scorer on synthetic pairs: held-out accuracy well above chance."""
    import json

    tmp, wait = tiny_clip_job
    run = wait()
    heldout = run.history("heldout_acc")
    assert len(heldout) == 4 and run.history("data_heldout_pairs")[-1] >= 50 and heldout[-1] > 0.7, heldout
    meta = json.loads((tmp / "ray" / "rm-tiny" / "scorer" / "scorer.json").read_text())
    assert meta["kind"] == "clip_similarity"


@pytest.mark.slow
def test_reward_eval_job_logs_a_table(ray_cluster, tmp_path, tiny_backbone):
    """Three rewards (one a saved scorer loaded as `learned`) in actors on synthetic pairs."""
    import mlflow

    from armature.jobs import reward_eval
    from armature.jobs.reward_model import Scorer, save_scorer
    from armature.platform.config import compose

    scorer = save_scorer(
        Scorer(tiny_backbone, None),
        tmp_path / "scorer",
        tiny_backbone,
        RewardModelConfig(severity_weight=0.0),
    )
    cfg = compose(
        "train",
        [
            "algo=reward_eval",
            "tracking.run_name=ev",
            "data.synthetic_pairs=32",
            "data.image_size=32",
            "~algo.rewards",
            f"+algo.rewards={{learned: {{learned: {{path: {scorer}}}}}, "
            "small: {compressibility: {}}, large: {incompressibility: {}}}",
            f"tracking.local_dir={tmp_path}/runs",
            f"trainer.storage_path={tmp_path}/ray",
        ],
    )
    metrics = reward_eval.run(cfg)
    assert metrics["learned/pairs"] > 50
    # compressibility and incompressibility are one score with opposite signs: they never order
    # a pair alike, and their accuracies add up to 1 less the pairs of equal JPEG size
    assert 0.9 <= metrics["small/acc"] + metrics["large/acc"] <= 1.0
    assert metrics["agreement/small:large"] == 0.0
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("armature").experiment_id], "tags.mlflow.runName = 'ev'")[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"reward_eval.md", "reward_eval.json"}


def test_conv_scorer_is_the_learned_reward_and_differentiable(tmp_path):
    """``algo.backbone=conv``: the saved folder loads as the ``learned`` reward with the same
    scores; prompts do not matter; gradients reach the pixels."""
    import json

    from PIL import Image

    from armature.jobs.reward_model import Scorer, batch_loss, save_scorer
    from armature.rewards import load

    torch.manual_seed(0)
    scorer = Scorer("conv", None, conv_widths=(8, 16), image_size=32).eval()
    batch = _batch()
    loss, _ = batch_loss(scorer, batch, RewardModelConfig(loss="bradley_terry", max_choices=4, severity_weight=0.0))
    with torch.no_grad():
        s_w, s_l = scorer(batch["pixels_w"], batch["prompt"]), scorer(batch["pixels_l"], ["x"] * 5)
    assert loss.item() == pytest.approx(bradley_terry_loss(s_w, s_l, batch["tie"]).item(), rel=1e-5)
    folder = save_scorer(scorer, tmp_path / "scorer", "conv", RewardModelConfig(severity_weight=0.0))
    assert json.loads((folder / "scorer.json").read_text())["widths"] == [8, 16]
    reward = load("learned", path=str(folder))
    pixels = batch["pixels_w"][3:5]
    got = reward([Image.fromarray(p.numpy()) for p in pixels], ["a dog", "a cat"])
    np.testing.assert_allclose(got, s_w[3:5].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(reward([Image.fromarray(p.numpy()) for p in pixels], ["", "x"]), got)
    images = (pixels.permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    reward.score_tensor(images, ["a", "b"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.net.parameters())
    (folder / "conv.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="conv.safetensors"):
        load("learned", path=str(folder))
    with pytest.raises(ValueError, match="algo.conv_widths"):
        Scorer("conv", None, conv_widths=(8, 12))


def test_a_list_of_scorer_paths_is_the_mean_of_their_scores(tmp_path):
    """``learned`` with several paths (the gym bench's seed ensemble): each image's score is the
    mean of what each scorer, loaded alone, gives it; still differentiable; an empty list is refused."""
    from PIL import Image

    from armature.jobs.reward_model import Scorer, save_scorer
    from armature.rewards import load

    folders = []
    for seed in range(3):
        torch.manual_seed(seed)
        scorer = Scorer("conv", None, conv_widths=(8, 16), image_size=32).eval()
        folders.append(
            str(
                save_scorer(
                    scorer,
                    tmp_path / f"s{seed}",
                    "conv",
                    RewardModelConfig(severity_weight=0.0),
                )
            )
        )
    pixels = _batch()["pixels_w"]
    images = [Image.fromarray(p.numpy()) for p in pixels]
    alone = np.stack([load("learned", path=f)(images, ["x"] * len(images)) for f in folders])
    ensemble = load("learned", path=folders)
    assert alone.std(0).min() > 0  # the members disagree, so the mean is a real test
    np.testing.assert_allclose(ensemble(images, ["x"] * len(images)), alone.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(load("learned", path=folders[:1])(images, ["x"] * len(images)), alone[0], rtol=1e-6)
    tensor = (pixels.permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    ensemble.score_tensor(tensor, ["x"] * len(images)).sum().backward()
    assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="empty list"):
        load("learned", path=[])
