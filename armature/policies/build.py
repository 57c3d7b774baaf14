"""The policy a job's ``model`` section describes, whichever kind of policy it is."""

from __future__ import annotations

from armature.policies.config import ModelConfig, SamplingParams, sampling_params
from armature.policies.diffusion import DiffusionPolicy, build_diffusion_policy

__all__ = ["build_policy"]


def build_policy(model: ModelConfig | dict, sampling: SamplingParams | dict, seed: int = 0) -> DiffusionPolicy:
    """The policy of the ``model`` and ``sampling`` config sections, adapter attached:
    ``model.family=skeleguide_stage`` one SkeleGuide stage
    (:class:`~armature.policies.skeleguide_policy.SkeleGuideStagePolicy`), every other family a
    :class:`~armature.policies.diffusion.DiffusionPolicy` (:func:`build_diffusion_policy`).
    A section given as a mapping (a test's, a server's, an adapter's metadata) is read with
    :meth:`ModelConfig.from_dict`; ``sampling.batch_size`` is the sampler actors', not the policy's.

    Every process that builds a policy from the same config (learners, sampler actors, the
    serving replicas) gets the same weights, LoRA initialisation included.
    """
    model = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
    sampling = sampling_params(sampling)
    if model.family == "skeleguide_stage":
        # imported here: the stage policy draws gym scenes (scipy), which no other family needs
        from armature.policies.skeleguide_policy import build_stage_policy

        return build_stage_policy(model, sampling, seed=seed)
    return build_diffusion_policy(model, sampling, seed)
