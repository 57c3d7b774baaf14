"""Ray actors wrapping policies (samplers) and rewards (scorers)."""

from armature.actors.reward import RewardScorer, start_reward_actors
from armature.actors.sampler import PolicySampler, start_samplers

__all__ = ["PolicySampler", "RewardScorer", "start_reward_actors", "start_samplers"]
