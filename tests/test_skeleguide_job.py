"""SkeleGuide's three-phase job (armature/jobs/skeleguide.py): the phases' losses and what each
phase trains (no Ray), and end to end on Ray Train + DeepSpeed: killed after a checkpoint,
rerun, resumed, every step logged once, the pipeline saved and registered."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from armature.platform.config import ConfigError, compose


def _cfg(*overrides):
    return compose("train", ["algo=skeleguide", "model=tiny_skeleguide", *overrides])


def test_epochs_never_span_two_phases():
    from armature.jobs.skeleguide import SkeleGuideConfig, epoch_plan

    algo = SkeleGuideConfig(phase1_steps=5, phase2_steps=0, phase3_steps=4, steps_per_epoch=2)
    assert epoch_plan(algo) == [(1, 0, 2), (1, 2, 2), (1, 4, 1), (3, 5, 2), (3, 7, 2)]


def test_config_is_checked_before_ray_starts():
    from armature.jobs.skeleguide import check

    with pytest.raises(ConfigError, match="model.family=tiny: SkeleGuide runs on a FLUX-Kontext-style DiT"):
        compose("train", ["algo=skeleguide", "model=tiny"])
    with pytest.raises(ConfigError, match="algo.layout_estimate=middle"):
        _cfg("algo.layout_estimate=middle")
    with pytest.raises(ConfigError, match="model.pretrained is unset"):
        _cfg("model.family=flux_kontext")
    assert check(_cfg()) == []


@pytest.fixture(scope="module")
def setup():
    from armature.jobs.skeleguide import _batch, _triple_source, pipeline_params
    from armature.policies.skeleguide import ADAPTERS, SkeleGuidePipeline

    c = OmegaConf.to_object(_cfg())
    pipe = SkeleGuidePipeline.build(pipeline_params(c))
    pipe.set_trainable(ADAPTERS)
    with torch.no_grad():  # B = 0 at initialisation would block every gradient to A
        for p in pipe.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    batch = _batch(pipe, _triple_source(c.algo, 0)(0, 0, 2))
    return pipe, batch, c.algo


def _grads(pipe, loss):
    from armature.policies.skeleguide import ADAPTERS

    loss.backward()
    out = {
        a: sum(float(p.grad.abs().sum()) for p in pipe.adapter_parameters(a) if p.grad is not None) for a in ADAPTERS
    }
    for p in pipe.transformer.parameters():
        p.grad = None
    return out


@pytest.mark.parametrize("phase,trained", [(1, {"skeletal"}), (2, {"skeletal", "appearance"}), (3, {"appearance"})])
def test_each_phase_trains_its_adapters_only(setup, phase, trained):
    from armature.jobs.skeleguide import _freeze, phase_loss

    pipe, batch, algo = setup
    _freeze(pipe, phase)
    loss, terms = phase_loss(pipe, batch, phase, algo, torch.Generator().manual_seed(0))
    grads = _grads(pipe, loss)
    assert {a for a, g in grads.items() if g > 0} == trained, grads
    assert (
        set(terms) == {1: {"reason_loss"}, 2: {"reason_loss", "render_loss", "layout_error"}, 3: {"render_loss"}}[phase]
    )
    if phase == 2:
        assert loss.item() == pytest.approx(0.5 * terms["reason_loss"] + terms["render_loss"], rel=1e-5)


@pytest.mark.parametrize("estimate", ["noise", "shared"])
def test_phase2_render_loss_reaches_the_reasoner_through_the_predicted_layout(setup, estimate):
    from armature.jobs.skeleguide import _freeze, phase_loss

    pipe, batch, algo = setup
    _freeze(pipe, 2)
    only_render = dataclasses.replace(algo, lambda_reason=0.0, layout_estimate=estimate)
    loss, terms = phase_loss(pipe, batch, 2, only_render, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(terms["render_loss"], rel=1e-6)
    grads = _grads(pipe, loss)
    assert grads["skeletal"] > 0 and grads["appearance"] > 0  # gradients flow through M_hat (eq. 6)


# ---------------------------------------------------------------------------- end to end
STEPS = (3, 3, 3)


def _command(tmp: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "armature.jobs.skeleguide",
        f"algo.phase1_steps={STEPS[0]}",
        f"algo.phase2_steps={STEPS[1]}",
        f"algo.phase3_steps={STEPS[2]}",
        "algo.steps_per_epoch=1",
        "algo.train_batch_size=2",
        "algo.heldout_triples=2",
        "algo.sample_steps=2",
        "trainer.num_workers=1",
        "trainer.cpus_per_worker=1",
        "cluster.torch_threads=1",
        f"trainer.storage_path={tmp / 'ray'}",
        f"tracking.local_dir={tmp / 'track'}",
        "tracking.run_name=sg",
        "tracking.images_per_grid=6",
    ]


def _registered_epochs(snapshot: Path) -> list[int]:
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []
    return [r["metrics"]["epoch"] for r in results]


@pytest.mark.slow
def test_three_phases_killed_after_a_checkpoint_resume(ray_cluster, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "ray" / "sg"
    epochs, steps = sum(STEPS), sum(STEPS)

    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(_command(tmp_path), env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if _registered_epochs(snapshot):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it was killed: " + (tmp_path / "run1.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    registered = _registered_epochs(snapshot)
    assert registered and max(registered) < epochs - 1, registered

    done = subprocess.run(_command(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    resumed = int(out.split("resumed from the checkpoint of epoch ")[1].split()[0])
    assert resumed == max(registered)
    assert f"epoch {resumed + 1}/{epochs} " not in out and f"epoch {epochs}/{epochs} " in out

    from mlflow.tracking import MlflowClient

    info = json.loads((run_dir / "armature_run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    run_id = info["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    history = lambda key: sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)  # noqa: E731
    assert [m.step for m in history("step/loss")] == list(range(steps))  # every step once
    assert [m.value for m in history("step/phase")] == [1.0] * 3 + [2.0] * 3 + [3.0] * 3
    assert [m.step for m in history("step/reason_loss")] == list(range(6))  # phases 1 and 2
    assert [m.step for m in history("step/render_loss")] == list(range(3, 9))  # phases 2 and 3
    assert [m.value for m in history("epoch")] == list(range(epochs))
    for key in ("heldout_reason_loss", "heldout_render_loss", "steps_per_s"):
        assert len(history(key)) == epochs, key
    grids = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {p.split("_epoch")[0] for p in grids} == {"samples/phase1", "samples/phase2", "samples/phase3"}

    # the pipeline: an artifact, registered under its own name, and a folder the edits endpoint loads
    from armature.platform.registry import list_adapters
    from armature.policies.skeleguide import SkeleGuidePipeline

    assert [a["name"] for a in list_adapters(info["tracking_uri"])] == ["armature-skeleguide"]
    adapter = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert {"adapter/skeleguide.json", "adapter/skeletal", "adapter/appearance"} <= adapter
    pipeline = SkeleGuidePipeline.from_pretrained(run_dir / "pipeline")
    trained = sum(float(p.abs().sum()) for n, p in pipeline.transformer.named_parameters() if "lora_B" in n)
    assert trained > 0  # LoRA B starts at zero: training moved it
