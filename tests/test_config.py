"""Hydra composition against the schema: good configs compose, bad ones name the key."""

import os

import pytest

from armature.cli import main
from armature.platform.config import ConfigError, compose, flatten


def test_default_composes_with_groups():
    cfg = compose("train", [])  # the anatomy gym's job: DDPO on the gym policy vs the learned anatomy reward
    assert cfg.algo.name == "ddpo" and cfg.model.family == "gym" and cfg.model.lora.enabled
    assert dict(cfg.reward.components) == {"gym_anatomy": {"weight": 1.0}, "gym_oracle": {"weight": 0.0}}
    # the pose prompts ship with the package: found from any working folder
    assert cfg.prompts.file.endswith("suites/gym_poses.txt") and os.path.isfile(cfg.prompts.file)
    cfg = compose("train", ["model=sd15", "reward=incompressibility", "trainer.num_workers=2"])
    assert cfg.model.family == "sd" and cfg.model.pretrained and cfg.model.lora.enabled
    assert cfg.trainer.num_workers == 2


@pytest.mark.parametrize(
    "override, named",
    [
        (["trainer.num_wrkers=2"], "num_wrkers"),  # unknown key
        (["trainer.num_workers=two"], "trainer.num_workers"),  # wrong type
        (["+algo.learning_rte=1"], "learning_rte"),  # unknown key in the algorithm's schema
        (["algo.clip_range=wide"], "clip_range"),  # wrong type in the algorithm's schema
        (["model=sd9"], "model/sd9"),  # unknown group option
        (["trainer.zero_stage=3"], "trainer.zero_stage"),
        (["algo.samples_per_epoch=30", "trainer.num_workers=4"], "algo.samples_per_epoch"),
        (["algo.train_batch_size=5"], "algo.train_batch_size"),
        (["sampling.eta=0"], "sampling.eta"),
        (["algo.final_eval_per_prompt=-1"], "algo.final_eval_per_prompt"),
        (["trainer.rollout_ahead=2"], "trainer.rollout_ahead"),
        (["algo=dpo", "trainer.rollout_ahead=1"], "trainer.rollout_ahead"),  # no on-policy samplers
    ],
)
def test_bad_config_names_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        compose("train", override)
    assert named in str(err.value)


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["train", "trainer.num_workers=abc"]) == 2
    assert "trainer.num_workers" in capsys.readouterr().err
    assert main(["train", "--cfg", "algo.num_epochs=3"]) == 0
    assert "num_epochs: 3" in capsys.readouterr().out


def test_cli_takes_overrides_on_both_sides_of_a_flag(capsys):
    assert main(["train", "algo.num_epochs=4", "--cfg", "algo.train_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "num_epochs: 4" in out and "train_batch_size: 2" in out
    with pytest.raises(SystemExit):  # an unknown flag is still an error
        main(["train", "--cfg", "--no-such-flag"])
    assert "--no-such-flag" in capsys.readouterr().err


def test_jobs_receive_typed_objects_that_pickle():
    """The composed config becomes dataclasses: the algorithm's registered schema under ``algo``,
    the policies' own model section; they reach the Ray workers by pickle."""
    import pickle

    from armature.jobs.grpo import GRPOConfig
    from armature.platform.config import SamplingConfig, TrainConfig
    from armature.platform.launch import typed
    from armature.policies import ModelConfig, SamplingParams

    c = typed(compose("train", ["algo=grpo", "model=tiny_flow", "algo.clip_range=0.3", "sampling.batch_size=4"]))
    assert isinstance(c, TrainConfig) and isinstance(c.algo, GRPOConfig) and isinstance(c.model, ModelConfig)
    assert c.algo.clip_range == 0.3 and c.algo.name == "grpo" and c.model.tiny_flow.arch == "sd3"
    assert isinstance(c.sampling, SamplingConfig) and isinstance(c.sampling, SamplingParams)
    assert c.sampling.batch_size == 4
    again = pickle.loads(pickle.dumps(c))
    assert again == c and type(again.algo) is GRPOConfig
    flat = flatten(c)  # MLflow's params: the same keys as from the DictConfig
    assert flat == flatten(
        compose("train", ["algo=grpo", "model=tiny_flow", "algo.clip_range=0.3", "sampling.batch_size=4"])
    )
    assert flat["algo.clip_range"] == "0.3" and flat["model.tiny_flow.arch"] == "sd3"


@pytest.mark.parametrize(
    "override, new",
    [
        (["model=skeleguide_stage", "model.stage=appearance"], "model.skeleguide_stage.stage"),
        (["model=skeleguide_stage", "model.conditions=/tmp"], "model.skeleguide_stage.conditions"),
        (["model=skeleguide_stage", "model.skeleguide.lora_rank=2"], "model.skeleguide_stage.params"),
        (["model=tiny_flow", "model.tiny.arch=flux"], "model.tiny_flow.arch"),
        (["model=tiny_flow", "model.tiny.shift=1.0"], "model.tiny_flow.shift"),
        (["model.tiny.transformer_layers=4"], "model.tiny_flow.transformer_layers"),
    ],
)
def test_a_family_option_under_its_old_key_names_its_new_one(override, new):
    with pytest.raises(ConfigError, match=f"model.* is now {new}"):
        compose("train", override)


def test_an_adapters_recorded_model_section_is_read_old_or_new():
    """Adapters written before the family groups recorded ``tiny.arch`` and ``stage`` at the old
    places; ``ModelConfig.from_dict`` (what build_policy reads a mapping with) moves them."""
    from armature.policies import ModelConfig

    old = ModelConfig.from_dict(
        {
            "family": "tiny_flow",
            "tiny": {"seed": 1, "arch": "flux", "head_dim": 4},
            "stage": "appearance",
            "skeleguide": {"a": 1},
        }
    )
    assert old.tiny.seed == 1 and old.tiny_flow.arch == "flux" and old.tiny_flow.head_dim == 4
    assert old.skeleguide_stage.stage == "appearance" and old.skeleguide_stage.params == {"a": 1}
    assert old.lora.enabled and old.lora.rank == 4  # the one set of LoRA defaults
    new = ModelConfig.from_dict(
        {"family": "tiny_flow", "tiny": {"seed": 1}, "tiny_flow": {"arch": "flux", "head_dim": 4}}
    )
    assert new.tiny_flow == old.tiny_flow
    with pytest.raises(ValueError, match="model.famly"):
        ModelConfig.from_dict({"famly": "tiny"})


def test_flatten_for_mlflow_params():
    flat = flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None", "f": "{}"}


def test_a_required_value_left_unset_is_named():
    with pytest.raises(ConfigError, match=r"reward\.components\.aesthetic\.path=\?\?\?: this value is required"):
        compose("train", ["reward=aesthetic"])
    cfg = compose("train", ["reward=aesthetic", "reward.components.aesthetic.path=/models/aesthetic"])
    assert cfg.reward.components.aesthetic.path == "/models/aesthetic"


def test_a_relative_prompt_file_becomes_absolute_for_the_ray_workers(tmp_path, monkeypatch):
    from armature.platform.config import config_dir

    (tmp_path / "p.txt").write_text("a person standing\n")
    monkeypatch.chdir(tmp_path)
    assert compose("train", ["prompts.file=p.txt"]).prompts.file == str(tmp_path / "p.txt")
    assert compose("train", ["prompts.file=missing.txt"]).prompts.file == "missing.txt"  # the job names it
    assert os.path.isabs(compose("train", [f"prompts.file={tmp_path / 'p.txt'}"]).prompts.file)
    # not in the working folder: the packaged configs' suites (the default's pose prompts)
    assert compose("train", ["prompts.file=suites/gym_poses.txt"]).prompts.file == os.path.join(
        config_dir(), "suites", "gym_poses.txt"
    )
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "gym_poses.txt").write_text("my own poses\n")  # the working folder's comes first
    assert compose("train", ["prompts.file=suites/gym_poses.txt"]).prompts.file == str(
        tmp_path / "suites" / "gym_poses.txt"
    )


def test_gym_bench_is_configured_through_hydra():
    """`armature gym bench` composes configs/gym_bench.yaml on BenchConfig like every job; overrides of
    keys the bench does not have go to every stage."""
    from omegaconf import OmegaConf

    from armature.jobs.gym_bench import BenchConfig, register_schema, split_overrides

    register_schema()
    bench, stages = split_overrides(["pairs=400", "learners=[ddpo]", "tracking=server", "+algo.beta=1"])
    assert bench == ["pairs=400", "learners=[ddpo]"] and stages == ["tracking=server", "+algo.beta=1"]
    cfg = OmegaConf.to_object(compose("gym_bench", bench))
    assert isinstance(cfg, BenchConfig) and cfg.pairs == 400 and cfg.learners == ["ddpo"]
    assert cfg.best_of == [1, 4, 8, 16] and cfg.out == "gym-bench"  # the yaml's, the schema's defaults
    with pytest.raises(ConfigError, match="pairz"):
        compose("gym_bench", ["pairz=3"])
    with pytest.raises(ConfigError, match="pairs"):
        compose("gym_bench", ["pairs=many"])


@pytest.mark.parametrize("algo", ["ddpo", "grpo", "nft", "online_dpo"])
def test_every_on_policy_learner_takes_rollouts_ahead(algo):
    overrides = [f"algo={algo}", "trainer.rollout_ahead=1"]
    if algo in ("grpo", "nft"):
        overrides.append("model=tiny_flow")
    assert compose("train", overrides).trainer.rollout_ahead == 1


def test_a_mapping_in_an_algo_config_replaces_the_schema_default_instead_of_joining_it():
    """``algo.annotator_reward`` defaults to ``{brightness: ...}``: naming another annotator reward
    (deleting brightness, adding gym_oracle) leaves gym_oracle alone, not both summed; a mapping the
    config leaves alone keeps its default; nested dataclass sections still get their defaults."""
    from armature.platform.config import compose

    c = compose(
        "train",
        ["algo=online_dpo", "~algo.annotator_reward.brightness", "+algo.annotator_reward.gym_oracle={weight: 1.0}"],
    )
    assert dict(c.algo.annotator_reward) == {"gym_oracle": {"weight": 1.0}}
    assert dict(compose("train", ["algo=online_dpo"]).algo.annotator_reward) == {"brightness": {"weight": 1.0}}
    with pytest.raises(ConfigError, match="time_budget_s"):
        compose("train", ["trainer.time_budget_s=-5"])
