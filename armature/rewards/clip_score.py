"""Prompt-image similarity rewards from a CLIP model: CLIPScore, HPS v2, PickScore.

All three embed the image and the prompt with a (fine-tuned) CLIP and compare them:

    e_I = normalize(CLIP_image(preprocess(image))),   e_T = normalize(CLIP_text(prompt))
    cos = e_I . e_T

* ``clip_score`` (Hessel et al., 2021, eq. 1): ``CLIPScore = w * max(cos, 0)``, ``w = 2.5``,
  with OpenAI's CLIP (default ``openai/clip-vit-large-patch14``).
* ``hps_v2`` (Wu et al., 2023, HPS v2): a CLIP ViT-H/14 fine-tuned on human choices; the
  score is ``cos`` itself (HPS v1, seed 004, fine-tunes ViT-L/14 the same way and reports
  ``100 * cos``: set ``scale: 100``). HPS v2's released weights are open_clip checkpoints with
  no official transformers copy: download ``HPS_v2.1_compressed.pt`` (or v2.0's
  ``HPS_v2_compressed.pt``) from the hub repo ``xswu/HPSv2``, e.g.
  ``huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir /models/hps``, and set
  ``path: /models/hps/HPS_v2.1_compressed.pt``; the tokenizer and preprocessing come from
  ``processor`` (default for such a file: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, HPS's base
  model, also to be in the hub cache when offline). Nothing is downloaded by this code.
* ``pickscore`` (Kirstain et al., 2023, Pick-a-Pic): ``exp(logit_scale) * cos`` with the
  fine-tuned ``yuvalkirstain/PickScore_v1`` and the processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.

``path`` is a hub id, a local folder (``CLIPModel.save_pretrained`` plus tokenizer and
``preprocessor_config.json``) or a local open_clip checkpoint file (``.pt``/``.bin``/``.safetensors``,
recognised by its keys and renamed into ``CLIPModel`` by
:func:`armature.rewards.convert.open_clip_to_transformers`, every key checked); ``processor``
optionally names another folder or id for the tokenizer and preprocessing (required in effect
for a checkpoint file, which holds neither). The image side is preprocessed in torch (bicubic resize,
centre crop, normalise), so :meth:`ClipSimilarity.score_tensor` is differentiable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .aesthetic import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from .base import TINY_TOWER, DifferentiableReward
from .convert import CheckpointMismatchError, is_open_clip_state_dict, load_open_clip_as_transformers, read_checkpoint
from .registry import register

__all__ = ["ClipSimilarity", "clip_score", "hps_v2", "pickscore", "read_image_preprocessing", "build_tiny_clip"]

# HPS v2's base model (open_clip ViT-H-14 laion2B-s32B-b79K): the tokenizer and preprocessing of its checkpoints
HPS_V2_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _config_file(source: str, filename: str) -> str | None:
    """``filename`` from a local folder or a hub id (honours HF_HUB_OFFLINE), or None."""
    if os.path.isdir(source):
        candidate = os.path.join(source, filename)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    try:
        return cached_file(source, filename)
    except OSError:
        return None


def read_image_preprocessing(source: str, image_size: int):
    """``(size, crop_size, mean, std)`` from ``source``'s ``preprocessor_config.json``
    (OpenAI CLIP's constants at ``image_size`` without one)."""
    path = _config_file(source, "preprocessor_config.json")
    if path is None:
        return image_size, (image_size, image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    with open(path) as f:
        config = json.load(f)

    def pair(value):
        return (int(value["height"]), int(value["width"])) if isinstance(value, dict) else (int(value), int(value))

    size = config.get("size", image_size)
    if isinstance(size, dict):
        size = int(size["shortest_edge"]) if "shortest_edge" in size else pair(size)
    crop = pair(config.get("crop_size", image_size)) if config.get("do_center_crop", True) else None
    return (
        size,
        crop,
        tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
        tuple(config.get("image_std", OPENAI_CLIP_STD)),
    )


class ClipSimilarity(DifferentiableReward):
    """``scale * f(cos(e_I, e_T))`` from a transformers ``CLIPModel``; differentiable.

    Args:
        path: hub id or folder of the ``CLIPModel``.
        processor: hub id or folder of the tokenizer and preprocessing (default ``path``).
        scale: multiplier of the similarity (``"logit_scale"`` uses the model's ``exp(logit_scale)``).
        clamp_negative: ``max(cos, 0)`` as CLIPScore does.
        device: where the model runs.
        name: the reward's name in logs.
    """

    def __init__(
        self,
        path: str,
        processor: str | None = None,
        scale: float | str = 1.0,
        clamp_negative: bool = False,
        device: str = "cpu",
        name: str = "clip_similarity",
        max_prompt_tokens: int | None = None,
    ):
        from transformers import AutoTokenizer, CLIPModel

        path = os.fspath(path)
        checkpoint_file = os.path.isfile(path)
        if checkpoint_file and not processor:
            raise ValueError(
                f"reward {name!r}: path={path!r} is a checkpoint file, which holds no tokenizer or "
                "preprocessing: set `processor` to a hub id or folder (HPS v2: "
                f"{HPS_V2_PROCESSOR})"
            )
        processor = os.fspath(processor) if processor else path
        self.name = name
        self.device = torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(processor)
            if checkpoint_file:
                self.model = _clip_from_checkpoint(path, self.tokenizer, name)
            else:
                self.model = CLIPModel.from_pretrained(path)
        except OSError as err:
            raise FileNotFoundError(
                f"reward {name!r}: could not load a CLIP model from path={path!r} (processor={processor!r}): "
                "expected a hub id, a folder written by CLIPModel.save_pretrained with its tokenizer, or an "
                f"open_clip checkpoint file with `processor` naming the tokenizer; {err}"
            ) from err
        self.model.to(self.device, torch.float32).eval().requires_grad_(False)
        if scale == "logit_scale":
            self.scale = float(self.model.logit_scale.exp())
        elif isinstance(scale, (int, float)):
            self.scale = float(scale)
        else:
            raise ValueError(f"reward {name!r}: scale must be a number or 'logit_scale', got {scale!r}")
        self.clamp_negative = bool(clamp_negative)
        self.max_prompt_tokens = int(max_prompt_tokens or self.model.config.text_config.max_position_embeddings)
        self.size, self.crop_size, self.mean, self.std = read_image_preprocessing(
            processor, self.model.config.vision_config.image_size
        )

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_prompt_tokens, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        return F.normalize(_features(out), dim=-1)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device, torch.float32), self.size, self.crop_size, self.mean, self.std)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_tensor(images, prompts)
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        if self.clamp_negative:
            cos = cos.clamp(min=0.0)
        return self.scale * cos


def _clip_from_checkpoint(path: str, tokenizer, name: str):
    """``CLIPModel`` from an open_clip checkpoint file; the text config takes the tokenizer's
    special ids (CLIPModel pools the text at the first ``eos_token_id``)."""
    state_dict = read_checkpoint(path)
    if not is_open_clip_state_dict(state_dict):
        shown = ", ".join(list(state_dict)[:8])
        raise CheckpointMismatchError(
            f"reward {name!r}: {path!r} is not an open_clip CLIP checkpoint (its first keys: {shown}); "
            "a transformers model goes in a folder (CLIPModel.save_pretrained)",
            absent=[k for k in ("visual.conv1.weight", "token_embedding.weight") if k not in state_dict],
        )
    special = {
        key: getattr(tokenizer, key)
        for key in ("eos_token_id", "bos_token_id", "pad_token_id")
        if getattr(tokenizer, key, None) is not None
    }
    return load_open_clip_as_transformers(state_dict, **special)


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4, a model output in some 5.x versions."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


@register("clip_score")
def clip_score(
    path: str = "openai/clip-vit-large-patch14",
    processor: str | None = None,
    weight_w: float = 2.5,
    device: str = "cpu",
) -> ClipSimilarity:
    """CLIPScore (Hessel et al., 2021, eq. 1): ``w * max(cos, 0)``, ``w = weight_w = 2.5``."""
    return ClipSimilarity(path, processor, scale=weight_w, clamp_negative=True, device=device, name="clip_score")


@register("hps_v2")
def hps_v2(path: str, processor: str | None = None, scale: float = 1.0, device: str = "cpu") -> ClipSimilarity:
    """HPS v2: cosine similarity of a human-preference fine-tuned CLIP (``scale: 100`` for HPS v1's scale).

    ``path``: the released open_clip checkpoint ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt``)
    downloaded from the hub repo ``xswu/HPSv2`` (converted to ``CLIPModel`` on load; its tokenizer and
    preprocessing are ``processor``'s, default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), or a
    transformers ``CLIPModel`` folder / hub id.
    """
    if processor is None and os.path.isfile(os.fspath(path)):
        processor = HPS_V2_PROCESSOR
    return ClipSimilarity(path, processor, scale=scale, device=device, name="hps_v2")


@register("pickscore")
def pickscore(
    path: str = "yuvalkirstain/PickScore_v1",
    processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    device: str = "cpu",
) -> ClipSimilarity:
    """PickScore: ``exp(logit_scale) * cos`` of the Pick-a-Pic fine-tuned CLIP-H."""
    return ClipSimilarity(path, processor, scale="logit_scale", device=device, name="pickscore")


def build_tiny_clip(path: str, tokenizer, seed: int = 0, image_size: int = 32) -> str:
    """Save a tiny random ``CLIPModel`` with ``tokenizer`` and a preprocessor config to ``path``
    (a stand-in for real weights, loaded through the same code). Returns ``path``."""
    from transformers import CLIPConfig, CLIPModel

    os.makedirs(path, exist_ok=True)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            **TINY_TOWER,
            max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=8,
            **TINY_TOWER,
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": image_size},
                "do_center_crop": True,
                "crop_size": {"height": image_size, "width": image_size},
                "do_normalize": True,
                "image_mean": list(OPENAI_CLIP_MEAN),
                "image_std": list(OPENAI_CLIP_STD),
            },
            f,
            indent=2,
        )
    return path
