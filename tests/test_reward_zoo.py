"""CLIP-family rewards, ImageReward and the MLLM judge: tiny random models saved with
save_pretrained and loaded through the same code as real weights; in Ray reward actors."""

import numpy as np
import pytest
import torch
from PIL import Image

from armature.rewards import load, load_weighted
from armature.rewards.judge import parse_choice, parse_likert

PROMPTS = ["a red figure waving", "a blue cat"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from armature.policies.tiny import build_char_tokenizer
    from armature.rewards.clip_score import build_tiny_clip
    from armature.rewards.image_reward import build_tiny_image_reward
    from armature.rewards.judge import build_tiny_vlm

    root = tmp_path_factory.mktemp("zoo")
    tokenizer = build_char_tokenizer(32)
    return {
        "clip": build_tiny_clip(str(root / "clip"), tokenizer),
        "image_reward": build_tiny_image_reward(str(root / "ir"), tokenizer),
        "vlm": build_tiny_vlm(str(root / "vlm")),
    }


def _images(n=2, size=32):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _clip_reference(path, images, prompts):
    """logits_per_image of CLIPModel.forward, with numpy preprocessing (images already 32x32)."""
    from transformers import AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = np.stack([(np.asarray(i, np.float64) / 255 - mean) / std for i in images]).transpose(0, 3, 1, 2)
    tokens = tok(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=torch.tensor(pixels, dtype=torch.float32),
        )
    logits = out.logits_per_image.diagonal().numpy()
    return logits, model.logit_scale.exp().item()


def test_clip_family_match_clip_forward(zoo):
    images = _images()
    logits, logit_scale = _clip_reference(zoo["clip"], images, PROMPTS)
    cos = logits / logit_scale
    np.testing.assert_allclose(load("pickscore", path=zoo["clip"], processor=None)(images, PROMPTS), logits, rtol=1e-4)
    np.testing.assert_allclose(load("hps_v2", path=zoo["clip"])(images, PROMPTS), cos, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(load("hps_v2", path=zoo["clip"], scale=100)(images, PROMPTS), 100 * cos, rtol=1e-4)
    np.testing.assert_allclose(
        load("clip_score", path=zoo["clip"])(images, PROMPTS), 2.5 * np.maximum(cos, 0), rtol=1e-4, atol=1e-6
    )


def test_clip_scores_are_differentiable(zoo):
    reward = load("pickscore", path=zoo["clip"], processor=None)
    images = torch.rand(2, 3, 48, 40, requires_grad=True)  # resized and cropped in torch
    reward.score_tensor(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_missing_clip_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="hps_v2.*path="):
        load("hps_v2", path=str(tmp_path / "nowhere"))


def test_image_reward_matches_its_definition(zoo):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    from armature.rewards.aesthetic import AestheticHead

    images = _images()
    scores = load("image_reward", path=zoo["image_reward"])(images, PROMPTS)
    blip = BlipForImageTextRetrieval.from_pretrained(zoo["image_reward"] + "/blip").eval()
    tok = AutoTokenizer.from_pretrained(zoo["image_reward"] + "/blip")
    head = AestheticHead(32, (64, 16, 8)).eval()
    head.load_state_dict(load_file(zoo["image_reward"] + "/head.safetensors"))
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            pixels = torch.tensor(
                ((np.asarray(image) / 255 - mean) / std).transpose(2, 0, 1)[None], dtype=torch.float32
            )
            v = blip.vision_model(pixel_values=pixels)[0]
            t = tok([prompt], padding="max_length", max_length=35, truncation=True, return_tensors="pt")
            cls = blip.text_encoder(
                input_ids=t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=v
            ).last_hidden_state[0, 0]
            expected.append((head(cls).item() - 0.16717362830052426) / 1.0333394966054072)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "text, scale, expected",
    [
        ("4", 5, 4),
        ("Rating: 3.", 5, 3),
        ("4/5", 5, 4),
        (" 5 - excellent", 5, 5),
        ("I'd say 2 out of 5", 5, 2),
        ("excellent", 5, None),
        ("7", 5, None),
        ("", 5, None),
        ("0", 5, None),
        ("3.5", 5, None),
        ("10", 9, None),
    ],
)
def test_parse_likert(text, scale, expected):
    assert parse_likert(text, scale) == expected


def test_parse_choice():
    assert [parse_choice(t) for t in ("2", "Image 1 is better", "the second one", "neither", "")] == [
        2,
        1,
        2,
        None,
        None,
    ]


def test_judge_counts_malformed_answers(zoo):
    judge = load("mllm_judge", path=zoo["vlm"], attributes={"anatomy": 1.0, "artifacts": 1.0, "style": 2.0})
    images = _images(3)
    scores = judge(images, ["a cat"] * 3)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    asked = sum(v for k, v in judge.stats.items() if k.endswith("/asked"))
    failed = sum(v for k, v in judge.stats.items() if k.endswith("/failed"))
    assert asked == 9 == len(judge.last_answers)
    assert failed == sum(parse_likert(a, 5) is None for a in judge.last_answers)
    # recompute the scores from the recorded answers: image i asked anatomy, artifacts, style in order
    weights = [1.0, 1.0, 2.0]
    for i in range(3):
        ratings = [parse_likert(a, 5) for a in judge.last_answers[3 * i : 3 * i + 3]]
        valid = [(w, r) for w, r in zip(weights, ratings) if r is not None]
        expected = sum(w * (r - 1) / 4 for w, r in valid) / sum(w for w, _ in valid) if valid else 0.5
        assert scores[i] == pytest.approx(expected)


def test_constrained_judge_never_fails(zoo):
    judge = load("mllm_judge", path=zoo["vlm"], constrained=True, scale=7, attributes={"composition": 1.0})
    scores = judge(_images(2), PROMPTS)
    assert judge.stats["composition/failed"] == 0 and judge.stats["composition/asked"] == 2
    assert all(1 <= int(a) <= 7 for a in judge.last_answers)
    np.testing.assert_allclose(scores, [(int(a) - 1) / 6 for a in judge.last_answers])
    assert judge.compare(*_images(2), "a cat") in (1, 2, None)
    assert judge.stats["pairwise/asked"] == 1


def test_judge_config_errors_name_the_key(zoo):
    with pytest.raises(ValueError, match="templates.<name>"):
        load("mllm_judge", path=zoo["vlm"], attributes={"hands": 1.0})
    with pytest.raises(ValueError, match="scale"):
        load("mllm_judge", path=zoo["vlm"], scale=12)


def test_zoo_in_reward_actors(ray_cluster, zoo):
    import ray

    from armature.actors import start_reward_actors

    components = {
        "pickscore": {"weight": 0.5, "path": zoo["clip"], "processor": None},
        "image_reward": {"weight": 1.0, "path": zoo["image_reward"]},
        "mllm_judge": {"weight": 2.0, "path": zoo["vlm"], "attributes": {"anatomy": 1.0}},
    }
    actors = start_reward_actors(2, components, num_cpus=0.5, num_gpus=0.0, max_restarts=0)
    images = np.stack([np.asarray(i) for i in _images(2)])
    outs = ray.get([a.score.remote(images, PROMPTS) for a in actors])
    local = load_weighted(components)
    expected = local(_images(2), PROMPTS)
    for out in outs:
        assert set(out) == {"reward", "pickscore", "image_reward", "mllm_judge"}
        np.testing.assert_allclose(
            out["reward"], 0.5 * out["pickscore"] + out["image_reward"] + 2 * out["mllm_judge"], rtol=1e-5
        )
        np.testing.assert_allclose(out["reward"], expected, rtol=1e-4)
    stats = ray.get(actors[0].stats.remote())
    assert stats["mllm_judge/anatomy/asked"] == 2  # each component scores each image once
    for a in actors:
        ray.kill(a)
