"""Checkpoint conversion for HPS v2 (open_clip CLIP) and ImageReward (BLIP): tiny random models
written here in the *source* format, with the source's parameter names and forward pass in plain
torch (open_clip and ImageReward are not installed), are saved, converted, loaded into the
transformers modules the rewards run on, and must compute the same embeddings and scores."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from armature.rewards import load
from armature.rewards.convert import (
    CheckpointMismatchError,
    clip_config_from_open_clip,
    image_reward_config_from_state_dict,
    image_reward_head_config,
    image_reward_to_transformers,
    open_clip_to_transformers,
)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
PROMPTS = ["a red figure waving", "two blue cats on a sofa"]


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (LayerNorm scales around 1), so no mapping mistake hides behind an init value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_scale = name.endswith("weight") and param.dim() == 1
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.2 * noise)
    return module.eval()


def _images(n=2, size=32):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _pixels(images):
    """CLIP-normalised pixels of images already at the model's size (no resize or crop), in float32
    as the rewards compute them (random towers amplify float64-vs-float32 rounding past 1e-5)."""
    # contiguous, as pil_to_tensor gives them: a permuted view takes another convolution kernel,
    # whose different summation order the random towers also amplify past 1e-5
    array = torch.tensor(np.stack([np.asarray(i, np.float32) / 255.0 for i in images])).permute(0, 3, 1, 2)
    array = array.contiguous()
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (array - mean) / std


def _word_tokenizer(specials_first, specials_last, post):
    """A character-level fast tokenizer with the given special tokens before / after the characters."""
    import string

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_lowercase + string.digits + " "))
    vocab = {tok: i for i, tok in enumerate(specials_first + chars + specials_last)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=post["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{post['bos']} $A {post['eos']}",
        special_tokens=[(post["bos"], vocab[post["bos"]]), (post["eos"], vocab[post["eos"]])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **post["kwargs"])


# ---------------------------------------------------------------------------------------- open_clip


class OpenClipBlock(nn.Module):
    """open_clip's ResidualAttentionBlock: pre-LN, nn.MultiheadAttention (packed in_proj), GELU MLP."""

    def __init__(self, width, heads, mlp):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=nn.GELU(), c_proj=nn.Linear(mlp, width)))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self, width, layers, heads, mlp):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenClipBlock(width, heads, mlp) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class OpenClipVisual(nn.Module):
    def __init__(self, image_size, patch, width, layers, heads, mlp, embed_dim):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = OpenClipTransformer(width, layers, heads, mlp)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        return x[:, 0] @ self.proj


class OpenClip(nn.Module):
    """open_clip's CLIP (ViT image tower, causal text tower pooled at argmax of the token ids)."""

    def __init__(
        self,
        image_size=32,
        patch=8,
        vision_width=192,
        vision_heads=3,
        text_width=128,
        text_heads=2,
        layers=2,
        mlp=96,
        embed_dim=48,
        vocab_size=41,
        context=16,
    ):
        super().__init__()
        self.visual = OpenClipVisual(image_size, patch, vision_width, layers, vision_heads, mlp, embed_dim)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(context, text_width))
        self.transformer = OpenClipTransformer(text_width, layers, text_heads, mlp)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.zeros(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        # persistent as in older open_clip releases: the converter must drop it
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1))

    def encode_image(self, pixels):
        return self.visual(pixels)

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.ln_final(self.transformer(x, self.attn_mask[: ids.shape[1], : ids.shape[1]]))
        return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ self.text_projection

    def hps(self, pixels, ids):
        return (F.normalize(self.encode_image(pixels), dim=-1) * F.normalize(self.encode_text(ids), dim=-1)).sum(-1)


def _clip_tokenizer():
    """Like CLIP's BPE tokenizer where it matters here: the end-of-text id is the largest id."""
    return _word_tokenizer(
        ["<|pad|>"],
        ["<|unk|>", "<|startoftext|>", "<|endoftext|>"],
        {
            "unk": "<|unk|>",
            "bos": "<|startoftext|>",
            "eos": "<|endoftext|>",
            "kwargs": dict(
                pad_token="<|pad|>", unk_token="<|unk|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>"
            ),
        },
    )


@pytest.fixture(scope="module")
def open_clip_model():
    tokenizer = _clip_tokenizer()
    return _randomize(OpenClip(vocab_size=len(tokenizer)), seed=1), tokenizer


def _converted_clip(source, **config_options):
    from transformers import CLIPModel

    state_dict = source.state_dict()
    config = clip_config_from_open_clip(state_dict, **config_options)
    model = CLIPModel(config).eval()
    model.load_state_dict(open_clip_to_transformers(state_dict, config), strict=True)
    return model


def _text_ids(tokenizer, prompts, context=16):
    return tokenizer(prompts, padding="max_length", max_length=context, truncation=True, return_tensors="pt")


def test_open_clip_conversion_matches_open_clip_forward(open_clip_model):
    from armature.rewards.clip_score import _features

    source, tokenizer = open_clip_model
    model = _converted_clip(
        source,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg = model.config
    assert (cfg.vision_config.num_attention_heads, cfg.text_config.num_attention_heads) == (3, 2)
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.projection_dim) == (32, 8, 48)
    pixels = _pixels(_images())
    tokens = _text_ids(tokenizer, PROMPTS)
    with torch.no_grad():
        image, text = source.encode_image(pixels), source.encode_text(tokens["input_ids"])
        image_hf = _features(model.get_image_features(pixel_values=pixels))
        text_hf = _features(
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )
        hps = source.hps(pixels, tokens["input_ids"])
    assert image.abs().mean() > 0.1 and (text[0] - text[1]).abs().max() > 0.1  # not degenerate
    torch.testing.assert_close(image_hf, image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_hf, text, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logit_scale, source.logit_scale)
    hps_hf = (F.normalize(image_hf, dim=-1) * F.normalize(text_hf, dim=-1)).sum(-1)
    torch.testing.assert_close(hps_hf, hps, rtol=1e-5, atol=1e-5)


def test_hps_v2_loads_an_open_clip_checkpoint_file(open_clip_model, tmp_path):
    source, tokenizer = open_clip_model
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    # HPS v2's layout: {"state_dict": ...}, half precision as in the "compressed" release
    torch.save(
        {"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}},
        tmp_path / "HPS_v2.1_compressed.pt",
    )
    half = _randomize(OpenClip(vocab_size=len(tokenizer)), seed=1)
    half.load_state_dict({k: v.half().float() for k, v in source.state_dict().items()})
    images = _images()
    with torch.no_grad():
        expected = half.hps(_pixels(images), _text_ids(tokenizer, PROMPTS)["input_ids"]).numpy()
    reward = load("hps_v2", path=str(tmp_path / "HPS_v2.1_compressed.pt"), processor=str(tmp_path / "tokenizer"))
    np.testing.assert_allclose(reward(images, PROMPTS), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        load("hps_v2", path=str(tmp_path / "HPS_v2.1_compressed.pt"), scale=100, processor=str(tmp_path / "tokenizer"))(
            images, PROMPTS
        ),
        100 * expected,
        rtol=1e-4,
    )


def test_open_clip_conversion_is_sensitive_to_the_qkv_split(open_clip_model):
    """The equality above would catch a q/k mix-up: swapping them changes the embeddings."""
    from armature.rewards.clip_score import _features

    source, tokenizer = open_clip_model
    model = _converted_clip(source)
    with torch.no_grad():
        layer = model.vision_model.encoder.layers[0].self_attn
        layer.q_proj.weight, layer.k_proj.weight = layer.k_proj.weight, layer.q_proj.weight
        pixels = _pixels(_images())
        swapped = _features(model.get_image_features(pixel_values=pixels))
        assert (swapped - source.encode_image(pixels)).abs().max() > 1e-3


def test_open_clip_unknown_or_missing_keys_are_listed(open_clip_model):
    source, _ = open_clip_model
    state_dict = dict(source.state_dict())
    config = clip_config_from_open_clip(state_dict)
    extra = {**state_dict, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(192), "logit_bias": torch.zeros(())}
    with pytest.raises(CheckpointMismatchError, match="ls_1.gamma") as info:
        open_clip_to_transformers(extra, config)
    assert info.value.unmatched == ["logit_bias", "visual.transformer.resblocks.0.ls_1.gamma"]
    dropped = ("visual.ln_post.bias", "transformer.resblocks.1.attn.in_proj_weight")
    missing = {k: v for k, v in state_dict.items() if k not in dropped}
    with pytest.raises(CheckpointMismatchError, match="post_layernorm.bias") as info:
        open_clip_to_transformers(missing, config)
    assert info.value.missing == [
        "text_model.encoder.layers.1.self_attn.k_proj.weight",
        "text_model.encoder.layers.1.self_attn.q_proj.weight",
        "text_model.encoder.layers.1.self_attn.v_proj.weight",
        "vision_model.post_layernorm.bias",
    ]
    wrong = clip_config_from_open_clip(state_dict)
    wrong.projection_dim = 32
    with pytest.raises(CheckpointMismatchError, match="visual_projection.weight: checkpoint \\(48, 192\\)"):
        open_clip_to_transformers(state_dict, wrong)


def test_a_file_that_is_not_open_clip_is_refused(open_clip_model, tmp_path):
    source, tokenizer = open_clip_model
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError, match="not an open_clip CLIP checkpoint.*conv.weight"):
        load("hps_v2", path=str(tmp_path / "other.pt"), processor=str(tmp_path / "tokenizer"))
    with pytest.raises(ValueError, match="set `processor`"):
        load("pickscore", path=str(tmp_path / "other.pt"), processor=None)


# -------------------------------------------------------------------------------------- ImageReward


class BlipAttention(nn.Module):
    """timm-style attention of BLIP's ViT: one packed qkv Linear, reshaped (B, N, 3, heads, head_dim)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class BlipBlock(nn.Module):
    def __init__(self, width, heads, mlp):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = BlipAttention(width, heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class BlipViT(nn.Module):
    """BLIP's VisionTransformer (models/vit.py): patch_embed.proj, cls_token, pos_embed, blocks, norm."""

    def __init__(self, image_size, patch, width, layers, heads, mlp):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(BlipBlock(width, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _bert_attention(width, kv_width, heads):
    """med.py's BertAttention: self.{query,key,value} and output.{dense,LayerNorm} (post-LN residual)."""
    attention = nn.Module()
    attention.self = nn.Module()
    attention.self.query, attention.self.key = nn.Linear(width, width), nn.Linear(kv_width, width)
    attention.self.value = nn.Linear(kv_width, width)
    attention.output = nn.Module()
    attention.output.dense, attention.output.LayerNorm = nn.Linear(width, width), nn.LayerNorm(width, eps=1e-12)
    attention.heads = heads
    return attention


def _run_attention(attention, x, context, additive_mask):
    b, n, c = x.shape
    h = attention.heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], h, c // h).transpose(1, 2)

    q, k, v = split(attention.self.query(x)), split(attention.self.key(context)), split(attention.self.value(context))
    scores = q @ k.transpose(-1, -2) / (c // h) ** 0.5
    if additive_mask is not None:
        scores = scores + additive_mask
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return attention.output.LayerNorm(attention.output.dense(out) + x)


class BlipBert(nn.Module):
    """BLIP's med.py BertModel (add_pooling_layer=False) in 'multimodal' mode: every layer self-attends,
    cross-attends to the image tokens, then a post-LN feed-forward."""

    def __init__(self, vocab, width, layers, heads, mlp, encoder_width, max_positions=40):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, width)
        self.embeddings.position_embeddings = nn.Embedding(max_positions, width)
        self.embeddings.LayerNorm = nn.LayerNorm(width, eps=1e-12)
        self.embeddings.register_buffer("position_ids", torch.arange(max_positions).expand((1, -1)))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.attention = _bert_attention(width, width, heads)
            layer.crossattention = _bert_attention(width, encoder_width, heads)
            layer.intermediate = nn.Module()
            layer.intermediate.dense = nn.Linear(width, mlp)
            layer.output = nn.Module()
            layer.output.dense, layer.output.LayerNorm = nn.Linear(mlp, width), nn.LayerNorm(width, eps=1e-12)
            self.encoder.layer.append(layer)

    def forward(self, ids, attention_mask, image_tokens):
        e = self.embeddings
        x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(e.position_ids[:, : ids.shape[1]]))
        additive = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
        for layer in self.encoder.layer:
            x = _run_attention(layer.attention, x, x, additive)
            x = _run_attention(layer.crossattention, x, image_tokens, None)  # image_atts are all ones
            x = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
        return x


class ImageRewardSource(nn.Module):
    """ImageReward.py's ImageReward: blip (BLIP_Pretrain: visual_encoder, text_encoder, vision_proj,
    text_proj) and mlp (Linear-Dropout x3, Linear, Linear) on the text encoder's [CLS] state."""

    def __init__(
        self,
        vocab,
        image_size=32,
        patch=8,
        vision_width=192,
        vision_heads=3,
        text_width=128,
        text_heads=2,
        layers=2,
        mlp=96,
        hidden=(64, 32, 24, 16),
        text_layers=None,
        text_mlp=None,
        max_positions=40,
        embed_dim=24,
    ):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = BlipViT(image_size, patch, vision_width, layers, vision_heads, mlp)
        self.blip.text_encoder = BlipBert(
            vocab, text_width, text_layers or layers, text_heads, text_mlp or mlp, vision_width, max_positions
        )
        self.blip.vision_proj = nn.Linear(vision_width, embed_dim)
        self.blip.text_proj = nn.Linear(text_width, embed_dim)
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(
            nn.Linear(text_width, hidden[0]),
            nn.Dropout(0.2),
            nn.Linear(hidden[0], hidden[1]),
            nn.Dropout(0.2),
            nn.Linear(hidden[1], hidden[2]),
            nn.Dropout(0.1),
            nn.Linear(hidden[2], hidden[3]),
            nn.Linear(hidden[3], 1),
        )

    def score(self, pixels, ids, attention_mask):
        image_tokens = self.blip.visual_encoder(pixels)
        cls = self.blip.text_encoder(ids, attention_mask, image_tokens)[:, 0]
        return ((self.mlp.layers(cls) - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def _bert_tokenizer():
    """A character-level stand-in for bert-base-uncased: [PAD]=0, [CLS] ... [SEP]."""
    return _word_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        [],
        {
            "unk": "[UNK]",
            "bos": "[CLS]",
            "eos": "[SEP]",
            "kwargs": dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"),
        },
    )


@pytest.fixture(scope="module")
def image_reward_model():
    tokenizer = _bert_tokenizer()
    # two rows more than the tokenizer, as in ImageReward.pt (BERT + [DEC] + [ENC])
    return _randomize(ImageRewardSource(vocab=len(tokenizer) + 2), seed=2), tokenizer


def test_image_reward_conversion_matches_blip_forward(image_reward_model):
    from armature.rewards.image_reward import build_image_reward_modules

    source, tokenizer = image_reward_model
    state_dict = source.state_dict()
    assert "blip.text_encoder.embeddings.position_ids" in state_dict
    config = image_reward_config_from_state_dict(state_dict)
    assert (config.vision_config.num_attention_heads, config.text_config.num_attention_heads) == (3, 2)
    assert config.text_config.encoder_hidden_size == 192
    modules = build_image_reward_modules(config, image_reward_head_config(state_dict)).eval()
    modules.load_state_dict(image_reward_to_transformers(state_dict, config), strict=True)
    pixels = _pixels(_images())
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_tokens = source.blip.visual_encoder(pixels)
        text = source.blip.text_encoder(tokens["input_ids"], tokens["attention_mask"], image_tokens)
        image_hf = modules["vision"](pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_hf.shape[:2], dtype=torch.long)
        text_hf = modules["text"](
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_hf,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        head = modules["head"](text_hf[:, 0]).squeeze(-1)
    torch.testing.assert_close(image_hf, image_tokens, rtol=1e-5, atol=1e-5)
    # every non-padding position; padded ones are masked out of the [CLS] state either way
    mask = tokens["attention_mask"].bool()
    torch.testing.assert_close(text_hf[mask], text[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head, source.mlp.layers(text[:, 0]).squeeze(-1), rtol=1e-5, atol=1e-5)


def test_image_reward_loads_the_released_checkpoint_format(image_reward_model, tmp_path):
    source, tokenizer = image_reward_model
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    torch.save(source.state_dict(), tmp_path / "ImageReward.pt")
    reward = load("image_reward", path=str(tmp_path / "ImageReward.pt"), tokenizer=str(tmp_path / "tokenizer"))
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tokenizer), len(tokenizer) + 1]
    images = _images()
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = source.score(_pixels(images), tokens["input_ids"], tokens["attention_mask"]).numpy()
    assert np.ptp(expected) > 1e-3
    np.testing.assert_allclose(reward(images, PROMPTS), expected, rtol=1e-5, atol=1e-5)
    # differentiable through the converted towers, with ImageReward's resize + centre crop in torch
    pixels = torch.rand(2, 3, 40, 48, requires_grad=True)
    reward.score_tensor(pixels, PROMPTS).sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_image_reward_unknown_or_missing_keys_are_listed(image_reward_model, tmp_path):
    source, tokenizer = image_reward_model
    state_dict = dict(source.state_dict())
    extra = {
        **state_dict,
        "blip.itm_head.weight": torch.zeros(2, 128),
        "blip.visual_encoder.blocks.0.ls1.gamma": torch.ones(192),
    }
    with pytest.raises(CheckpointMismatchError, match="itm_head") as info:
        image_reward_to_transformers(extra)
    assert info.value.unmatched == ["blip.itm_head.weight", "blip.visual_encoder.blocks.0.ls1.gamma"]
    missing = {
        k: v
        for k, v in state_dict.items()
        if k not in ("mlp.layers.7.bias", "blip.text_encoder.encoder.layer.1.crossattention.self.value.weight")
    }
    with pytest.raises(CheckpointMismatchError) as info:
        image_reward_to_transformers(missing)
    assert info.value.missing == ["head.layers.7.bias", "text.encoder.layer.1.crossattention.self.value.weight"]
    torch.save(missing, tmp_path / "ImageReward.pt")
    with pytest.raises(CheckpointMismatchError, match="head.layers.7.bias"):
        load("image_reward", path=str(tmp_path / "ImageReward.pt"), tokenizer=str(tmp_path))


# ------------------------------------------------------------------------- released sizes, on meta


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def _open_clip_block_keys(prefix, layers, width, mlp):
    keys = {}
    for i in range(layers):
        p = f"{prefix}{i}."
        keys.update(
            {
                p + "ln_1.weight": _meta(width),
                p + "ln_1.bias": _meta(width),
                p + "attn.in_proj_weight": _meta(3 * width, width),
                p + "attn.in_proj_bias": _meta(3 * width),
                p + "attn.out_proj.weight": _meta(width, width),
                p + "attn.out_proj.bias": _meta(width),
                p + "ln_2.weight": _meta(width),
                p + "ln_2.bias": _meta(width),
                p + "mlp.c_fc.weight": _meta(mlp, width),
                p + "mlp.c_fc.bias": _meta(mlp),
                p + "mlp.c_proj.weight": _meta(width, mlp),
                p + "mlp.c_proj.bias": _meta(width),
            }
        )
    return keys


def test_hps_v2_sized_open_clip_keys_convert():
    """open_clip ViT-H-14's shapes (HPS v2's): 32 image layers of width 1280 (16 heads of 80), 24 text
    layers of width 1024 (16 heads), 224 px in 14 px patches, 77 tokens, 1024-d embeddings."""
    state_dict = {
        "visual.conv1.weight": _meta(1280, 3, 14, 14),
        "visual.class_embedding": _meta(1280),
        "visual.positional_embedding": _meta(257, 1280),
        "visual.ln_pre.weight": _meta(1280),
        "visual.ln_pre.bias": _meta(1280),
        "visual.ln_post.weight": _meta(1280),
        "visual.ln_post.bias": _meta(1280),
        "visual.proj": _meta(1280, 1024),
        "token_embedding.weight": _meta(49408, 1024),
        "positional_embedding": _meta(77, 1024),
        "ln_final.weight": _meta(1024),
        "ln_final.bias": _meta(1024),
        "text_projection": _meta(1024, 1024),
        "logit_scale": _meta(()),
        **_open_clip_block_keys("visual.transformer.resblocks.", 32, 1280, 5120),
        **_open_clip_block_keys("transformer.resblocks.", 24, 1024, 4096),
    }
    config = clip_config_from_open_clip({"state_dict": state_dict})
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == (1280, 32, 16)
    assert (v.image_size, v.patch_size) == (224, 14)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings) == (1024, 24, 16, 77)
    assert (v.hidden_act, t.eos_token_id, config.projection_dim) == ("gelu", 49407, 1024)
    converted = open_clip_to_transformers({"state_dict": {"module." + k: v for k, v in state_dict.items()}}, config)
    assert converted["vision_model.encoder.layers.31.self_attn.v_proj.weight"].shape == (1280, 1280)
    assert converted["text_projection.weight"].shape == (1024, 1024)


def test_image_reward_sized_keys_convert():
    """ImageReward.pt's shapes: BLIP ViT-L/16 at 224 px (24 layers, 1024 wide, 16 heads), BERT-base with
    cross-attention to 1024-wide image tokens (12 layers, 768, 12 heads, vocabulary 30522 + [DEC] + [ENC],
    512 positions), ITC projections to 256, MLP head 768-1024-128-64-16-1."""
    with torch.device("meta"):
        source = ImageRewardSource(
            vocab=30524,
            image_size=224,
            patch=16,
            vision_width=1024,
            vision_heads=16,
            text_width=768,
            text_heads=12,
            layers=24,
            mlp=4096,
            hidden=(1024, 128, 64, 16),
            text_layers=12,
            text_mlp=3072,
            max_positions=512,
            embed_dim=256,
        )
    state_dict = source.state_dict()
    config = image_reward_config_from_state_dict(state_dict)
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 24, 16)
    assert (v.image_size, v.patch_size) == (224, 16)
    assert (v.layer_norm_eps, t.layer_norm_eps, t.encoder_hidden_size, t.vocab_size) == (1e-6, 1e-12, 1024, 30524)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings) == (768, 12, 12, 512)
    assert image_reward_head_config(state_dict) == {"in_features": 768, "hidden_sizes": [1024, 128, 64, 16]}
    converted = image_reward_to_transformers(state_dict, config)
    assert converted["text.encoder.layer.11.crossattention.self.key.weight"].shape == (768, 1024)
    assert {k.split(".")[0] for k in converted} == {"vision", "text", "head"}  # vision_proj / text_proj dropped
