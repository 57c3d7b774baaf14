"""DeepSpeed checkpoints read without running code they might hold.

``engine.load_checkpoint`` reads, from the checkpoint folder under ``trainer.storage_path``,
``<tag>/mp_rank_00_model_states.pt`` (the module's weights, step counters, the scheduler) and,
with ZeRO, ``<tag>/zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` (each rank's optimizer
partition), or ``<tag>/expp_rank_<r>_mp_rank_00_optim_states.pt`` without ZeRO; its
``TorchCheckpointEngine.load`` calls ``torch.load(..., weights_only=False)``: a full unpickle, so
a file planted there would run any code in the learner. :func:`load_deepspeed_checkpoint` loads
the same files with torch's weights-only unpickler instead, which builds tensors and plain
containers plus the three DeepSpeed classes below (an enum, a dataclass of two ints, the loss
scaler's settings) and refuses anything else.
"""

from __future__ import annotations

import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def _deepspeed_state_classes() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's own checkpoint engine (saving unchanged), loading with ``weights_only=True``."""

    def __init__(self, replacing: TorchCheckpointEngine):
        super().__init__()
        self.zipfile_serialization = replacing.zipfile_serialization  # saves as the engine it replaces

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                raise ValueError(
                    f"checkpoint {path}: holds objects other than tensors, containers and DeepSpeed's "
                    "state, so the job did not write it; refusing to unpickle it (remove that "
                    f"checkpoint folder from trainer.storage_path): {str(err).splitlines()[0]}"
                ) from None


def load_deepspeed_checkpoint(engine, directory, **kwargs):
    """``engine.load_checkpoint(directory, tag="deepspeed", **kwargs)`` through
    :class:`WeightsOnlyCheckpointEngine`."""
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        raise ValueError(
            f"{type(engine.checkpoint_engine).__name__}: only DeepSpeed's default checkpoint engine is "
            "loaded safely; remove the checkpoint engine settings from the DeepSpeed config"
        )
    return engine.load_checkpoint(directory, tag="deepspeed", **kwargs)
