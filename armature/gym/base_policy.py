"""Where the gym's base policy lives.

``armature gym pretrain`` (:mod:`armature.jobs.gym_pretrain`) writes a diffusers folder to the
cache, ``$ARMATURE_CACHE/gym/policy`` (else ``~/.cache/armature/gym/policy``); the package also
ships the one that command made for the README's figures (``armature/gym/policy``, float16, a
few MB). ``model=gym`` loads the cached one when it exists, else the shipped one.
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).parent / "policy"
SHIPPED_SCORER = Path(__file__).parent / "anatomy_scorer"  # the learned anatomy reward (provenance.json)


def shipped_scorers() -> list[str]:
    """The shipped anatomy reward's members (``anatomy_scorer/seed-*``): its score is their mean."""
    members = sorted(str(p) for p in SHIPPED_SCORER.glob("seed-*") if (p / "scorer.json").is_file())
    if not members:
        raise FileNotFoundError(
            f"gym_anatomy: no scorer folders seed-* in {SHIPPED_SCORER}; reinstall armature "
            "or pass reward.components.gym_anatomy.path=<your scorer folder>"
        )
    return members


def cache_path() -> Path:
    root = os.environ.get("ARMATURE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "armature") / "gym" / "policy"


def policy_path() -> Path:
    """The gym base policy to load: the cached pretraining result, else the shipped one."""
    for path in (cache_path(), SHIPPED):
        if (path / "model_index.json").is_file():
            return path
    raise FileNotFoundError(
        f"model.family=gym: no gym base policy in {cache_path()} or {SHIPPED}; "
        "run `armature gym pretrain` (about 25 minutes on 2 CPU cores) or set model.pretrained to its folder"
    )
