"""A reward model trained by ``armature train algo=reward_model``, loaded by name: ``learned``.

The job writes a scorer folder (in its run folder and as the MLflow artifact ``scorer/``)::

    scorer/
      clip/           the fine-tuned CLIPModel (save_pretrained), its tokenizer, preprocessor_config.json
      scorer.json     {"kind": "clip_similarity", "thresholds": [...] (ordinal head, may be empty), ...}

The score is HPS/PickScore's ``exp(logit_scale) * cos(e_I, e_T)`` of the fine-tuned CLIP, so the
learned reward is a :class:`~armature.rewards.clip_score.ClipSimilarity` (differentiable). A scorer
trained with ``algo.backbone=conv`` (``"kind": "conv"``) is a prompt-free
:class:`~armature.rewards.conv_scorer.ConvScorer` instead (differentiable too).
``path`` is the folder, or an MLflow artifact URI (``runs:/<run id>/scorer``, ``models:/...``).
"""

from __future__ import annotations

import json
import os

from .clip_score import ClipSimilarity
from .registry import register

SCORER_FILE = "scorer.json"


def resolve_scorer(path: str, tracking_uri: str | None = None) -> str:
    """A local scorer folder for ``path`` (an MLflow artifact URI is downloaded first)."""
    if "://" in str(path) or str(path).startswith(("runs:", "models:")):
        import mlflow.artifacts

        path = mlflow.artifacts.download_artifacts(artifact_uri=str(path), tracking_uri=tracking_uri)
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, SCORER_FILE)):
        raise FileNotFoundError(f"learned reward: {path!r} has no {SCORER_FILE}; give the scorer/ folder an "
                                "`armature train algo=reward_model` run wrote (its run folder or MLflow artifact)")
    return path


@register("learned")
def learned(path: str, device: str = "cpu", tracking_uri: str | None = None):
    """The trained scorer in ``path``: ``exp(logit_scale) * cos`` of its fine-tuned CLIP, or its
    convolutional image scorer."""
    path = resolve_scorer(path, tracking_uri)
    with open(os.path.join(path, SCORER_FILE)) as f:
        meta = json.load(f)
    if meta.get("kind") == "conv":
        from .conv_scorer import ConvScorer

        reward = ConvScorer.load(path, meta, device=device)
    elif meta.get("kind") == "clip_similarity":
        reward = ClipSimilarity(os.path.join(path, "clip"), scale="logit_scale", device=device, name="learned")
    else:
        raise ValueError(f"learned reward: {path}/{SCORER_FILE} has kind {meta.get('kind')!r}; "
                         "expected 'clip_similarity' or 'conv'")
    reward.severity_thresholds = list(meta.get("thresholds", []))
    return reward


@register("gym_anatomy")
def gym_anatomy(path: str | None = None, device: str = "cpu", tracking_uri: str | None = None):
    """The anatomy gym's learned anatomy reward: by default the convolutional scorer shipped in
    ``armature/gym/anatomy_scorer`` (trained on injector pairs alone, it never saw the oracle;
    ``provenance.json`` there has the command that made it); ``path``: a scorer folder of your
    own from ``armature train algo=reward_model`` (or its MLflow URI)."""
    from armature.gym.base_policy import SHIPPED_SCORER

    reward = learned(path or str(SHIPPED_SCORER), device=device, tracking_uri=tracking_uri)
    reward.name = "gym_anatomy"
    return reward
