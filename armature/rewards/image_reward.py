"""ImageReward (Xu et al., 2023) built from transformers' BLIP pieces.

ImageReward is BLIP's image-grounded text encoder with an MLP head:

    v = BLIP_ViT(preprocess(image))                           image tokens
    t = BLIP_text_encoder(prompt, cross-attending to v)[:, 0]  the [CLS] feature
    reward = (MLP(t) - mu) / sigma                             (mu, sigma fixed from training)

transformers' ``BlipForImageTextRetrieval`` holds exactly those two towers
(``vision_model`` and the cross-attending ``text_encoder``); the MLP has the LAION
aesthetic head's shape (Linear-Dropout chains without activations, 768 -> 1024 -> 128 ->
64 -> 16 -> 1), so :class:`~armature.rewards.aesthetic.AestheticHead` is reused.

Two ways to give the weights (``path``):

* **the released checkpoint**: download ``ImageReward.pt`` from the hub repo ``THUDM/ImageReward``
  (e.g. ``huggingface-cli download THUDM/ImageReward ImageReward.pt --local-dir /models/image_reward``)
  and set ``path: /models/image_reward/ImageReward.pt``. Its BLIP parameter names are renamed by
  :func:`armature.rewards.convert.image_reward_to_transformers` into transformers' ``BlipVisionModel``
  and ``BlipTextModel`` and the head (every key is checked; BLIP's unused contrastive projections
  ``vision_proj``/``text_proj`` are the only ones dropped). The tokenizer is BLIP's, BERT's
  ``bert-base-uncased`` vocabulary plus ``[DEC]`` and ``[ENC]`` (``tokenizer``, default
  ``google-bert/bert-base-uncased``: a hub id, so fetch it once or give a local folder offline);
  preprocessing is ImageReward's: bicubic resize of the short side to 224, centre crop 224, CLIP's
  mean and std. Nothing is downloaded by this code.
* **a folder**::

    path/
      blip/               BlipForImageTextRetrieval.save_pretrained + tokenizer + preprocessor_config.json
      head.safetensors    AestheticHead state dict
      head.json           {"in_features", "hidden_sizes", "dropout", "mean", "std"}

Tests use :func:`build_tiny_image_reward` and a tiny random checkpoint in the released format.
Differentiable in the pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file

from .aesthetic import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, AestheticHead
from .base import TINY_TOWER, DifferentiableReward
from .clip_score import clip_preprocess, read_image_preprocessing
from .convert import (
    CheckpointMismatchError,
    build_image_reward_modules,
    image_reward_config_from_state_dict,
    image_reward_head_config,
    image_reward_to_transformers,
    is_image_reward_state_dict,
    read_checkpoint,
)
from .registry import register

__all__ = ["ImageReward", "build_image_reward_modules", "build_tiny_image_reward"]

# ImageReward's normalisation of the raw head output (from its release)
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
# BLIP's text tokenizer (bert-base-uncased; [DEC] and [ENC] are added on load)
BLIP_TOKENIZER = "google-bert/bert-base-uncased"


def _blip_tokenizer(source: str, vocab_size: int):
    """BLIP's tokenizer: BERT's plus ``[DEC]`` (bos) and ``[ENC]``, when ``source`` lacks them and the
    checkpoint's vocabulary has exactly those two more rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if "[DEC]" not in tokenizer.get_vocab() and len(tokenizer) + 2 == vocab_size:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"image_reward: tokenizer {source!r} has {len(tokenizer)} tokens, more than the "
            f"checkpoint's {vocab_size} embedding rows"
        )
    return tokenizer


@register("image_reward")
class ImageReward(DifferentiableReward):
    """ImageReward score of (image, prompt) pairs; see the module docstring.

    Args:
        path: ``ImageReward.pt`` (the released checkpoint) or a folder in this module's layout.
        device: where the model runs.
        max_prompt_tokens: prompts are padded / truncated to this many tokens (ImageReward: 35).
        tokenizer: hub id or folder of the tokenizer for a ``.pt`` checkpoint (default BERT's
            ``google-bert/bert-base-uncased``, to which BLIP's ``[DEC]``/``[ENC]`` are added).
    """

    name = "image_reward"

    def __init__(self, path: str, device: str = "cpu", max_prompt_tokens: int = 35, tokenizer: str | None = None):
        path = os.fspath(path)
        self.device = torch.device(device)
        if os.path.isfile(path):
            self._load_checkpoint(path, tokenizer or BLIP_TOKENIZER)
        else:
            self._load_folder(path, tokenizer)
        for module in (self.vision, self.text, self.head):
            module.to(self.device, torch.float32).eval().requires_grad_(False)
        self.max_prompt_tokens = int(max_prompt_tokens)

    def _load_checkpoint(self, path: str, tokenizer: str) -> None:
        state_dict = read_checkpoint(path)
        if not is_image_reward_state_dict(state_dict):
            raise CheckpointMismatchError(
                f"image_reward: {path!r} is not an ImageReward checkpoint",
                absent=[
                    k
                    for k in ("blip.visual_encoder.patch_embed.proj.weight", "mlp.layers.0.weight")
                    if k not in state_dict
                ],
            )
        config = image_reward_config_from_state_dict(state_dict)
        modules = build_image_reward_modules(config, image_reward_head_config(state_dict))
        converted = image_reward_to_transformers(state_dict, config)
        modules.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
        self.vision, self.text, self.head = modules["vision"], modules["text"], modules["head"]
        self.mean, self.std = IMAGE_REWARD_MEAN, IMAGE_REWARD_STD
        try:
            self.tokenizer = _blip_tokenizer(tokenizer, config.text_config.vocab_size)
        except OSError as err:
            raise FileNotFoundError(
                f"image_reward: could not load the tokenizer {tokenizer!r} (BERT's "
                "bert-base-uncased for ImageReward.pt); give `tokenizer` a local folder "
                f"or a hub id in the cache: {err}"
            ) from err
        # ImageReward's preprocessing: Resize(224, bicubic) of the short side, CenterCrop(224), CLIP mean/std
        size = config.vision_config.image_size
        self.size, self.crop_size = size, (size, size)
        self.image_mean, self.image_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def _load_folder(self, path: str, tokenizer: str | None) -> None:
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        for part in ("blip", "head.safetensors", "head.json"):
            if not os.path.exists(os.path.join(path, part)):
                raise FileNotFoundError(
                    f"image_reward: {part} is missing from path={path!r}; expected ImageReward.pt "
                    "or a folder with blip/ (BlipForImageTextRetrieval.save_pretrained), "
                    "head.safetensors and head.json"
                )
        blip_dir = os.path.join(path, "blip")
        blip = BlipForImageTextRetrieval.from_pretrained(blip_dir)
        self.vision, self.text = blip.vision_model, blip.text_encoder
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or blip_dir)
        with open(os.path.join(path, "head.json")) as f:
            config = json.load(f)
        self.mean, self.std = float(config.pop("mean", IMAGE_REWARD_MEAN)), float(config.pop("std", IMAGE_REWARD_STD))
        self.head = AestheticHead(**config)
        self.head.load_state_dict(load_file(os.path.join(path, "head.safetensors")))
        size = blip.config.vision_config.image_size
        self.size, self.crop_size, self.image_mean, self.image_std = read_image_preprocessing(blip_dir, size)

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_tensor(images, prompts)
        pixels = clip_preprocess(
            images.to(self.device, torch.float32), self.size, self.crop_size, self.image_mean, self.image_std
        )
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_prompt_tokens, return_tensors="pt"
        ).to(self.device)
        text = self.text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device),
        )
        features = text.last_hidden_state[:, 0]
        return (self.head(features).squeeze(-1) - self.mean) / self.std


def build_tiny_image_reward(path: str, tokenizer, seed: int = 0, image_size: int = 32) -> str:
    """Save a tiny random ImageReward folder (BLIP 2-layer towers, hidden 32) to ``path``."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    blip_dir = os.path.join(path, "blip")
    os.makedirs(blip_dir, exist_ok=True)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            **TINY_TOWER,
            max_position_embeddings=64,
            encoder_hidden_size=32,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=8,
            **TINY_TOWER,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blip = BlipForImageTextRetrieval(config)
        head = AestheticHead(32, (64, 16, 8))
    blip.save_pretrained(blip_dir)
    tokenizer.save_pretrained(blip_dir)
    with open(os.path.join(blip_dir, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "image_processor_type": "BlipImageProcessor",
                "do_resize": True,
                "size": {"height": image_size, "width": image_size},
                "do_center_crop": False,
                "do_normalize": True,
            },
            f,
            indent=2,
        )
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(path, "head.safetensors"))
    with open(os.path.join(path, "head.json"), "w") as f:
        json.dump({**head.config, "mean": IMAGE_REWARD_MEAN, "std": IMAGE_REWARD_STD}, f, indent=2)
    return path
