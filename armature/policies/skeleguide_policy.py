"""One stage of SkeleGuide as an RL policy: the existing learners train the skeletal or the
appearance LoRA with rewards, through the same policy interface as every other model.

``model=skeleguide_stage`` (``family: skeleguide_stage``) builds a :class:`SkeleGuideStagePolicy`:
a :class:`~armature.policies.diffusion.DiffusionPolicy` of the ``flux`` family whose network is
the SkeleGuide pipeline's transformer with one adapter active and trainable (``model.skeleguide_stage.stage``):

* ``skeletal`` (stage 1): samples scene-aware layouts from a scene and the prompt; the reward
  that fits is ``skeleton`` (plausibility of the planned skeleton: angles, proportions,
  symmetry, completeness), exact and cheap: RL on the skeleton itself.
* ``appearance`` (stage 2): renders the person from a layout; rewards on the rendered person
  (``gym_oracle``, ``learned``, ``pose``; ``pose_adherence`` with per-prompt ``plans``).

Rollouts are Flow-GRPO SDE steps (:func:`~armature.policies.flow_sde_step_with_logprob`) on the
packed noisy tokens; the condition tokens (the scene or the layout, VAE-encoded) are appended
Kontext-style by :meth:`SkeleGuidePipeline.flow`, the LoRA masked to them as eq. 3 says when
``lora_targets=qkv``. Each sample's condition comes from its own seed, so a sample is the same
whichever sampler actor draws it:

* ``model.skeleguide_stage.conditions=gym`` (default): a gym triple (:func:`armature.skeleton.scenes.sample_triple`)
  drawn from the seed, of the prompt's pose class when the prompt is a gym pose prompt; stage 1
  gets its scene, stage 2 its ground-truth layout.
* ``model.skeleguide_stage.conditions=<folder>``: the folder's images (sorted by name), one picked by the seed and
  resized to the model's size: scenes for stage 1, layouts for stage 2.

The trajectory's ``cond`` carries the condition tokens beside the prompt's, so the learner scores
transitions under exactly the condition they were sampled with. Saved adapters use the
SkeleGuide folder layout (``<dir>/<stage>/adapter_model.safetensors``), so a tuned stage loads
back into the pipeline (:meth:`SkeleGuidePipeline.load_adapters` of that adapter) or a sampler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from armature.gym.figures import POSES, SIZE
from armature.policies.config import LoraParams, ModelConfig, SamplingParams
from armature.policies.diffusion import ADAPTER_CONFIG, DiffusionPolicy
from armature.policies.families import Flux, guidance_branch
from armature.policies.skeleguide import ADAPTER_FILE, ADAPTERS, LORA_TARGETS, SkeleGuideParams, SkeleGuidePipeline
from armature.skeleton.scenes import sample_triple

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class SkeleGuideStage(Flux):
    """The ``flux`` family whose network is SkeleGuide's ``flow`` of one stage, with the sample's
    condition tokens (``cond["condition"]``) appended Kontext-style."""

    def forward(self, policy, cond, model_in, t, t_in, guided):
        sigma = torch.as_tensor(t_in, device=policy.device).float() / 1000  # the scheduler's timesteps are 1000 sigma
        condition = guidance_branch(cond["condition"], guided)
        velocity = policy.sg.flow(
            policy.stage, model_in, 1 - sigma, condition, policy.denoiser_inputs(cond, guided), policy.image_size
        )
        return -velocity  # SkeleGuide's velocity is data - noise; diffusers' flow step takes noise - data


class SkeleGuideStagePolicy(DiffusionPolicy):
    """The ``stage`` adapter of a :class:`SkeleGuidePipeline`, as a flow policy (module docstring)."""

    def __init__(
        self, pipeline: SkeleGuidePipeline, stage: str, sampling: SamplingParams | None = None, conditions: str = "gym"
    ):
        if stage not in ADAPTERS:
            raise ValueError(f"model.skeleguide_stage.stage={stage!r}: use one of {', '.join(ADAPTERS)}")
        self.sg, self.stage = pipeline, stage
        p = pipeline.params
        # the flux family's set-up freezes the transformer ...
        super().__init__(
            pipeline.pipe,
            SkeleGuideStage(),
            sampling,
            pipeline.device,
            native_size=None if p.pretrained else p.tiny.image_size,
        )
        self.lora = LoraParams(rank=p.lora_rank, alpha=p.lora_alpha, target_modules=LORA_TARGETS[p.lora_targets])
        pipeline.set_trainable([stage])  # ... so this stage's LoRA is made trainable after it
        pipeline.use_adapter(stage)
        self.conditions = conditions
        self._files = None
        if conditions != "gym":
            folder = Path(conditions)
            files = sorted(f for f in folder.glob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
            if not files:
                raise ValueError(
                    f"model.skeleguide_stage.conditions={conditions!r}: not 'gym' and not a folder of images "
                    f"({', '.join(IMAGE_SUFFIXES)}); give a folder of {self._what()} or 'gym'"
                )
            self._files = files

    def _what(self) -> str:
        return "scenes" if self.stage == "skeletal" else "layouts"

    # The learner swaps its DeepSpeed engine in as ``denoiser``; SkeleGuide's ``flow`` calls its own.
    @property
    def denoiser(self):
        return self.sg.denoiser

    @denoiser.setter
    def denoiser(self, module) -> None:
        self.sg.denoiser = module

    # ------------------------------------------------------------------ conditions
    def condition_image(self, prompt: str, seed: int) -> np.ndarray:
        """The condition of one sample (uint8 ``[H, W, 3]``): a scene for stage 1, a layout for stage 2."""
        h, w = self.image_size
        if self._files is not None:
            path = self._files[seed % len(self._files)]
            try:
                image = PIL.Image.open(path).convert("RGB")
            except OSError as err:
                raise ValueError(
                    f"model.skeleguide_stage.conditions: {path} is not a readable image ({err}); remove or replace it"
                ) from None
            return np.asarray(image.resize((w, h), PIL.Image.BICUBIC))
        if (h, w) != (SIZE, SIZE):
            raise ValueError(
                f"model.skeleguide_stage.conditions=gym draws {SIZE}x{SIZE} scenes; the model samples {w}x{h}: "
                "set sampling.height/width to 64 or give a folder of images"
            )
        pose = next((name for name, (text, _, _) in POSES.items() if text == prompt), None)
        triple = sample_triple(np.random.default_rng([seed, 2024]), pose)
        return triple.scene if self.stage == "skeletal" else triple.layout

    @torch.no_grad()
    def conditioning(self, prompts: list[str], generator=None) -> dict[str, torch.Tensor]:
        cond = self.encode(prompts)
        if isinstance(generator, (list, tuple)):
            seeds = [g.initial_seed() for g in generator]
        else:
            first = generator.initial_seed() if generator is not None else int(torch.randint(2**31, ()))
            seeds = [first + i for i in range(len(prompts))]
        images = np.stack([self.condition_image(p, s) for p, s in zip(prompts, seeds)])
        tokens = self.sg.encode_images(images)  # [B, N_c, 4C]
        cond["condition"] = torch.stack([tokens, tokens], dim=1)  # the same for both guidance branches
        return cond

    # ------------------------------------------------------------------ saved adapters
    def enable_full_finetuning(self) -> None:
        raise ValueError("model.lora.enabled=false: a SkeleGuide stage trains its LoRA adapter; set it true")

    def save_adapter(self, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        (directory / self.stage).mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.unet, adapter_name=self.stage)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            directory / self.stage / ADAPTER_FILE,
            metadata={"format": "pt"},
        )
        config = {
            "skeleguide_stage": self.stage,
            "lora_targets": self.sg.params.lora_targets,
            "family": "skeleguide_stage",
            **(metadata or {}),
        }
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        return directory

    def load_adapter(self, directory: str | os.PathLike) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(directory) / self.stage / ADAPTER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not an adapter of the {self.stage} stage")
        result = set_peft_model_state_dict(self.unet, load_file(path), adapter_name=self.stage)
        if getattr(result, "unexpected_keys", None):
            raise KeyError(f"{path} has weights this model lacks: {result.unexpected_keys[:3]}")
        self.sg.use_adapter(self.stage)


def build_stage_policy(model: ModelConfig, sampling: SamplingParams, seed: int = 0) -> SkeleGuideStagePolicy:
    """``model.family=skeleguide_stage``: a saved SkeleGuide pipeline (``model.pretrained``, the folder
    the skeleguide job or ``SkeleGuidePipeline.save_pretrained`` wrote) or a new one from
    ``model.skeleguide_stage.params`` (:class:`SkeleGuideParams`; the tiny random model by default)."""
    if not model.lora.enabled:
        raise ValueError("model.lora.enabled=false: a SkeleGuide stage trains its LoRA adapter; set it true")
    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = model.skeleguide_stage
    if model.pretrained:
        pipeline = SkeleGuidePipeline.from_pretrained(model.pretrained, device=device)
    else:
        params = dict(options.params)
        params.setdefault("lora_seed", seed)
        params["device"] = device
        pipeline = SkeleGuidePipeline.build(SkeleGuideParams.from_dict(params))
    return SkeleGuideStagePolicy(pipeline, options.stage, sampling, str(options.conditions))
