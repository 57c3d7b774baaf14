"""Checkpoints a job resumes from are never unpickled: a file planted in ``trainer.storage_path``
(a bucket every Ray pod can write on Kubernetes) must not run code, while the state the job
wrote itself still loads. The reward-model job's own end-to-end refusal and resume is in
tests/test_reward_model.py (test_conv_reward_model_job_resumes_refuses_a_planted_checkpoint_and_learns),
which already pays for that job's Ray Train runs."""

import os
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
    from armature.platform.checkpoints import load_torch_state as load_state

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


DEEPSPEED_RESUME = r"""
import os, sys, pickle, socket
from pathlib import Path
import torch

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from armature.platform.weights_only import load_deepspeed_checkpoint

out, marker = Path(sys.argv[1]), Path(sys.argv[2])

class Planted:
    def __reduce__(self):
        return (os.mkdir, (str(marker),))

def engine(seed, stage):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})[0]

for stage in (0, 2):
    saved = engine(0, stage)
    for _ in range(2):
        saved.backward(saved(torch.rand(2, 4)).sum())
        saved.step()
    saved.save_checkpoint(out / f"stage{stage}", tag="deepspeed")
    resumed = engine(1, stage)
    load_deepspeed_checkpoint(resumed, out / f"stage{stage}", load_module_strict=False)
    assert resumed.global_steps == 2, resumed.global_steps
    for (name, a), b in zip(saved.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    for path in sorted((out / f"stage{stage}" / "deepspeed").glob("*.pt")):
        real = path.read_bytes()
        torch.save({"module": Planted()}, path)
        try:
            load_deepspeed_checkpoint(engine(2, stage), out / f"stage{stage}", load_module_strict=False)
            raise SystemExit(f"{path.name}: a planted pickle was loaded")
        except ValueError as err:
            assert "refusing to unpickle" in str(err) and path.name in str(err), err
        path.write_bytes(real)
        print("refused", stage, path.name, flush=True)
"""


def test_deepspeed_resume_loads_its_own_state_and_refuses_a_planted_pickle(tmp_path):
    """DeepSpeed's own resume (every DDPO-family job's) through the weights-only checkpoint engine:
    ZeRO 0 and 2 state round-trips, and a pickle planted in place of the model or the optimizer
    state file is refused without running. In a subprocess: DeepSpeed sets up torch.distributed."""
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    script = tmp_path / "resume.py"
    script.write_text(DEEPSPEED_RESUME)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(marker)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    refused = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("refused")]
    assert refused == [
        ["0", "mp_rank_00_model_states.pt"],
        ["2", "mp_rank_00_model_states.pt"],
        ["2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
    ], out.stdout
    assert not marker.exists()
