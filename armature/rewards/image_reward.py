"""ImageReward (Xu et al., 2023) built from transformers' BLIP pieces.

ImageReward is BLIP's image-grounded text encoder with an MLP head:

    v = BLIP_ViT(preprocess(image))                           image tokens
    t = BLIP_text_encoder(prompt, cross-attending to v)[:, 0]  the [CLS] feature
    reward = (MLP(t) - mu) / sigma                             (mu, sigma fixed from training)

transformers' ``BlipForImageTextRetrieval`` holds exactly those two towers
(``vision_model`` and the cross-attending ``text_encoder``); the MLP has the LAION
aesthetic head's shape (Linear-Dropout chains without activations, 768 -> 1024 -> 128 ->
64 -> 16 -> 1), so :class:`~armature.rewards.aesthetic.AestheticHead` is reused.

Folder layout::

    path/
      blip/               BlipForImageTextRetrieval.save_pretrained + tokenizer + preprocessor_config.json
      head.safetensors    AestheticHead state dict
      head.json           {"in_features", "hidden_sizes", "dropout", "mean", "std"}

The released ``ImageReward.pt`` uses the original BLIP repository's parameter names
(``visual_encoder.blocks.N...``, ``text_encoder.encoder.layer.N...``); it loads here once
renamed to transformers' BLIP names (a key mapping; not shipped). Tests use
:func:`build_tiny_image_reward`. Differentiable in the pixels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file

from .aesthetic import AestheticHead
from .base import DifferentiableReward
from .clip_score import clip_preprocess, read_image_preprocessing
from .registry import register

__all__ = ["ImageReward", "build_tiny_image_reward"]

# ImageReward's normalisation of the raw head output (from its release)
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072


@register("image_reward")
class ImageReward(DifferentiableReward):
    """ImageReward score of (image, prompt) pairs; see the module docstring."""

    name = "image_reward"

    def __init__(self, path: str, device: str = "cpu", max_prompt_tokens: int = 35):
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        path = os.fspath(path)
        for part in ("blip", "head.safetensors", "head.json"):
            if not os.path.exists(os.path.join(path, part)):
                raise FileNotFoundError(f"image_reward: {part} is missing from path={path!r}; expected blip/ "
                                        "(BlipForImageTextRetrieval.save_pretrained), head.safetensors and head.json")
        blip_dir = os.path.join(path, "blip")
        self.device = torch.device(device)
        blip = BlipForImageTextRetrieval.from_pretrained(blip_dir)
        self.vision, self.text = blip.vision_model, blip.text_encoder
        for module in (self.vision, self.text):
            module.to(self.device, torch.float32).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(blip_dir)
        with open(os.path.join(path, "head.json")) as f:
            config = json.load(f)
        self.mean, self.std = float(config.pop("mean", IMAGE_REWARD_MEAN)), float(config.pop("std", IMAGE_REWARD_STD))
        self.head = AestheticHead(**config)
        self.head.load_state_dict(load_file(os.path.join(path, "head.safetensors")))
        self.head.to(self.device).eval().requires_grad_(False)
        self.max_prompt_tokens = int(max_prompt_tokens)
        size = blip.config.vision_config.image_size
        self.size, self.crop_size, self.image_mean, self.image_std = read_image_preprocessing(blip_dir, size)

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check_tensor(images, prompts)
        pixels = clip_preprocess(images.to(self.device, torch.float32), self.size, self.crop_size,
                                 self.image_mean, self.image_std)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_prompt_tokens, return_tensors="pt").to(self.device)
        text = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         encoder_hidden_states=image_tokens,
                         encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device))
        features = text.last_hidden_state[:, 0]
        return (self.head(features).squeeze(-1) - self.mean) / self.std


def build_tiny_image_reward(path: str, tokenizer, seed: int = 0, image_size: int = 32) -> str:
    """Save a tiny random ImageReward folder (BLIP 2-layer towers, hidden 32) to ``path``."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    blip_dir = os.path.join(path, "blip")
    os.makedirs(blip_dir, exist_ok=True)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         sep_token_id=tokenizer.eos_token_id),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=32, image_text_hidden_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blip = BlipForImageTextRetrieval(config)
        head = AestheticHead(32, (64, 16, 8))
    blip.save_pretrained(blip_dir)
    tokenizer.save_pretrained(blip_dir)
    with open(os.path.join(blip_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "BlipImageProcessor", "do_resize": True,
                   "size": {"height": image_size, "width": image_size}, "do_center_crop": False,
                   "do_normalize": True}, f, indent=2)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(path, "head.safetensors"))
    with open(os.path.join(path, "head.json"), "w") as f:
        json.dump({**head.config, "mean": IMAGE_REWARD_MEAN, "std": IMAGE_REWARD_STD}, f, indent=2)
    return path
