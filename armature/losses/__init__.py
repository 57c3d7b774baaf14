"""Pure math of the learners: losses and advantages. Imports torch and numpy only."""

from armature.losses.advantages import PerPromptStatTracker, normalize_rewards
from armature.losses.ddpo import ddpo_loss

__all__ = ["PerPromptStatTracker", "ddpo_loss", "normalize_rewards"]
