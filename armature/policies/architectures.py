"""The supported families at their published architectures, randomly initialised, offline.

``armature/policies/arch/<name>.json`` holds the published diffusers configs of each family's
components (SD 1.5, SDXL base, SD 3.5 medium, FLUX.1-dev): the same classes, widths, head
layouts, text encoders and schedulers as the released checkpoints, without their weights. Such a
model samples noise, but every shape, module name and memory figure is that of the real one.

Tokenizers: the CLIP ones are the real 49408-token CLIP BPE, read from the vocabulary file that
the ``open_clip_torch`` package ships. No PyPI package ships T5's SentencePiece vocabulary, so
the T5 tokenizer is a stand-in of its size (32100 tokens: T5's pad, eos and unk ids 0-2, the
CLIP byte-level BPE cut to fit, and T5's 100 sentinel tokens); its ids are not T5's.

``depth`` keeps at most that many blocks in each stack of repeated blocks (the transformer's
blocks, each text encoder's layers, SDXL's transformer layers per UNet block), every block at
full width: FLUX.1 (12B parameters) and T5-XXL (4.7B) do not fit a small machine in float32.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import json
from pathlib import Path

import torch

from armature.policies.config import LoraParams, SamplingParams
from armature.policies.diffusion import DiffusionPolicy

__all__ = [
    "ARCHITECTURES",
    "architecture_spec",
    "architecture_policy",
    "build_architecture_pipeline",
    "build_component",
    "clip_tokenizer",
    "default_lora",
    "t5_standin_tokenizer",
]

ARCH_DIR = Path(__file__).with_name("arch")
ARCHITECTURES = ("sd15", "sdxl", "sd3", "flux")  # also the names of their configs/model/*.yaml
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses: 49408 tokens = 2 x 256 bytes + merges + 2 specials
T5_VOCAB = 32100  # T5 v1.1: 32000 SentencePiece pieces + 100 sentinels (its embedding pads to 32128 rows)
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
T5_SENTINELS = [f"<extra_id_{i}>" for i in reversed(range(100))]  # extra_id_0 is the last id, as in T5


def architecture_spec(name: str) -> dict:
    """The data of ``arch/<name>.json``: family, pipeline class and each component's config."""
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name!r}: expected one of {', '.join(ARCHITECTURES)}")
    return json.loads((ARCH_DIR / f"{name}.json").read_text())


def default_lora(name: str) -> LoraParams:
    """The family's default LoRA adapter: the ``lora`` section of ``configs/model/<name>.yaml``."""
    from omegaconf import OmegaConf

    architecture_spec(name)  # a clear error for an unknown name
    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / f"{name}.yaml"
    lora = OmegaConf.to_container(OmegaConf.load(conf).lora)
    return LoraParams(rank=lora["rank"], alpha=lora["alpha"], target_modules=list(lora["target_modules"]))


# ---------------------------------------------------------------------------------- tokenizers
@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP's byte-level BPE: its non-special symbols in id order, and its merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = importlib.util.find_spec("open_clip")  # located, not imported (it would need torchvision)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the real CLIP vocabulary is read from the open_clip_torch package's data: "
            "pip install --no-deps 'open_clip_torch>=2.20' (or the armature[arch] extra)"
        )
    path = Path(spec.submodule_search_locations[0]) / CLIP_VOCAB_FILE
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGES]]  # line 0 is a header
    byte_symbols = list(bytes_to_unicode().values())
    symbols = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    return symbols, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """The real CLIP tokenizer (49408 tokens), as transformers' ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    symbols, merges = _clip_bpe()
    vocab = {s: i for i, s in enumerate(symbols + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)


def t5_standin_tokenizer(model_max_length: int = 512):
    """A stand-in of T5's tokenizer with its vocabulary size and special ids (see the module doc)."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    symbols, merges = _clip_bpe()
    kept = T5_VOCAB - len(T5_SPECIALS) - len(T5_SENTINELS) - 512  # merges that fit beside the 512 byte symbols
    vocab = {s: i for i, s in enumerate(T5_SPECIALS + symbols[: 512 + kept] + T5_SENTINELS)}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges[:kept],
            end_of_word_suffix="</w>",
            continuing_subword_prefix="",
            unk_token="<unk>",
        )
    )
    clip = clip_tokenizer().backend_tokenizer  # the same text normalisation and pre-tokenisation
    tok.normalizer, tok.pre_tokenizer, tok.decoder = clip.normalizer, clip.pre_tokenizer, clip.decoder
    tok.add_special_tokens(T5_SPECIALS + T5_SENTINELS)
    tok.post_processor = processors.TemplateProcessing(  # T5 appends </s>, prepends nothing
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _tokenizer(spec: dict):
    if spec["kind"] == "clip":
        return clip_tokenizer(spec["pad_token"], spec["model_max_length"])
    return t5_standin_tokenizer(spec["model_max_length"])


# ---------------------------------------------------------------------------------- models
def _limit_depth(config: dict, keys: list[str], depth: int | None) -> dict:
    config = dict(config)
    if depth is None:
        return config
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1 (or None for the published depth)")
    for key in keys:
        value = config[key]
        config[key] = [min(v, depth) for v in value] if isinstance(value, list) else min(value, depth)
    if "dual_attention_layers" in config:  # SD 3.5's MMDiT-X blocks among those kept
        config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < config["num_layers"]]
    return config


def _module(spec: dict, depth: int | None):
    import diffusers
    import transformers

    config = _limit_depth(spec["config"], spec.get("depth", []), depth)
    if hasattr(diffusers, spec["class"]):  # models and schedulers
        return getattr(diffusers, spec["class"])(**config)
    cls = getattr(transformers, spec["class"])  # text encoders
    return cls(cls.config_class(**config))


def _build(spec: dict, depth: int | None):
    return _tokenizer(spec) if "kind" in spec else _module(spec, depth)


def build_component(
    name: str, component: str, *, depth: int | None = None, seed: int = 0, device: str | torch.device | None = None
):
    """One component of ``name`` (e.g. ``unet``, ``transformer``, ``text_encoder_2``), random
    weights from ``seed``. ``device="meta"`` builds the module without allocating its weights."""
    spec = architecture_spec(name)["components"]
    if component not in spec:
        raise ValueError(f"architecture {name!r} has no component {component!r}: it has {', '.join(spec)}")
    with torch.random.fork_rng(devices=[]), torch.device(device) if device else contextlib.nullcontext():
        torch.manual_seed(seed)
        return _build(spec[component], depth)


def build_architecture_pipeline(name: str, *, depth: int | None = None, seed: int = 0):
    """The diffusers pipeline of ``name`` with random weights (deterministic in ``seed``)."""
    import diffusers

    spec = architecture_spec(name)
    parts = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for key, component in spec["components"].items():
            parts[key] = _build(component, depth)
    if spec["family"] == "sd":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, spec["pipeline"])(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def architecture_policy(
    name: str, *, depth: int | None = None, seed: int = 0, sampling: SamplingParams | None = None, device: str = "cpu"
) -> DiffusionPolicy:
    """A :class:`DiffusionPolicy` over :func:`build_architecture_pipeline` (float32, no adapter)."""
    pipe = build_architecture_pipeline(name, depth=depth, seed=seed)
    return DiffusionPolicy(pipe, architecture_spec(name)["family"], sampling, device)
