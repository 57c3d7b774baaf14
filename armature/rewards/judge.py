"""Multimodal-LLM judge (seed 003: MLLMs as evaluators of generated images).

A transformers vision-language model is asked attribute-specific questions about each
image -- anatomy, artifacts, aesthetics, composition, object adherence, style -- and
answers on a Likert scale ``1..scale``. The templates live in config
(``configs/reward/mllm_judge.yaml``); ``{prompt}`` and ``{scale}`` are filled in. The
answer's first integer in ``1..scale`` is the rating ``r``; the reward is the weighted
mean over attributes of ``(r - 1) / (scale - 1)`` (in [0, 1]).

A malformed answer (no integer in range) is a *counted failure*, never a crash: that
attribute is left out of the image's mean, and an image with no valid answer gets
``failure_score``. ``judge.stats`` counts questions and failures per attribute.

``constrained: true`` reads the answer from one forward pass instead of free generation:
the rating is the digit token (``"1"``..``"9"``) with the highest next-token logit, so
the model cannot answer off-scale (the answer still goes through the same parser).

:meth:`MLLMJudge.compare` asks a pairwise question (two images, "1" or "2").

``path`` is a hub id or folder loaded with ``AutoProcessor`` and
``AutoModelForImageTextToText`` (e.g. LLaVA, Qwen2-VL, Idefics); the processor's chat
template places the image. :func:`build_tiny_vlm` saves a tiny random LLaVA for tests.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping

import numpy as np
import PIL.Image
import torch

from .base import Reward
from .registry import register

__all__ = ["MLLMJudge", "parse_likert", "parse_choice", "DEFAULT_TEMPLATES", "build_tiny_vlm"]

DEFAULT_TEMPLATES = {
    "anatomy": 'The image was generated for the prompt "{prompt}". Rate the anatomical correctness of any '
    "people or animals (limbs, hands, faces) from 1 (badly malformed) to {scale} (flawless). "
    "Answer with one number.",
    "artifacts": "Rate how free this image is of visual artifacts (distortions, duplicated parts, smears) "
    "from 1 (many) to {scale} (none). Answer with one number.",
    "aesthetics": "Rate the aesthetic quality of this image from 1 (poor) to {scale} (excellent). "
    "Answer with one number.",
    "composition": "Rate the composition of this image from 1 (poor) to {scale} (excellent). Answer with one number.",
    "object_adherence": 'Does this image show what the prompt "{prompt}" asks for? Rate from 1 (not at all) '
    "to {scale} (exactly). Answer with one number.",
    "style": 'Rate how well the style of this image matches the prompt "{prompt}" from 1 (not at all) to '
    "{scale} (perfectly). Answer with one number.",
}
PAIRWISE_TEMPLATE = (
    'Two images were generated for the prompt "{prompt}". Which one is better in {attribute}? '
    "Answer 1 for the first image or 2 for the second."
)


def parse_likert(text: str, scale: int) -> int | None:
    """The first integer of ``text`` that is in ``1..scale`` (``"4/5"`` -> 4, ``"Rating: 3."`` -> 3),
    or None when there is none (``"excellent"``, ``"7"`` on a 5-point scale, ``""``)."""
    for match in re.finditer(r"(?<![\d.])(\d+)(?![\d]|\.\d)", text or ""):
        value = int(match.group(1))
        if 1 <= value <= scale:
            return value
        break  # the first number is out of range: a malformed answer, not a search for a valid one
    return None


def parse_choice(text: str) -> int | None:
    """``1`` or ``2`` from a pairwise answer (``"Image 2"``, ``"2"``, ``"the first"``), else None."""
    text = (text or "").strip().lower()
    numbers = re.findall(r"\b([12])\b", text)
    if numbers:
        return int(numbers[0])
    if re.search(r"\bfirst\b", text):
        return 1
    if re.search(r"\bsecond\b", text):
        return 2
    return None


@register("mllm_judge")
class MLLMJudge(Reward):
    """Likert ratings of a multimodal LLM, averaged over weighted attributes, in [0, 1].

    Args:
        path: hub id or folder of the VLM (``AutoModelForImageTextToText`` + ``AutoProcessor``).
        attributes: ``{attribute: weight}``; every attribute needs a template.
        templates: ``{attribute: question}`` (``{prompt}``, ``{scale}`` filled in); merged over
            :data:`DEFAULT_TEMPLATES`.
        scale: Likert points (2..9).
        constrained: rate by the best digit token's logit instead of generating text.
        max_new_tokens: generation length for unconstrained answers.
        failure_score: the score of an image with no valid answer.
        device: where the model runs.
    """

    name = "mllm_judge"

    def __init__(
        self,
        path: str,
        attributes: Mapping[str, float] | None = None,
        templates: Mapping[str, str] | None = None,
        scale: int = 5,
        constrained: bool = False,
        max_new_tokens: int = 8,
        failure_score: float = 0.5,
        device: str = "cpu",
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not 2 <= int(scale) <= 9:
            raise ValueError(f"mllm_judge: scale must be 2..9 (one digit token a rating), got {scale}")
        self.scale = int(scale)
        self.templates = {**DEFAULT_TEMPLATES, **dict(templates or {})}
        self.attributes = {k: float(v) for k, v in dict(attributes or {"anatomy": 1.0, "artifacts": 1.0}).items()}
        unknown = [a for a in self.attributes if a not in self.templates]
        if unknown:
            raise ValueError(
                f"mllm_judge: attributes {unknown} have no template; add templates.<name> "
                f"(known: {sorted(self.templates)})"
            )
        if not self.attributes or min(self.attributes.values()) < 0 or sum(self.attributes.values()) <= 0:
            raise ValueError(f"mllm_judge: attributes must map names to weights >= 0, not all 0; got {self.attributes}")
        self.constrained = bool(constrained)
        self.max_new_tokens = int(max_new_tokens)
        self.failure_score = float(failure_score)
        self.device = torch.device(device)
        path = os.fspath(path)
        try:
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = AutoModelForImageTextToText.from_pretrained(path)
        except OSError as err:
            raise FileNotFoundError(
                f"mllm_judge: could not load a vision-language model from path={path!r}: {err}"
            ) from err
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = self.processor.tokenizer
        self.digit_ids = [self._single_token(str(d)) for d in range(1, self.scale + 1)]
        self.stats: Counter = Counter()
        self.last_answers: list[str] = []

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"mllm_judge: the tokenizer splits {text!r} into {len(ids)} tokens; constrained "
                "rating needs one token per digit"
            )
        return ids[0]

    def _inputs(self, images: list[PIL.Image.Image], question: str):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return self.processor(images=images, text=text, return_tensors="pt").to(self.device)

    @torch.no_grad()
    def ask(self, images: list[PIL.Image.Image], question: str) -> str:
        """The model's answer to ``question`` about ``images`` (one or more)."""
        inputs = self._inputs(images, question)
        if self.constrained:
            logits = self.model(**inputs).logits[0, -1]
            best = int(torch.argmax(logits[self.digit_ids]))
            return str(best + 1)
        out = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def rate(self, image: PIL.Image.Image, prompt: str, attribute: str) -> int | None:
        """One Likert rating, or None (counted in ``stats``) for a malformed answer."""
        question = self.templates[attribute].format(prompt=prompt, scale=self.scale)
        answer = self.ask([image.convert("RGB")], question)
        self.last_answers.append(answer)
        rating = parse_likert(answer, self.scale)
        self.stats[f"{attribute}/asked"] += 1
        if rating is None:
            self.stats[f"{attribute}/failed"] += 1
        return rating

    def compare(
        self, image_a: PIL.Image.Image, image_b: PIL.Image.Image, prompt: str, attribute: str = "anatomy"
    ) -> int | None:
        """Pairwise judgement: 1 if the model prefers ``image_a``, 2 for ``image_b``, None if malformed."""
        question = PAIRWISE_TEMPLATE.format(prompt=prompt, attribute=attribute.replace("_", " "))
        answer = self.ask([image_a.convert("RGB"), image_b.convert("RGB")], question)
        choice = parse_choice(answer)
        self.stats["pairwise/asked"] += 1
        if choice is None:
            self.stats["pairwise/failed"] += 1
        return choice

    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray:
        self.last_answers = []
        scores = []
        for image, prompt in zip(images, prompts):
            total = weight_sum = 0.0
            for attribute, weight in self.attributes.items():
                rating = self.rate(image, prompt, attribute)
                if rating is not None and weight > 0:
                    total += weight * (rating - 1) / (self.scale - 1)
                    weight_sum += weight
            scores.append(total / weight_sum if weight_sum > 0 else self.failure_score)
        return np.asarray(scores, dtype=np.float32)


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tiny_vlm(path: str, seed: int = 0) -> str:
    """Save a tiny random LLaVA (CLIP vision tower 32x32 / patch 8, 2-layer Llama, a
    character-level tokenizer with an ``<image>`` token, a chat template) to ``path``; it
    loads through :class:`MLLMJudge`'s ``AutoProcessor`` / ``AutoModelForImageTextToText``."""
    import string

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation + " "))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=512,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_size, patch = 32, 8
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 3
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
