"""A reward model trained by ``armature train algo=reward_model``, loaded by name: ``learned``.

The job writes a scorer folder (in its run folder and as the MLflow artifact ``scorer/``)::

    scorer/
      clip/           the fine-tuned CLIPModel (save_pretrained), its tokenizer, preprocessor_config.json
      scorer.json     {"kind": "clip_similarity", "thresholds": [...] (ordinal head, may be empty), ...}

The score is HPS/PickScore's ``exp(logit_scale) * cos(e_I, e_T)`` of the fine-tuned CLIP, so the
learned reward is a :class:`~armature.rewards.clip_score.ClipSimilarity` (differentiable). A scorer
trained with ``algo.backbone=conv`` (``"kind": "conv"``) is a prompt-free
:class:`~armature.rewards.conv_scorer.ConvScorer` instead (differentiable too).
``path`` is the folder, or an MLflow artifact URI (``runs:/<run id>/scorer``, ``models:/...``);
a list of them is an ensemble whose score is the mean of the members' (e.g. one recipe trained
from several seeds: ``trainer.seed``), which ranks more steadily than any one member.

``uncertainty_penalty`` (lambda >= 0) guards an ensemble against reward over-optimisation: the score
becomes ``mean - lambda * std`` over the members (population std), so images the members disagree
on (where a policy exploits one scorer's blind spot) earn less than their mean.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from armature.gym.base_policy import shipped_scorers

from .base import DifferentiableReward
from .clip_score import ClipSimilarity
from .conv_scorer import ConvScorer
from .registry import register

SCORER_FILE = "scorer.json"


def resolve_scorer(path: str, tracking_uri: str | None = None) -> str:
    """A local scorer folder for ``path`` (an MLflow artifact URI is downloaded first)."""
    if "://" in str(path) or str(path).startswith(("runs:", "models:")):
        import mlflow.artifacts

        path = mlflow.artifacts.download_artifacts(artifact_uri=str(path), tracking_uri=tracking_uri)
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, SCORER_FILE)):
        raise FileNotFoundError(
            f"learned reward: {path!r} has no {SCORER_FILE}; give the scorer/ folder an "
            "`armature train algo=reward_model` run wrote (its run folder or MLflow artifact)"
        )
    return path


class MeanOfScorers(DifferentiableReward):
    """The mean score of several trained scorers (an ensemble); differentiable like its members."""

    def __init__(self, members: list, name: str = "learned", uncertainty_penalty: float = 0.0):
        self.members, self.name = members, name
        self.uncertainty_penalty = check_penalty(uncertainty_penalty, len(members))
        self.device = members[0].device
        self.severity_thresholds = []  # members' ordinal heads do not average into one

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_tensor(images, prompts)
        scores = torch.stack([m.score_tensor(images, prompts).to(self.device) for m in self.members])
        if not self.uncertainty_penalty:
            return scores.mean(0)
        return scores.mean(0) - self.uncertainty_penalty * scores.std(0, correction=0)


def check_penalty(value: float, members: int) -> float:
    """``uncertainty_penalty`` must be a number >= 0, and needs an ensemble to measure disagreement."""
    value = float(value)
    if value < 0:
        raise ValueError(f"uncertainty_penalty={value}: must be >= 0 (0: the plain mean of the scorers)")
    if value and members < 2:
        raise ValueError(
            f"uncertainty_penalty={value} needs an ensemble: give `path` a list of two or more scorer folders"
        )
    return value


@register("learned")
def learned(path, device: str = "cpu", tracking_uri: str | None = None, uncertainty_penalty: float = 0.0):
    """The trained scorer in ``path``: ``exp(logit_scale) * cos`` of its fine-tuned CLIP, or its
    convolutional image scorer; a list of paths: the mean of their scores, less
    ``uncertainty_penalty`` times their standard deviation."""
    if not isinstance(path, (str, os.PathLike)):
        paths = list(path)
        if not paths:
            raise ValueError("learned reward: path is an empty list; give a scorer folder or a list of them")
        if len(paths) == 1:
            check_penalty(uncertainty_penalty, 1)
            return learned(paths[0], device=device, tracking_uri=tracking_uri)
        members = [learned(p, device=device, tracking_uri=tracking_uri) for p in paths]
        return MeanOfScorers(members, uncertainty_penalty=uncertainty_penalty)
    check_penalty(uncertainty_penalty, 1)
    path = resolve_scorer(path, tracking_uri)
    with open(os.path.join(path, SCORER_FILE)) as f:
        meta = json.load(f)
    if meta.get("kind") == "conv":
        reward = ConvScorer.load(path, meta, device=device)
    elif meta.get("kind") == "clip_similarity":
        reward = ClipSimilarity(os.path.join(path, "clip"), scale="logit_scale", device=device, name="learned")
    else:
        raise ValueError(
            f"learned reward: {path}/{SCORER_FILE} has kind {meta.get('kind')!r}; expected 'clip_similarity' or 'conv'"
        )
    reward.severity_thresholds = list(meta.get("thresholds", []))
    return reward


@register("gym_anatomy")
def gym_anatomy(
    path: str | None = None, device: str = "cpu", tracking_uri: str | None = None, uncertainty_penalty: float = 0.0
):
    """The anatomy gym's learned anatomy reward: by default the mean of the five convolutional
    scorers shipped in ``armature/gym/anatomy_scorer`` (each trained on its own injector pairs
    alone, none saw the oracle; ``provenance.json`` there has the command that made them);
    ``path``: a scorer folder of your own from ``armature train algo=reward_model`` (or its
    MLflow URI), or a list of them; ``uncertainty_penalty``: as for ``learned``."""
    reward = learned(
        path or shipped_scorers(), device=device, tracking_uri=tracking_uri, uncertainty_penalty=uncertainty_penalty
    )
    reward.name = "gym_anatomy"
    return reward
