"""The registry of algorithms: what ``armature train algo=<name>`` can run.

Each algorithm declares itself in its own file (``armature/jobs/<name>.py``) with
:func:`register`: its name, its config schema (a dataclass: ``algo.*`` is checked against it
when the config is composed), its own cross-field checks and its entry point. The CLI and the
config composition read this registry; nothing else lists the algorithms.

The modules that declare algorithms are found, not listed: every module of ``armature.jobs``,
and the modules named in ``ARMATURE_ALGORITHMS`` (comma-separated import paths: a learner kept
outside the package, e.g. a test's). Its ``algo`` yaml is found by Hydra's search path
(``configs/algo/<name>.yaml``, or a folder given as ``hydra.searchpath=[file:///path]``).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Algorithm", "register", "get", "names", "discover", "PLUGINS_ENV"]

PLUGINS_ENV = "ARMATURE_ALGORITHMS"


@dataclass(frozen=True)
class Algorithm:
    """One entry of the registry."""

    name: str  # algo.name, and the yaml configs/algo/<name>.yaml
    schema: type  # the dataclass of algo.*; a field `name` holds the algorithm's name
    run: Callable[[Any], dict]  # the driver: the composed config -> the last metrics
    check: Callable[[Any], list[str]] | None = None  # the whole config -> errors naming key and fix
    result: Callable[[dict], str] | None = None  # the last metrics -> the CLI's closing words
    rollout_ahead: bool = False  # honours trainer.rollout_ahead=1 (on-policy samplers one epoch ahead)
    refresh: bool = False  # honours refresh.every > 0 (the reward fine-tuned on the policy's own samples)

    def describe(self, metrics: dict) -> str:
        if self.result is not None:
            return self.result(metrics)
        return f"reward {metrics.get('reward_mean', float('nan')):+.4f}"


_REGISTRY: dict[str, Algorithm] = {}
_discovered = False


def register(*algorithms: Algorithm) -> tuple[Algorithm, ...]:
    """Add algorithms to the registry; a name taken by another entry point is an error. The same
    file loaded twice (``python -m armature.jobs.x`` runs it as ``__main__`` and the registry
    imports it again) keeps its first entry."""
    for algorithm in algorithms:
        existing = _REGISTRY.get(algorithm.name)
        if existing is not None and existing.run.__qualname__ != algorithm.run.__qualname__:
            raise ValueError(f"algorithm {algorithm.name!r} is already registered by {existing.run.__module__}")
        _REGISTRY.setdefault(algorithm.name, algorithm)
    return algorithms


def discover() -> None:
    """Import every module that may declare algorithms (once per process)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("armature.jobs")
    for module in pkgutil.iter_modules(package.__path__, "armature.jobs."):
        importlib.import_module(module.name)
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(name)


def get(name: str | None) -> Algorithm:
    """The algorithm registered as ``name``; a ``ValueError`` listing the choices if none is."""
    discover()
    if name not in _REGISTRY:
        raise ValueError(f"algo.name={name!r}: choose one of {names()} (e.g. algo=ddpo)")
    return _REGISTRY[name]


def names() -> list[str]:
    discover()
    return sorted(_REGISTRY)
