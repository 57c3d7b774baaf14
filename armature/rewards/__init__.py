"""Rewards: functions of (images, prompts) -> float32 scores [B], higher is better.

Build them by name with :func:`load` / :func:`load_weighted`; :func:`available` lists
the registered names. This package knows nothing of Ray.
"""

# Importing the modules registers their rewards (pose imports ai-edge-litert on first use only).
from .aesthetic import AestheticHead, AestheticScorer, build_tiny_aesthetic, clip_preprocess
from .analytic import Brightness, Colorfulness
from .base import DifferentiableReward, Reward, WeightedSum, pil_to_tensor, require_differentiable
from .clip_score import ClipSimilarity, clip_score, hps_v2, pickscore
from .compression import JpegSize, jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from .gym_oracle import GymOracleReward
from .image_reward import ImageReward
from .judge import MLLMJudge
from .learned import learned
from .pose import BlazePose, PoseReward
from .registry import available, load, load_weighted, register, summarize
from .skeleton import PoseAdherence, SkeletonReward

__all__ = [
    "AestheticHead",
    "AestheticScorer",
    "BlazePose",
    "Brightness",
    "ClipSimilarity",
    "Colorfulness",
    "DifferentiableReward",
    "GymOracleReward",
    "ImageReward",
    "JpegSize",
    "MLLMJudge",
    "PoseAdherence",
    "PoseReward",
    "Reward",
    "SkeletonReward",
    "WeightedSum",
    "available",
    "build_tiny_aesthetic",
    "clip_preprocess",
    "clip_score",
    "hps_v2",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "learned",
    "load",
    "load_weighted",
    "pickscore",
    "pil_to_tensor",
    "register",
    "require_differentiable",
    "summarize",
]
