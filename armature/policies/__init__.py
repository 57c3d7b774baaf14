"""Diffusion policies: pipelines that roll out trajectories and score transitions. No Ray here."""

from armature.policies.build import build_policy
from armature.policies.config import LoraConfig, LoraParams, ModelConfig, SamplingParams
from armature.policies.diffusion import DiffusionPolicy, Trajectory, load_policy
from armature.policies.flow_logprob import flow_sde_step_with_logprob
from armature.policies.logprob import ddim_step_with_logprob, gaussian_log_prob
from armature.policies.tiny import TinyFlowConfig, TinySDConfig, build_tiny_flow_pipeline, build_tiny_sd_pipeline

__all__ = [
    "DiffusionPolicy",
    "LoraConfig",
    "LoraParams",
    "ModelConfig",
    "SamplingParams",
    "TinyFlowConfig",
    "TinySDConfig",
    "Trajectory",
    "build_policy",
    "build_tiny_flow_pipeline",
    "build_tiny_sd_pipeline",
    "ddim_step_with_logprob",
    "flow_sde_step_with_logprob",
    "gaussian_log_prob",
    "load_policy",
]
