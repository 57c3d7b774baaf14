"""Name -> reward factory registry.

Rewards register themselves with ``@register("name")`` on a class or a factory
function; configs then build them with :func:`load` or :func:`load_weighted`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from .base import Reward, WeightedSum, check_weight

_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    """Decorator registering a reward class or factory function under ``name``."""

    def decorator(factory):
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"a reward is already registered as {name!r}: {existing!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available() -> list[str]:
    """Sorted names of all registered rewards."""
    return sorted(_REGISTRY)


def summarize(name: str, scores) -> dict[str, float]:
    """The summary metrics of reward ``name`` over ``scores`` (its class's :meth:`Reward.summary`;
    the mean for a factory function or a name not registered here)."""
    summary = getattr(_REGISTRY.get(name), "summary", Reward.summary)
    return summary(scores)


def load(name: str, **overrides) -> Reward:
    """Build the reward registered as ``name``, passing ``overrides`` as keyword arguments."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; available rewards: {', '.join(available())}")
    factory = _REGISTRY[name]

    params = inspect.signature(factory).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        accepted = [p.name for p in params if p.kind in keyword_kinds]
        unknown = [key for key in overrides if key not in accepted]
        if unknown:
            raise TypeError(
                f"reward {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"accepted options: {', '.join(accepted) or '(none)'}"
            )
        missing = [
            p.name
            for p in params
            if p.kind in keyword_kinds and p.default is inspect.Parameter.empty and p.name not in overrides
        ]
        if missing:
            raise TypeError(f"reward {name!r} needs option(s) {', '.join(map(repr, missing))}")
    return factory(**overrides)


def load_weighted(spec: Mapping[str, Mapping]) -> Reward:
    """Build a weighted sum of registered rewards.

    ``spec`` maps a registered name to its options, e.g.
    ``{"compressibility": {"weight": 1.0}, "aesthetic": {"weight": 0.5, "path": "/x"}}``.
    ``weight`` defaults to 1.0; the other keys are overrides for :func:`load`. A single
    component of weight 1.0 is returned as is.
    """
    if not spec:
        raise ValueError("reward spec is empty: name at least one reward")
    components = {}
    for name, options in spec.items():
        options = dict(options or {})
        weight = check_weight(name, options.pop("weight", 1.0))
        components[name] = (load(name, **options), weight)
    if len(components) == 1:
        ((reward, weight),) = components.values()
        if weight == 1.0:
            return reward
    return WeightedSum(components)
