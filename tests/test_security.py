"""Checkpoints a job resumes from are never unpickled: a file planted in ``trainer.storage_path``
(a bucket every Ray pod can write on Kubernetes) must not run code, while the state the job
wrote itself still loads."""

import os
import shutil
from pathlib import Path

import pytest
import torch


class Planted:
    """What an attacker writes: unpickling it would create ``marker`` (any command would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _real_state():
    """A training state as ``reward_model.train_loop`` saves it: scorer, AdamW after a step, epoch."""
    from armature.rewards.conv_scorer import ConvNet

    torch.manual_seed(0)
    scorer = ConvNet((8, 16))
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3)
    scorer(torch.rand(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    return scorer, optimizer, {"scorer": scorer.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}


def test_reward_model_state_loads_and_a_planted_pickle_is_refused(tmp_path):
    from armature.jobs.reward_model import load_state

    scorer, optimizer, state = _real_state()
    torch.save(state, tmp_path / "armature_state.pt")
    loaded = load_state(tmp_path / "armature_state.pt")
    assert loaded["epoch"] == 3
    assert loaded["scorer"].keys() == state["scorer"].keys()
    assert all(torch.equal(loaded["scorer"][k], v) for k, v in state["scorer"].items())
    fresh = torch.optim.AdamW(scorer.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])  # what resuming does with it
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]

    marker = tmp_path / "pwned"
    torch.save({"scorer": Planted(marker), "epoch": 0}, tmp_path / "planted.pt")
    with pytest.raises(ValueError, match=r"planted\.pt.*refusing to unpickle"):
        load_state(tmp_path / "planted.pt")
    assert not marker.exists()


@pytest.mark.slow
def test_reward_model_job_does_not_run_a_planted_checkpoint(ray_cluster, tmp_path):
    """End to end: a rerun resumes from the job's own checkpoint, and refuses (clear error, no code
    run) the same checkpoint with its state file replaced by a planted pickle."""
    from ray.train.v2.api.exceptions import TrainingFailedError

    from armature.jobs import reward_model
    from armature.jobs.reward_model import STATE_FILE
    from armature.platform.config import compose

    def run(epochs):
        cfg = compose("train", ["algo=reward_model", "tracking.run_name=rm", "data.image_size=16",
                                "data.synthetic_pairs=32", "data.heldout_fraction=0.25", f"algo.num_epochs={epochs}",
                                "algo.backbone=conv", "algo.conv_widths=[8,16]", f"tracking.local_dir={tmp_path}/runs",
                                f"trainer.storage_path={tmp_path}/ray"])
        return reward_model.run(cfg)

    assert run(1)["epoch"] == 0
    [state_file] = sorted((tmp_path / "ray" / "rm").glob(f"checkpoint_*/{STATE_FILE}"))
    shutil.copy(state_file, tmp_path / "real.pt")
    marker = tmp_path / "pwned"
    torch.save({"scorer": Planted(marker), "epoch": 0}, state_file)
    with pytest.raises(TrainingFailedError, match="refusing to unpickle"):
        run(2)
    assert not marker.exists()

    shutil.copy(tmp_path / "real.pt", state_file)
    assert run(2)["epoch"] == 1  # resumed after epoch 0: one more epoch, not two
