import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL.Image
import pytest
import torch

from armature import rewards
from armature.rewards import (
    AestheticScorer,
    Reward,
    WeightedSum,
    build_tiny_aesthetic,
    clip_preprocess,
    jpeg_compressibility,
    jpeg_incompressibility,
    load,
    load_weighted,
)


def flat_image(size=64, color=(120, 80, 200)):
    return PIL.Image.new("RGB", (size, size), color)


def noise_image(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def varied_images(n=16, size=48, seed=0):
    """Noise, flat colours, gradients and blocky patterns."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            array = rng.integers(0, 256, (size, size, 3))
        elif kind == 1:
            array = np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3))
        elif kind == 2:
            array = np.linspace(0, 255, size)[None, :, None] * rng.random(3) + np.zeros((size, size, 3))
        else:
            array = np.kron(rng.integers(0, 256, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
        images.append(PIL.Image.fromarray(np.ascontiguousarray(array).astype(np.uint8)))
    return images


def to_tensor(images):
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images])


def jpeg_kb(image, quality=95):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000.0


class Constant(Reward):
    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float32)

    def _score(self, images, prompts):
        return self.values[: len(images)]


# ---------------------------------------------------------------- compression


def test_compressibility_is_minus_jpeg_kb():
    images = [flat_image(), noise_image()]
    scores = jpeg_compressibility()(images, ["a", "b"])
    assert scores.dtype == np.float32 and scores.shape == (2,)
    np.testing.assert_allclose(scores, [-jpeg_kb(im) for im in images], rtol=1e-6)
    assert scores[0] > scores[1]  # flat compresses far better than noise


def test_compressibility_quality_option():
    image = noise_image()
    low = load("compressibility", quality=10)([image], [""])
    np.testing.assert_allclose(low, [-jpeg_kb(image, quality=10)], rtol=1e-6)
    assert low[0] > load("compressibility")([image], [""])[0]


def test_incompressibility_is_minus_compressibility():
    images = [flat_image(), noise_image(seed=1), noise_image(size=32, seed=2)]
    prompts = ["x"] * 3
    np.testing.assert_array_equal(jpeg_incompressibility()(images, prompts), -jpeg_compressibility()(images, prompts))
    assert load("incompressibility").name == "incompressibility"
    assert not load("compressibility").differentiable


# ---------------------------------------------------------------- validation


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match=r"2 images.*3 prompts"):
        jpeg_compressibility()([flat_image(), flat_image()], ["a", "b", "c"])


def test_non_pil_image_names_index():
    with pytest.raises(TypeError, match=r"images\[1\]"):
        jpeg_compressibility()([flat_image(), np.zeros((8, 8, 3), np.uint8)], ["a", "b"])


def test_empty_batch():
    scores = jpeg_compressibility()([], [])
    assert scores.shape == (0,) and scores.dtype == np.float32


# ---------------------------------------------------------------- registry


def test_available_lists_builtin_rewards():
    assert {"compressibility", "incompressibility", "aesthetic"} <= set(rewards.available())


def test_unknown_name_lists_available():
    with pytest.raises(KeyError, match="no_such_reward") as info:
        load("no_such_reward")
    assert "compressibility" in str(info.value) and "aesthetic" in str(info.value)


def test_unknown_override_names_keyword_and_accepted():
    with pytest.raises(TypeError, match="qualty") as info:
        load("compressibility", qualty=50)
    assert "quality" in str(info.value).replace("qualty", "")


def test_missing_required_option():
    with pytest.raises(TypeError, match="path"):
        load("aesthetic")


def test_register_custom_reward_and_duplicate(monkeypatch):
    # work on a copy so the test reward does not leak into other tests
    monkeypatch.setattr(rewards.registry, "_REGISTRY", dict(rewards.registry._REGISTRY))

    @rewards.register("test_constant")
    def make(value: float = 2.0):
        return Constant([value] * 4)

    assert "test_constant" in rewards.available()
    np.testing.assert_array_equal(load("test_constant", value=3.0)([flat_image()] * 2, ["", ""]), [3.0, 3.0])
    with pytest.raises(ValueError, match="test_constant"):
        rewards.register("test_constant")(lambda: None)


# ---------------------------------------------------------------- weighted sum


def test_weighted_sum_matches_hand_computation():
    images = [flat_image(), noise_image(), noise_image(size=32, seed=3)]
    prompts = ["a", "b", "c"]
    total = WeightedSum(
        {
            "compressibility": (jpeg_compressibility(), 0.7),
            "constant": (Constant([1.0, -2.0, 4.0]), -1.5),
        }
    )
    expected = [-0.7 * jpeg_kb(im) - 1.5 * c for im, c in zip(images, [1.0, -2.0, 4.0])]
    np.testing.assert_allclose(total(images, prompts), expected, rtol=1e-5)
    parts = total.components(images, prompts)
    assert set(parts) == {"compressibility", "constant"}
    np.testing.assert_allclose(parts["compressibility"], [-jpeg_kb(im) for im in images], rtol=1e-6)
    np.testing.assert_array_equal(parts["constant"], [1.0, -2.0, 4.0])
    assert not total.differentiable
    with pytest.raises(TypeError, match="compressibility"):
        total.score_tensor(to_tensor(images[:2]), prompts[:2])


def test_load_weighted():
    images = [flat_image(), noise_image()]
    reward = load_weighted({"compressibility": {"weight": 2.0}, "incompressibility": {"weight": 0.5, "quality": 50}})
    assert isinstance(reward, WeightedSum)
    expected = [-2.0 * jpeg_kb(im) + 0.5 * jpeg_kb(im, quality=50) for im in images]
    np.testing.assert_allclose(reward(images, ["", ""]), expected, rtol=1e-5)

    single = load_weighted({"compressibility": {}})
    assert not isinstance(single, WeightedSum) and single.name == "compressibility"
    scaled = load_weighted({"compressibility": {"weight": 3.0}})
    np.testing.assert_allclose(scaled(images, ["", ""]), [-3.0 * jpeg_kb(im) for im in images], rtol=1e-5)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "1.0", None, True])
def test_load_weighted_rejects_bad_weight(weight):
    with pytest.raises(ValueError, match="incompressibility"):
        load_weighted({"compressibility": {"weight": 1.0}, "incompressibility": {"weight": weight}})


def test_load_weighted_propagates_registry_errors():
    with pytest.raises(KeyError, match="nope"):
        load_weighted({"nope": {"weight": 1.0}})
    with pytest.raises(TypeError, match="colour"):
        load_weighted({"compressibility": {"weight": 1.0, "colour": "red"}})


# ---------------------------------------------------------------- aesthetic


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    return build_tiny_aesthetic(str(tmp_path_factory.mktemp("aesthetic")), seed=0)


@pytest.fixture(scope="module")
def scorer(tiny_aesthetic):
    return load("aesthetic", path=tiny_aesthetic)


def test_tiny_aesthetic_layout(tiny_aesthetic):
    assert os.path.isfile(os.path.join(tiny_aesthetic, "head.safetensors"))
    with open(os.path.join(tiny_aesthetic, "head.json")) as f:
        assert json.load(f)["in_features"] == 32
    with open(os.path.join(tiny_aesthetic, "clip", "config.json")) as f:
        config = json.load(f)
    assert (config["image_size"], config["patch_size"], config["hidden_size"]) == (32, 8, 32)
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["projection_dim"]) == (2, 2, 32)
    assert os.path.isfile(os.path.join(tiny_aesthetic, "clip", "preprocessor_config.json"))


def test_aesthetic_round_trip_and_determinism(tiny_aesthetic, scorer, tmp_path):
    images, prompts = varied_images(4), ["p"] * 4
    first = scorer(images, prompts)
    second = AestheticScorer(tiny_aesthetic)(images, prompts)
    assert first.dtype == np.float32 and first.shape == (4,)
    np.testing.assert_array_equal(first, second)
    rebuilt = AestheticScorer(build_tiny_aesthetic(str(tmp_path / "again"), seed=0))
    np.testing.assert_allclose(rebuilt(images, prompts), first, atol=1e-6)
    other_seed = AestheticScorer(build_tiny_aesthetic(str(tmp_path / "other"), seed=1))
    assert not np.allclose(other_seed(images, prompts), first, atol=1e-3)


def test_aesthetic_scores_have_spread(scorer):
    scores = scorer(varied_images(16, seed=7), [""] * 16)
    assert np.all(np.isfinite(scores))
    assert scores.std() > 0.1 * max(1.0, abs(scores.mean())), scores
    noise = scorer([noise_image(32, seed=s) for s in range(16)], [""] * 16)
    assert noise.std() > 0.05 * max(1.0, abs(noise.mean())), noise


def test_aesthetic_gradient_flows_to_images_only(scorer):
    assert scorer.differentiable
    images = to_tensor(varied_images(4, size=40)).requires_grad_(True)
    scores = scorer.score_tensor(images, [""] * 4)
    assert scores.shape == (4,)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    params = list(scorer.clip.parameters()) + list(scorer.head.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    assert not scorer.clip.training and not scorer.head.training


def test_aesthetic_call_matches_score_tensor(scorer):
    images = varied_images(6, size=56, seed=3)
    with torch.no_grad():
        expected = scorer.score_tensor(to_tensor(images), [""] * 6).numpy()
    np.testing.assert_allclose(scorer(images, [""] * 6), expected, atol=1e-5)


def test_aesthetic_mixed_sizes_and_aspect(scorer):
    images = [noise_image(32, seed=1), PIL.Image.fromarray(np.asarray(noise_image(64, seed=2))[:40]), flat_image(20)]
    scores = scorer(images, ["", "", ""])
    singles = [scorer([im], [""])[0] for im in images]
    np.testing.assert_allclose(scores, singles, atol=1e-5)


def test_clip_preprocess_resize_crop_normalise():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    # 32x64 image, left half black, right half white: no resize needed, center crop keeps cols 16..47
    images = torch.zeros(1, 3, 32, 64)
    images[..., 32:] = 1.0
    out = clip_preprocess(images, 32, (32, 32), mean, std)
    assert out.shape == (1, 3, 32, 32)
    expected = torch.zeros(1, 3, 32, 32)
    expected[..., 16:] = 1.0
    expected = (expected - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    # shortest edge is resized to 32 keeping the aspect ratio, then cropped
    assert clip_preprocess(torch.rand(2, 3, 48, 96), 32, (32, 32), mean, std).shape == (2, 3, 32, 32)
    assert clip_preprocess(torch.rand(2, 3, 96, 48), 32, None, mean, std).shape == (2, 3, 64, 32)


def test_aesthetic_missing_files(tmp_path, tiny_aesthetic):
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        AestheticScorer(str(tmp_path / "does_not_exist"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        AestheticScorer(str(empty))
    (empty / "head.safetensors").write_bytes(open(os.path.join(tiny_aesthetic, "head.safetensors"), "rb").read())
    (empty / "head.json").write_text(open(os.path.join(tiny_aesthetic, "head.json")).read())
    with pytest.raises(FileNotFoundError, match="clip"):
        AestheticScorer(str(empty))


def test_aesthetic_weighted_with_differentiable_components(scorer):
    total = WeightedSum({"a": (scorer, 2.0), "b": (scorer, -0.5)})
    assert total.differentiable
    images = varied_images(3, seed=5)
    np.testing.assert_allclose(total(images, [""] * 3), 1.5 * scorer(images, [""] * 3), rtol=1e-5, atol=1e-5)
    x = to_tensor(images).requires_grad_(True)
    total.score_tensor(x, [""] * 3).sum().backward()
    assert x.grad.abs().sum() > 0


def test_score_tensor_validates(scorer):
    with pytest.raises(ValueError, match="2 images.*1 prompts"):
        scorer.score_tensor(torch.rand(2, 3, 32, 32), [""])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        scorer.score_tensor(torch.rand(3, 32, 32), ["", "", ""])
