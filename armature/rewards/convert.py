"""Key renaming from released reward checkpoints into the transformers modules the rewards run on.

Two sources:

* **open_clip CLIP** (HPS v2 / v2.1: ``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt`` from the hub
  repo ``xswu/HPSv2``; a ViT-H-14) -> transformers ``CLIPModel``
  (:func:`open_clip_to_transformers`, config from :func:`clip_config_from_open_clip`).
* **ImageReward** (``ImageReward.pt`` from ``THUDM/ImageReward``: BLIP's ViT-L/16, BLIP's BERT text
  encoder with cross-attention, an MLP head) -> :func:`build_image_reward_modules`,
  a ``ModuleDict`` of transformers' ``BlipVisionModel`` (``vision``), ``BlipTextModel`` (``text``, no
  pooler) and :class:`~armature.rewards.aesthetic.AestheticHead` (``head``)
  (:func:`image_reward_to_transformers`, config from :func:`image_reward_config_from_state_dict`).

Every source key is either renamed, or dropped because it is named in a short list of parameters
the score never uses (listed per source below); anything else is an error. The result is then checked
against the target module's own keys and shapes (built on the meta device, so nothing is allocated):
a source key no rule knows, a target key nothing produced, or a shape that differs raises
:class:`CheckpointMismatchError` listing them. There are no partial loads.

open_clip -> CLIPModel, per tower (``visual.`` prefix for the image tower; text keys are top level)::

    visual.conv1.weight                    vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                 vision_model.embeddings.class_embedding
    visual.positional_embedding            vision_model.embeddings.position_embedding.weight
    visual.ln_pre.*                        vision_model.pre_layrnorm.*
    visual.transformer.resblocks.N.        vision_model.encoder.layers.N.
        ln_1.* / ln_2.*                        layer_norm1.* / layer_norm2.*
        attn.in_proj_weight / _bias            self_attn.{q,k,v}_proj.weight / .bias (rows split in 3, q-k-v)
        attn.out_proj.*                        self_attn.out_proj.*
        mlp.c_fc.* / mlp.c_proj.*              mlp.fc1.* / mlp.fc2.*
    visual.ln_post.*                       vision_model.post_layernorm.*
    visual.proj            [width, dim]    visual_projection.weight [dim, width] (transposed: x @ proj)
    token_embedding.weight                 text_model.embeddings.token_embedding.weight
    positional_embedding                   text_model.embeddings.position_embedding.weight
    transformer.resblocks.N.*              text_model.encoder.layers.N.* (as above)
    ln_final.*                             text_model.final_layer_norm.*
    text_projection        [width, dim]    text_projection.weight [dim, width] (transposed)
    logit_scale                            logit_scale
    attn_mask (the causal mask buffer)     dropped (CLIPModel builds its own causal mask)

Semantics that carry over unchanged: open_clip applies ``ln_post`` to every token and pools token 0,
CLIPModel pools token 0 then applies ``post_layernorm`` (the same, LayerNorm is per token). open_clip
pools the text at ``argmax(token ids)``; CLIPModel at the first ``eos_token_id``: the same position
with CLIP's BPE tokenizer, whose end-of-text id (49407) is its largest. Not supported (their keys are
not mapped, so such checkpoints fail loudly): layer scale (``ls_1``/``ls_2``), attentional pooling,
``ln_attn``/``ln_inner`` variants, a text tower from HF (``text.transformer.*``), a Linear text
projection, SigLIP's ``logit_bias``. Average-pooled ViTs (``global_average_pool``) have no key of their
own and would convert to the wrong pooling: none of the HPS / PickScore models is one.

ImageReward.pt -> ModuleDict(vision, text, head)::

    blip.visual_encoder.patch_embed.proj.*     vision.embeddings.patch_embedding.*
    blip.visual_encoder.cls_token  [1,1,D]     vision.embeddings.class_embedding
    blip.visual_encoder.pos_embed  [1,T,D]     vision.embeddings.position_embedding
    blip.visual_encoder.blocks.N.              vision.encoder.layers.N.
        norm1.* / norm2.*                          layer_norm1.* / layer_norm2.*
        attn.qkv.* (packed q-k-v)                  self_attn.qkv.* (same packing, as is)
        attn.proj.*                                self_attn.projection.*
        mlp.fc1.* / mlp.fc2.*                      mlp.fc1.* / mlp.fc2.*
    blip.visual_encoder.norm.*                 vision.post_layernorm.*
    blip.text_encoder.<rest>                   text.<rest> (BLIP's med.py BertModel and transformers'
                                               BlipTextModel share every name: embeddings.{word,position}_
                                               embeddings, embeddings.LayerNorm, encoder.layer.N.attention.
                                               {self.query,key,value; output.dense,LayerNorm},
                                               crossattention.(same), intermediate.dense, output.{dense,LayerNorm})
    blip.text_encoder.embeddings.position_ids  dropped (an arange buffer; checked to be one)
    blip.vision_proj.*, blip.text_proj.*       dropped (BLIP's contrastive projections; ImageReward's
                                               score reads the text encoder's [CLS] state, never these)
    mlp.layers.K.*                             head.layers.K.* (K = 0, 2, 4, 6, 7: Linear layers between
                                               Dropouts, AestheticHead's exact layout)

Nothing of the BLIP text encoder is left out: transformers' ``BlipTextModel`` is a port of BLIP's
``med.py`` (word + absolute position embeddings without token types, post-LN BERT layers with a
cross-attention block in every layer, keys/values of width ``encoder_hidden_size`` = the ViT width).
One numerical difference remains: med.py masks padding with ``-10000`` added to the attention logits,
transformers with the dtype's minimum; after softmax both weights are 0 in float32.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping

import torch

from .aesthetic import AestheticHead

__all__ = [
    "CheckpointMismatchError",
    "unwrap_state_dict",
    "read_checkpoint",
    "is_open_clip_state_dict",
    "is_image_reward_state_dict",
    "clip_config_from_open_clip",
    "open_clip_to_transformers",
    "load_open_clip_as_transformers",
    "image_reward_config_from_state_dict",
    "image_reward_head_config",
    "image_reward_to_transformers",
    "build_image_reward_modules",
]

StateDict = dict[str, torch.Tensor]


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not map one to one onto the target module."""

    def __init__(
        self,
        what: str,
        unmatched: Iterable[str] = (),
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        shapes: Iterable[str] = (),
        absent: Iterable[str] = (),
    ):
        self.unmatched, self.missing = sorted(unmatched), sorted(missing)
        self.unexpected, self.shapes, self.absent = sorted(unexpected), sorted(shapes), sorted(absent)
        parts = [f"{what}: the checkpoint does not map onto the target model (nothing was loaded)"]
        for label, keys in (
            ("source keys the checkpoint should have but lacks", self.absent),
            ("source keys no conversion rule knows", self.unmatched),
            ("target keys the checkpoint does not provide", self.missing),
            ("converted keys the target does not have", self.unexpected),
            ("shape mismatches", self.shapes),
        ):
            if keys:
                shown = ", ".join(keys[:25]) + (f", ... ({len(keys) - 25} more)" if len(keys) > 25 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        super().__init__("\n  ".join(parts))


# ----------------------------------------------------------------------------------------------- reading


def unwrap_state_dict(obj) -> StateDict:
    """The tensor dict inside a training checkpoint: ``obj["state_dict"]`` (HPS v2's layout),
    ``obj["model"]`` or ``obj`` itself, with a DistributedDataParallel ``module.`` prefix removed."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError("the checkpoint holds no tensors (looked at the top level, 'state_dict' and 'model')")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def read_checkpoint(path: str) -> StateDict:
    """Tensors of a ``.pt``/``.pth``/``.bin`` (``torch.load``, weights only) or ``.safetensors`` file."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(path))
    return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def is_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "visual.conv1.weight" in state_dict and "token_embedding.weight" in state_dict


def is_image_reward_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "blip.visual_encoder.patch_embed.proj.weight" in state_dict and "mlp.layers.0.weight" in state_dict


# ---------------------------------------------------------------------------------------------- checking


def _layer_count(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if indices and indices != set(range(len(indices))):
        raise CheckpointMismatchError(
            f"layers under {prefix!r}", absent=[f"{prefix}{i}" for i in set(range(max(indices) + 1)) - indices]
        )
    return len(indices)


def _require(state_dict, what: str, *keys: str) -> None:
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise CheckpointMismatchError(what, absent=missing)


def _check(converted: StateDict, target: torch.nn.Module, what: str, unmatched: Iterable[str]) -> None:
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    unmatched = list(unmatched)
    missing = set(expected) - set(converted)
    unexpected = set(converted) - set(expected)
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {expected[k]}"
        for k, v in converted.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if unmatched or missing or unexpected or shapes:
        raise CheckpointMismatchError(what, unmatched, missing, unexpected, shapes)


def _on_meta(build):
    with torch.device("meta"):
        return build()


# ---------------------------------------------------------------------------------------------- open_clip

_OPEN_CLIP_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPEN_CLIP_DIRECT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_OPEN_CLIP_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# the causal mask buffer: persistent in older open_clip versions, rebuilt by CLIPModel
_OPEN_CLIP_DROPPED = {"attn_mask"}
_OPEN_CLIP_TOWERS = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
)


def clip_config_from_open_clip(
    state_dict: Mapping[str, torch.Tensor],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
    layer_norm_eps: float = 1e-5,
    **text_config,
):
    """A ``CLIPConfig`` whose shapes match an open_clip state dict.

    Widths, depths, patch and image size, context length and vocabulary are read from the shapes.
    The head counts are not in the weights: open_clip's text towers use 64-wide heads
    (``text_heads = width // 64``); its image towers 64-wide heads up to width 1024 (ViT-B, ViT-L)
    and 16 heads above (ViT-H-14: 1280 = 16 x 80, ViT-g-14, ViT-bigG-14). ``hidden_act`` is
    ``"gelu"`` for LAION-trained models (HPS v2, PickScore) and ``"quick_gelu"`` for OpenAI's
    weights. ``text_config`` overrides text settings (``eos_token_id``, ``bos_token_id``,
    ``pad_token_id``; CLIPTextConfig's defaults are CLIP's tokenizer's 49406 / 49407 / 1).
    """
    from transformers import CLIPConfig

    sd = unwrap_state_dict(state_dict)
    _require(
        sd,
        "open_clip checkpoint",
        "visual.conv1.weight",
        "visual.positional_embedding",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "text_projection",
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "transformer.resblocks.0.mlp.c_fc.weight",
    )
    conv = sd["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise ValueError(
            f"visual.positional_embedding has {sd['visual.positional_embedding'].shape[0]} rows, "
            "not 1 + a square grid of patches"
        )
    text_width = sd["token_embedding.weight"].shape[1]
    if vision_heads is None:
        vision_heads = width // 64 if width <= 1024 else 16
    if text_heads is None:
        text_heads = text_width // 64
    vision = dict(
        hidden_size=width,
        intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layer_count(sd, "visual.transformer.resblocks."),
        num_attention_heads=vision_heads,
        image_size=patch * grid,
        patch_size=patch,
        hidden_act=hidden_act,
        layer_norm_eps=layer_norm_eps,
    )
    text = dict(
        vocab_size=sd["token_embedding.weight"].shape[0],
        hidden_size=text_width,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layer_count(sd, "transformer.resblocks."),
        num_attention_heads=text_heads,
        max_position_embeddings=sd["positional_embedding"].shape[0],
        hidden_act=hidden_act,
        layer_norm_eps=layer_norm_eps,
    )
    text.update(text_config)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["visual.proj"].shape[1])


def open_clip_to_transformers(state_dict: Mapping[str, torch.Tensor], config) -> StateDict:
    """Rename an open_clip CLIP state dict into transformers ``CLIPModel``'s (see the module docstring).

    ``config`` is the target ``CLIPConfig`` (:func:`clip_config_from_open_clip` reads one from the
    shapes). Raises :class:`CheckpointMismatchError` unless every key maps and the result has exactly
    the keys and shapes of ``CLIPModel(config)``.
    """
    from transformers import CLIPModel

    sd = unwrap_state_dict(state_dict)
    out: StateDict = {}
    unmatched = []
    for key, value in sd.items():
        if key in _OPEN_CLIP_DROPPED:
            continue
        if key in _OPEN_CLIP_DIRECT:
            out[_OPEN_CLIP_DIRECT[key]] = value
            continue
        if key in _OPEN_CLIP_TRANSPOSED:
            out[_OPEN_CLIP_TRANSPOSED[key]] = value.t().contiguous()
            continue
        for source, target in _OPEN_CLIP_TOWERS:
            match = re.fullmatch(re.escape(source) + r"(\d+)\.(.+)", key)
            if match is None:
                continue
            layer, rest = target + match.group(1) + ".", match.group(2)
            if rest in _OPEN_CLIP_BLOCK:
                out[layer + _OPEN_CLIP_BLOCK[rest]] = value
            elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                if value.shape[0] % 3:
                    unmatched.append(f"{key} (first dim {value.shape[0]} is not 3 x width)")
                    break
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}.{kind}"] = part.contiguous()
            else:
                unmatched.append(key)
            break
        else:
            unmatched.append(key)
    _check(out, _on_meta(lambda: CLIPModel(config)), "open_clip -> CLIPModel", unmatched)
    return out


def load_open_clip_as_transformers(path_or_state_dict, **config_options):
    """A float32 ``CLIPModel`` holding an open_clip checkpoint (a path or a state dict);
    ``config_options`` go to :func:`clip_config_from_open_clip`."""
    from transformers import CLIPModel

    sd = path_or_state_dict
    sd = read_checkpoint(sd) if isinstance(sd, (str, os.PathLike)) else unwrap_state_dict(sd)
    if not is_open_clip_state_dict(sd):
        raise CheckpointMismatchError(
            "open_clip checkpoint", absent=[k for k in ("visual.conv1.weight", "token_embedding.weight") if k not in sd]
        )
    config = clip_config_from_open_clip(sd, **config_options)
    converted = open_clip_to_transformers(sd, config)
    model = CLIPModel(config)
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return model


# -------------------------------------------------------------------------------------------- ImageReward

_BLIP_VIT_DIRECT = {
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_BLIP_VIT_BLOCK = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.qkv.bias": "self_attn.qkv.bias",
    "attn.proj.weight": "self_attn.projection.weight",
    "attn.proj.bias": "self_attn.projection.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
# parameters of BLIP_Pretrain that ImageReward's score never reads
IMAGE_REWARD_UNUSED = (
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
)
_VIT, _TEXT, _MLP = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."


def build_image_reward_modules(config, head_config: dict) -> torch.nn.ModuleDict:
    """ImageReward's parts as transformers modules: ``vision`` (``BlipVisionModel``), ``text``
    (``BlipTextModel`` without pooler, cross-attending to the image tokens) and ``head``
    (:class:`AestheticHead`); ``config`` is a ``BlipConfig``. The target of
    :func:`image_reward_to_transformers`."""
    from transformers import BlipTextModel, BlipVisionModel

    return torch.nn.ModuleDict(
        {
            "vision": BlipVisionModel(config.vision_config),
            "text": BlipTextModel(config.text_config, add_pooling_layer=False),
            "head": AestheticHead(**head_config),
        }
    )


def image_reward_head_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """``AestheticHead`` arguments read from the ``mlp.layers.K`` Linear shapes."""
    indices = sorted({int(k[len(_MLP) :].split(".")[0]) for k in state_dict if k.startswith(_MLP)})
    if not indices:
        raise CheckpointMismatchError("ImageReward head", absent=["mlp.layers.*"])
    widths = [state_dict[f"{_MLP}{i}.weight"].shape[0] for i in indices if f"{_MLP}{i}.weight" in state_dict]
    return {
        "in_features": int(state_dict[f"{_MLP}{indices[0]}.weight"].shape[1]),
        "hidden_sizes": [int(w) for w in widths[:-1]],
    }


def image_reward_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    **text_config,
):
    """A ``BlipConfig`` whose towers match an ImageReward state dict.

    Shapes give the widths, depths, patch and image size, vocabulary and the cross-attention width.
    Head counts default to ``width // 64`` (ImageReward: ViT-L 1024 -> 16 heads, BERT-base 768 -> 12).
    Fixed by BLIP: ViT LayerNorm eps 1e-6, BERT LayerNorm eps 1e-12, exact GELU, pad id 0.
    """
    from transformers import BlipConfig

    sd = unwrap_state_dict(state_dict)
    _require(
        sd,
        "ImageReward checkpoint",
        _VIT + "patch_embed.proj.weight",
        _VIT + "pos_embed",
        _VIT + "blocks.0.mlp.fc1.weight",
        _TEXT + "embeddings.word_embeddings.weight",
        _TEXT + "embeddings.position_embeddings.weight",
        _TEXT + "encoder.layer.0.intermediate.dense.weight",
        _TEXT + "encoder.layer.0.crossattention.self.key.weight",
    )
    conv = sd[_VIT + "patch_embed.proj.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    tokens = sd[_VIT + "pos_embed"].shape[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid + 1 != tokens:
        raise ValueError(f"{_VIT}pos_embed has {tokens} positions, not 1 + a square grid of patches")
    text_width = sd[_TEXT + "embeddings.word_embeddings.weight"].shape[1]
    vision = dict(
        hidden_size=width,
        intermediate_size=sd[_VIT + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_layer_count(sd, _VIT + "blocks."),
        num_attention_heads=vision_heads or width // 64,
        image_size=patch * grid,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    text = dict(
        vocab_size=sd[_TEXT + "embeddings.word_embeddings.weight"].shape[0],
        hidden_size=text_width,
        intermediate_size=sd[_TEXT + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_layer_count(sd, _TEXT + "encoder.layer."),
        num_attention_heads=text_heads or text_width // 64,
        max_position_embeddings=sd[_TEXT + "embeddings.position_embeddings.weight"].shape[0],
        encoder_hidden_size=sd[_TEXT + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    text.update(text_config)
    return BlipConfig(text_config=text, vision_config=vision)


def image_reward_to_transformers(state_dict: Mapping[str, torch.Tensor], config=None) -> StateDict:
    """Rename an ``ImageReward.pt`` state dict into the keys of
    :func:`build_image_reward_modules` (``vision.*``, ``text.*``,
    ``head.*``; see the module docstring). ``config`` is the ``BlipConfig`` of the towers
    (default: :func:`image_reward_config_from_state_dict`). Raises :class:`CheckpointMismatchError`
    unless every key maps and the result has exactly the target's keys and shapes.
    """
    sd = unwrap_state_dict(state_dict)
    config = config if config is not None else image_reward_config_from_state_dict(sd)
    out: StateDict = {}
    unmatched = []
    for key, value in sd.items():
        if key in IMAGE_REWARD_UNUSED:
            continue
        if key.startswith(_VIT):
            rest = key[len(_VIT) :]
            match = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
            if rest in _BLIP_VIT_DIRECT:
                out["vision." + _BLIP_VIT_DIRECT[rest]] = value
            elif match and match.group(2) in _BLIP_VIT_BLOCK:
                out[f"vision.encoder.layers.{match.group(1)}.{_BLIP_VIT_BLOCK[match.group(2)]}"] = value
            else:
                unmatched.append(key)
        elif key.startswith(_TEXT):
            rest = key[len(_TEXT) :]
            if rest == "embeddings.position_ids":
                if not value.is_meta and not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                    unmatched.append(f"{key} (not 0, 1, 2, ...: custom position ids are not supported)")
                continue
            out["text." + rest] = value
        elif key.startswith(_MLP):
            out["head.layers." + key[len(_MLP) :]] = value
        else:
            unmatched.append(key)
    head_config = image_reward_head_config(sd)
    _check(
        out,
        _on_meta(lambda: build_image_reward_modules(config, head_config)),
        "ImageReward -> transformers BLIP",
        unmatched,
    )
    return out
