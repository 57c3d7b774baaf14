"""Tiny Stable-Diffusion-shaped models built from configs, for CPU jobs and tests.

Every component is a real diffusers / transformers class (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, DDIMScheduler), only small and randomly initialised from a seed, so the code
paths are exactly those of SD 1.5. The tokenizer is a character-level ``tokenizers`` WordLevel
model wrapped in ``PreTrainedTokenizerFast``: it needs no download.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

__all__ = ["TinySDConfig", "build_tiny_sd_pipeline", "build_char_tokenizer"]


@dataclass
class TinySDConfig:
    seed: int = 0
    image_size: int = 32  # pixels; latents are image_size // 2 (one VAE downsampling)
    unet_channels: tuple[int, ...] = (32, 64)
    text_hidden: int = 32
    text_layers: int = 2
    max_prompt_tokens: int = 32


def build_char_tokenizer(max_length: int = 32):
    """A character-level tokenizer over printable ASCII, with CLIP-like special tokens."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation + " "))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
    )


def build_tiny_sd_pipeline(config: TinySDConfig | None = None):
    """A randomly initialised, deterministic (per seed) StableDiffusionPipeline of ~1M parameters."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = config or TinySDConfig()
    if cfg.image_size % 8:
        raise ValueError(f"tiny.image_size={cfg.image_size} must be a multiple of 8")
    tokenizer = build_char_tokenizer(cfg.max_prompt_tokens)

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.text_hidden,
                intermediate_size=2 * cfg.text_hidden,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=4,
                max_position_embeddings=cfg.max_prompt_tokens,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                projection_dim=cfg.text_hidden,
            )
        )
        channels = tuple(cfg.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=cfg.image_size // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
            cross_attention_dim=cfg.text_hidden,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=cfg.image_size,
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
