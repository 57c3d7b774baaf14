"""Tiny Stable-Diffusion-, SD3- and FLUX-shaped models built from configs, for CPU jobs and tests.

Every component is a real diffusers / transformers class (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, DDIMScheduler), only small and randomly initialised from a seed, so the code
paths are exactly those of SD 1.5. The tokenizer is a character-level ``tokenizers`` WordLevel
model wrapped in ``PreTrainedTokenizerFast``: it needs no download.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, fields

import torch

__all__ = [
    "TinySDConfig",
    "TinyFlowConfig",
    "build_tiny_sd_pipeline",
    "build_tiny_flow_pipeline",
    "build_char_tokenizer",
    "tiny_clip",
    "tiny_config",
    "tiny_t5",
    "tiny_vae",
]


@dataclass
class TinySDConfig:
    seed: int = 0
    image_size: int = 32  # pixels; latents are image_size // 2 ** (len(vae_channels) - 1)
    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (16, 32)  # one VAE level per entry, a downsampling between two
    latent_channels: int = 4
    # kl: AutoencoderKL (SD's VAE); taesd: AutoencoderTiny, no normalisation layers, so flat
    # colours survive the round trip (what the anatomy gym's policy uses)
    vae_kind: str = "kl"
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
        vae_levels = len(cfg.vae_channels)
        unet = UNet2DConditionModel(
            sample_size=cfg.image_size // 2 ** (vae_levels - 1),
            in_channels=cfg.latent_channels,
            out_channels=cfg.latent_channels,
            block_out_channels=channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
            cross_attention_dim=cfg.text_hidden,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        if cfg.vae_kind == "taesd":
            from diffusers import AutoencoderTiny

            if len(set(cfg.vae_channels)) != 1:
                raise ValueError(
                    f"tiny.vae_channels={list(cfg.vae_channels)}: vae_kind=taesd needs one width "
                    "for every level, e.g. [32, 32]"
                )

            vae = AutoencoderTiny(
                encoder_block_out_channels=tuple(cfg.vae_channels),
                decoder_block_out_channels=tuple(cfg.vae_channels),
                num_encoder_blocks=(1,) + (2,) * (vae_levels - 1),
                num_decoder_blocks=(2,) * (vae_levels - 1) + (1,),
                latent_channels=cfg.latent_channels,
            )
        elif cfg.vae_kind == "kl":
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * vae_levels,
                up_block_types=("UpDecoderBlock2D",) * vae_levels,
                block_out_channels=tuple(cfg.vae_channels),
                latent_channels=cfg.latent_channels,
                norm_num_groups=8,
                sample_size=cfg.image_size,
            )
        else:
            raise ValueError(f"tiny.vae_kind={cfg.vae_kind!r}: use kl or taesd")
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


@dataclass
class TinyFlowConfig:
    """A tiny rectified-flow model: ``arch`` sd3 (SD3Transformer2DModel, two CLIPs and a T5)
    or flux (FluxTransformer2DModel, one CLIP and a T5, packed latents)."""

    arch: str = "sd3"
    seed: int = 0
    image_size: int = 32  # pixels; latents are image_size // 2 (one VAE downsampling)
    text_hidden: int = 32  # each CLIP; the T5 has 2 * text_hidden
    text_layers: int = 2
    max_prompt_tokens: int = 32
    transformer_layers: int = 2
    transformer_heads: int = 4
    head_dim: int = 8
    shift: float = 3.0  # the scheduler's timestep shift (SD3 ships 3.0)


def tiny_vae(image_size: int, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def tiny_clip(tokenizer, hidden: int, layers: int, max_tokens: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=max_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_t5(tokenizer, d_model: int, layers: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=d_model // 4,
            d_ff=2 * d_model,
            num_layers=layers,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def build_tiny_flow_pipeline(config: TinyFlowConfig | None = None):
    """A randomly initialised, deterministic (per seed) StableDiffusion3Pipeline or FluxPipeline.

    Everything but the sizes is as in the real models: the same transformer classes, text
    encoders, VAE and ``FlowMatchEulerDiscreteScheduler``; the tokenizers are the character-level
    one of the tiny SD model (no download).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = config or TinyFlowConfig()
    if cfg.arch not in ("sd3", "flux"):
        raise ValueError(f"model.tiny_flow.arch={cfg.arch!r}: use sd3 or flux")
    if cfg.image_size % 8:
        raise ValueError(f"tiny.image_size={cfg.image_size} must be a multiple of 8")
    tokenizer = build_char_tokenizer(cfg.max_prompt_tokens)
    t5_tokenizer = build_char_tokenizer(cfg.max_prompt_tokens)
    inner = cfg.transformer_heads * cfg.head_dim
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        clip = tiny_clip(tokenizer, cfg.text_hidden, cfg.text_layers, cfg.max_prompt_tokens, cfg.arch == "sd3")
        t5 = tiny_t5(t5_tokenizer, 2 * cfg.text_hidden, 1)
        vae = tiny_vae(cfg.image_size)
        if cfg.arch == "sd3":
            from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

            clip_2 = tiny_clip(tokenizer, cfg.text_hidden, cfg.text_layers, cfg.max_prompt_tokens, True)
            transformer = SD3Transformer2DModel(
                sample_size=cfg.image_size // 2,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=cfg.transformer_layers,
                attention_head_dim=cfg.head_dim,
                num_attention_heads=cfg.transformer_heads,
                joint_attention_dim=2 * cfg.text_hidden,
                caption_projection_dim=inner,
                pooled_projection_dim=2 * cfg.text_hidden,
                pos_embed_max_size=max(16, cfg.image_size // 4),
            )
            scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
            return StableDiffusion3Pipeline(
                transformer=transformer,
                scheduler=scheduler,
                vae=vae,
                text_encoder=clip,
                tokenizer=tokenizer,
                text_encoder_2=clip_2,
                tokenizer_2=tokenizer,
                text_encoder_3=t5,
                tokenizer_3=t5_tokenizer,
            )
        from diffusers import FluxPipeline, FluxTransformer2DModel

        if cfg.head_dim % 4:
            raise ValueError(f"model.tiny_flow.head_dim={cfg.head_dim}: FLUX's rotary axes need a multiple of 4")
        quarter = cfg.head_dim // 4
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=max(1, cfg.transformer_layers // 2),
            num_single_layers=max(1, cfg.transformer_layers - cfg.transformer_layers // 2),
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.transformer_heads,
            joint_attention_dim=2 * cfg.text_hidden,
            pooled_projection_dim=cfg.text_hidden,
            guidance_embeds=False,
            axes_dims_rope=(2 * quarter, quarter, quarter),
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def tiny_config(tiny: dict, family: str = "tiny") -> TinySDConfig | TinyFlowConfig:
    """The ``model.tiny`` section as the builder's config; keys of the other kind are ignored."""
    kind = TinyFlowConfig if family == "tiny_flow" else TinySDConfig
    names = {f.name for f in fields(kind)}
    tiny = {k: v for k, v in dict(tiny).items() if k in names}
    for key in ("unet_channels", "vae_channels"):
        if key in tiny:
            tiny[key] = tuple(tiny[key])
    return kind(**tiny)
