"""Adapters side by side in one serving replica.

LoRA adapters (``adapter_model.safetensors`` + ``adapter_config.json``) become named peft
adapters of the replica's one UNet, a few MB each; a fully fine-tuned UNet
(``unet.safetensors``) gets a UNet of its own. Before each pass the replica activates one of
them, or the base model. Only safetensors files are read: nothing is unpickled.

Loading, activating and generating all hold ``AdapterBank.lock``: peft changes the UNet's
modules in place, which must not happen while a pass runs in another thread.
"""

from __future__ import annotations

import itertools
import json
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from armature.policies import DiffusionPolicy, LoraParams
from armature.policies.diffusion import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL_WEIGHTS

__all__ = ["Adapter", "AdapterBank", "AdapterError"]

UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes


class AdapterError(ValueError):
    """An adapter that cannot be served: no safetensors weights, a malformed config, or made for another model."""


@dataclass(eq=False)
class Adapter:
    """A loaded adapter; what ``serve.multiplexed`` keeps in its LRU."""

    id: str
    kind: str  # "lora" (a named peft adapter in the shared UNet) or "full" (a UNet of its own)
    peft_name: str | None = None
    unet: torch.nn.Module | None = field(default=None, repr=False)
    bank: "AdapterBank | None" = field(default=None, repr=False)

    def __del__(self):
        # Ray Serve calls this when its LRU evicts the adapter (Python again when it is freed).
        bank, self.bank = self.bank, None
        if bank is not None:
            bank.retire(self)


class AdapterBank:
    """The adapters loaded into one policy, and which one the next pass uses."""

    def __init__(self, policy: DiffusionPolicy, model: dict | None = None):
        self.policy = policy
        self.model = dict(model or {})  # the served model's config, to refuse foreign adapters
        self.lock = threading.Lock()
        self._names = itertools.count()
        self._retired: list[str] = []  # peft adapters to delete at the next activation
        # The base weights by name, taken before peft wraps any layer (the tensors, not copies).
        self._base_weights = dict(policy.unet.state_dict(keep_vars=True))

    # ------------------------------------------------------------------ loading
    def load(self, adapter_id: str, folder: str | Path) -> Adapter:
        """Load the adapter in ``folder`` (takes ``lock`` while it changes the shared UNet)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        kind, config = self._inspect(adapter_id, folder)
        weights = folder / (ADAPTER_WEIGHTS if kind == "lora" else FULL_WEIGHTS)
        try:
            state = load_file(weights)
        except (SafetensorError, OSError) as err:
            message = f"adapter {adapter_id!r}: {weights.name} is not a safetensors file ({err})"
            raise AdapterError(message) from err
        if kind == "full":
            return Adapter(adapter_id, "full", unet=self._full_unet(adapter_id, state), bank=self)
        with self.lock:
            name = self._add_lora(adapter_id, config, state)
        return Adapter(adapter_id, "lora", peft_name=name, bank=self)

    def _inspect(self, adapter_id: str, folder: Path) -> tuple[str, dict]:
        if not folder.is_dir():
            raise AdapterError(f"adapter {adapter_id!r}: no folder {folder}")
        config = self._read_config(adapter_id, folder / ADAPTER_CONFIG)
        if (folder / ADAPTER_WEIGHTS).is_file():
            if "lora" not in config:
                raise AdapterError(f"adapter {adapter_id!r}: {ADAPTER_CONFIG} with a 'lora' section is missing")
            kind = "lora"
        elif (folder / FULL_WEIGHTS).is_file():
            kind = "full"
        else:
            unsafe = sorted(p.name for p in folder.iterdir() if p.suffix in UNSAFE_SUFFIXES)
            hint = f" (found {', '.join(unsafe)}: only safetensors are accepted)" if unsafe else ""
            raise AdapterError(f"adapter {adapter_id!r}: no {ADAPTER_WEIGHTS} or {FULL_WEIGHTS}{hint}")
        family = config.get("family")
        if family and family != self.policy.family:
            raise AdapterError(
                f"adapter {adapter_id!r} is for family {family!r}; this server runs {self.policy.family!r}"
            )
        trained = config.get("model") or {}
        for key in ("family", "pretrained"):
            if key in trained and key in self.model and trained[key] != self.model[key]:
                raise AdapterError(
                    f"adapter {adapter_id!r} was trained on model.{key}={trained[key]!r}; "
                    f"this server runs model.{key}={self.model[key]!r}"
                )
        tiny, served = trained.get("tiny") or {}, self.model.get("tiny") or {}
        differ = [k for k in tiny if k in served and tiny[k] != served[k]]
        if trained.get("family") == "tiny" and differ:
            raise AdapterError(f"adapter {adapter_id!r} was trained on another tiny model ({differ[0]} differs)")
        return kind, config

    @staticmethod
    def _read_config(adapter_id: str, path: Path) -> dict:
        """``adapter_config.json`` as a mapping ({} when there is none); anything else is an AdapterError."""
        if not path.is_file():
            return {}
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(f"adapter {adapter_id!r}: {ADAPTER_CONFIG} is over {MAX_CONFIG_BYTES} bytes")
        try:
            config = json.loads(path.read_bytes())
        except ValueError as err:  # not UTF-8, or not JSON
            raise AdapterError(f"adapter {adapter_id!r}: {ADAPTER_CONFIG} is not valid JSON ({err})") from err
        for key in ("", "lora", "model", "model.tiny"):  # parents first: each .get below is on a dict
            value = config
            for part in filter(None, key.split(".")):
                value = value.get(part) or {}
            if not isinstance(value, dict):
                where = f"{ADAPTER_CONFIG}: {key!r}" if key else ADAPTER_CONFIG
                raise AdapterError(f"adapter {adapter_id!r}: {where} must be a JSON object")
        return config

    def _add_lora(self, adapter_id: str, config: dict, state: dict) -> str:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        try:
            lora = LoraParams(**config["lora"])
        except TypeError as err:
            raise AdapterError(f"adapter {adapter_id!r}: bad 'lora' section in {ADAPTER_CONFIG}: {err}") from err
        unet, name = self.policy.unet, f"adapter_{next(self._names)}"
        peft_config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), lora_dropout=lora.dropout
        )
        try:
            with warnings.catch_warnings():  # peft warns that several adapters share the model: we mean it
                warnings.simplefilter("ignore", UserWarning)
                unet.add_adapter(peft_config, adapter_name=name)
        except ValueError as err:
            raise AdapterError(f"adapter {adapter_id!r} does not fit this UNet: {err}") from err
        result = set_peft_model_state_dict(unet, state, adapter_name=name)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if f".{name}." in k]
        if unexpected or missing:
            unet.delete_adapters(name)
            raise AdapterError(
                f"adapter {adapter_id!r} does not fit this UNet: unexpected {unexpected[:2]}, missing {missing[:2]}"
            )
        unet.requires_grad_(False)
        unet.eval()
        return name

    def _full_unet(self, adapter_id: str, state: dict) -> torch.nn.Module:
        """A UNet of its own: the base weights, overwritten by those in ``state``."""
        weights = dict(self._base_weights)
        unknown = [k for k in state if k not in weights]
        wrong = [k for k in state if k in weights and state[k].shape != weights[k].shape]
        if unknown or wrong:
            raise AdapterError(
                f"adapter {adapter_id!r}: {FULL_WEIGHTS} does not fit this UNet "
                f"(unknown weights {unknown[:2]}, wrong shapes {wrong[:2]})"
            )
        weights.update(state)
        base = self.policy.unet
        unet = type(base).from_config(base.config)
        unet.load_state_dict(weights, strict=True)
        unet.to(self.policy.device)
        if unet.dtype != base.dtype:
            unet.to(dtype=base.dtype)
        return unet.requires_grad_(False).eval()

    # ------------------------------------------------------------------ use
    def retire(self, adapter: Adapter) -> None:
        """Forget ``adapter``; its peft weights go at the next activation (never mid-pass)."""
        if adapter.peft_name is not None:
            self._retired.append(adapter.peft_name)

    def activate(self, adapter: Adapter | None) -> None:
        """Make the policy use ``adapter`` (None: the base model). Call with ``lock`` held."""
        unet = self.policy.unet
        keep = adapter.peft_name if adapter is not None else None
        for name in [n for n in self._retired if n != keep]:
            self._retired.remove(name)
            with warnings.catch_warnings():  # "the active adapter was deleted": activation follows
                warnings.simplefilter("ignore", UserWarning)
                unet.delete_adapters(name)
        self.policy.denoiser = unet
        loaded = bool(getattr(unet, "peft_config", None))
        if adapter is not None and adapter.kind == "lora":
            unet.enable_adapters()
            unet.set_adapter(adapter.peft_name)
            return
        if loaded:
            unet.disable_adapters()
        if adapter is not None:
            self.policy.denoiser = adapter.unet

    @property
    def loaded(self) -> list[str]:
        """Names of the peft adapters in the shared UNet (for tests and stats)."""
        return sorted(getattr(self.policy.unet, "peft_config", {}) or {})
