"""Rewards: functions of (images, prompts) -> float32 scores [B], higher is better.

Build them by name with :func:`load` / :func:`load_weighted`; :func:`available` lists
the registered names. This package knows nothing of Ray.
"""

from .base import DifferentiableReward, Reward, WeightedSum, pil_to_tensor
from .registry import available, load, load_weighted, register, summarize

# Importing the modules registers their rewards.
from .compression import JpegSize, jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb  # noqa: E402
from .aesthetic import AestheticHead, AestheticScorer, build_tiny_aesthetic, clip_preprocess  # noqa: E402
from .analytic import Brightness, Colorfulness  # noqa: E402
from .pose import BlazePose, PoseReward  # noqa: E402  (ai-edge-litert is imported on first use)
from .clip_score import ClipSimilarity, clip_score, hps_v2, pickscore  # noqa: E402
from .image_reward import ImageReward  # noqa: E402
from .judge import MLLMJudge  # noqa: E402
from .learned import learned  # noqa: E402
from .gym_oracle import GymOracleReward  # noqa: E402
from .skeleton import PoseAdherence, SkeletonReward  # noqa: E402
from .base import require_differentiable  # noqa: E402

__all__ = [
    "AestheticHead",
    "AestheticScorer",
    "DifferentiableReward",
    "JpegSize",
    "Reward",
    "WeightedSum",
    "available",
    "build_tiny_aesthetic",
    "clip_preprocess",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "load",
    "load_weighted",
    "pil_to_tensor",
    "register",
    "summarize",
]
