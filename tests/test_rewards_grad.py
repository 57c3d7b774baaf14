"""Differentiable rewards: values against independent numpy formulas, gradients to the pixels,
frozen weights, and the learners' refusal of a non-differentiable reward."""

import numpy as np
import PIL.Image
import pytest
import torch

from armature.rewards import (
    Brightness,
    Colorfulness,
    WeightedSum,
    build_tiny_aesthetic,
    load,
    load_weighted,
    require_differentiable,
)


def _images(seed=0, n=3, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _np_colorfulness(image):
    """Hasler & Suesstrunk, written per pixel on an HWC array."""
    h, w, _ = image.shape
    rg, yb = [], []
    for y in range(h):
        for x in range(w):
            r, g, b = image[y, x]
            rg.append(r - g)
            yb.append((r + g) / 2 - b)
    rg, yb = np.array(rg), np.array(yb)
    return np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())


def test_brightness_and_colorfulness_match_closed_forms():
    x = _images()
    prompts = ["p"] * len(x)
    hwc = x.permute(0, 2, 3, 1).numpy()
    expected_brightness = [np.mean(0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]) for a in hwc]
    np.testing.assert_allclose(Brightness().score_tensor(x, prompts).numpy(), expected_brightness, rtol=1e-10)
    expected_color = [_np_colorfulness(a) for a in hwc]
    np.testing.assert_allclose(Colorfulness().score_tensor(x, prompts).numpy(), expected_color, rtol=1e-6)
    # a grey image has no colour; a pure red one: rg = 1, yb = 0.5, std 0 -> 0.3 * sqrt(1.25)
    grey = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    red = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    red[:, 0] = 1
    assert Colorfulness().score_tensor(grey, [""]).item() == pytest.approx(0, abs=1e-3)
    assert Colorfulness().score_tensor(red, [""]).item() == pytest.approx(
        0.3 * np.sqrt(1.25), abs=2e-4
    )  # eps: sqrt(1e-8)


def test_brightness_gradient_is_the_luma_weights():
    x = _images(n=2, size=4).requires_grad_(True)
    Brightness().score_tensor(x, ["a", "b"]).sum().backward()
    expected = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1) / 16
    torch.testing.assert_close(x.grad, expected.expand_as(x))


def test_colorfulness_gradient_matches_finite_differences():
    x = _images(n=1, size=4).requires_grad_(True)
    torch.autograd.gradcheck(lambda t: Colorfulness().score_tensor(t, ["a"]), (x,), eps=1e-6, atol=1e-5)


def test_pil_path_agrees_with_tensor_path():
    arrays = [np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(2)]
    pil = [PIL.Image.fromarray(a) for a in arrays]
    tensors = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    for reward in (load("brightness"), load("colorfulness")):
        np.testing.assert_allclose(reward(pil, ["", ""]), reward.score_tensor(tensors, ["", ""]).numpy(), rtol=1e-5)


def test_tiny_aesthetic_is_differentiable_and_frozen(tmp_path):
    scorer = load("aesthetic", path=build_tiny_aesthetic(str(tmp_path / "aes")))
    assert scorer.differentiable
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    scorer.score_tensor(x, ["a", "b"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    weights = list(scorer.clip.parameters()) + list(scorer.head.parameters())
    assert all(not p.requires_grad and p.grad is None for p in weights)


def test_weighted_sum_gradient_is_the_weighted_sum_of_gradients():
    x = _images(n=2, size=4).float()
    total = WeightedSum({"brightness": (Brightness(), 2.0), "colorfulness": (Colorfulness(), -0.5)})
    assert total.differentiable
    xa = x.clone().requires_grad_(True)
    total.score_tensor(xa, ["", ""]).sum().backward()
    xb = x.clone().requires_grad_(True)
    (2.0 * Brightness().score_tensor(xb, ["", ""]) - 0.5 * Colorfulness().score_tensor(xb, ["", ""])).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_require_differentiable_names_the_key_and_the_fix():
    assert require_differentiable(load("brightness")).name == "brightness"
    with pytest.raises(
        ValueError, match=r"reward.components: .*'compressibility' is not differentiable.*reward=brightness"
    ):
        require_differentiable(load("compressibility"))
    mixed = load_weighted({"brightness": {"weight": 1.0}, "compressibility": {"weight": 0.1}})
    with pytest.raises(ValueError, match=r"\['compressibility'\] are not differentiable"):
        require_differentiable(mixed, algo="algo=alignprop")
