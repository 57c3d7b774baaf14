"""The policy a job's ``model`` section describes, whichever kind of policy it is."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass

from armature.policies.diffusion import DiffusionPolicy, SamplingParams, build_diffusion_policy

__all__ = ["build_policy"]


def build_policy(model: dict, sampling: dict, seed: int = 0) -> DiffusionPolicy:
    """The policy of the ``model`` and ``sampling`` config sections, adapter attached:
    ``model.family=skeleguide_stage`` one SkeleGuide stage
    (:class:`~armature.policies.skeleguide_policy.SkeleGuideStagePolicy`), every other family a
    :class:`~armature.policies.diffusion.DiffusionPolicy` (:func:`build_diffusion_policy`).

    Every process that builds a policy from the same config (learners, sampler actors, the
    serving replicas) gets the same weights, LoRA initialisation included.
    """
    model = asdict(model) if is_dataclass(model) else model
    sampling = asdict(sampling) if is_dataclass(sampling) else sampling
    if model.get("family") == "skeleguide_stage":
        # imported here: the stage policy draws gym scenes (scipy), which no other family needs
        from armature.policies.skeleguide_policy import build_stage_policy

        sampling = {k: v for k, v in dict(sampling).items() if k != "batch_size"}
        return build_stage_policy(model, SamplingParams(**sampling), seed=seed)
    return build_diffusion_policy(model, sampling, seed)
