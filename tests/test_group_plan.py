"""The online group learners' sampling plan and MixGRPO's window (pure functions of the jobs)."""

from armature.jobs.grpo import GRPOConfig, sde_window
from armature.platform.learner import epoch_plan

PROMPTS = ["a", "b", "c", "d", "e"]


def test_epoch_plan_does_not_depend_on_the_number_of_workers():
    one = epoch_plan(PROMPTS, 7, 3, prompts_per_epoch=6, group_size=4, rank=0, world=1)
    assert len(one.prompts) == 24 and len(set(one.seeds)) == 24
    assert all(one.prompts[i] == one.prompts[i - i % 4] for i in range(24))  # a group shares its prompt
    assert len(set(one.groups)) == 6
    split = [epoch_plan(PROMPTS, 7, 3, 6, 4, rank, 3) for rank in range(3)]
    merged = {(g, p, s) for plan in split for g, p, s in zip(plan.groups, plan.prompts, plan.seeds)}
    assert merged == set(zip(one.groups, one.prompts, one.seeds))
    # another epoch or seed draws other samples
    assert set(epoch_plan(PROMPTS, 7, 4, 6, 4, 0, 1).seeds).isdisjoint(one.seeds)
    assert epoch_plan(PROMPTS, 8, 3, 6, 4, 0, 1).seeds != one.seeds


def test_mixgrpo_window_slides_and_wraps():
    algo = GRPOConfig(sde_window_size=2, sde_window_stride=1, sde_window_shift_every=2)
    starts = [sde_window(e, 5, algo)[0] for e in range(10)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]  # 4 positions for a window of 2 in 5 steps
    assert all(sde_window(e, 5, algo)[1] - sde_window(e, 5, algo)[0] == 2 for e in range(10))
    assert sde_window(3, 6, GRPOConfig(sde_window_size=0, sde_window_stride=1, sde_window_shift_every=1)) == (0, 6)
