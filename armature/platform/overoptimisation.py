"""Reward over-optimisation, measured and guarded.

A learner climbs the reward it is trained on; whether images really get better is told by a
*monitor*: a reward component at weight 0 that the learner never sees (the anatomy gym's exact
oracle, a held-out scorer, a judge). When the trained reward keeps rising while a monitor falls,
the policy is exploiting the trained reward.

* :func:`monitors` names a config's monitors; :func:`curve_points` reads, per epoch, the trained
  reward and each monitor from the logged metrics; :func:`curve_png` draws monitor against trained
  reward (the classic over-optimisation curve), one line per run, for MLflow.
* :class:`MonitorGuard` is the early stop: it remembers the epoch at which the chosen monitor was
  best and says stop once the monitor has not beaten that for ``patience`` epochs while the trained
  reward has risen above its value then. The learner then rolls back to that epoch's weights.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

TRAINED = "reward_mean"  # the weighted total the learner is trained on


def monitors(components: Mapping[str, Mapping]) -> list[str]:
    """The names of the reward components at weight 0 (logged, never trained on)."""
    return [name for name, options in components.items() if float((options or {}).get("weight", 1.0)) == 0.0]


def monitor_key(name: str) -> str:
    """The metric of monitor ``name`` (its summary's mean)."""
    return f"reward_{name}_mean"


def curve_points(history: Sequence[tuple[int, Mapping[str, float]]], monitor: str) -> np.ndarray:
    """``[[epoch, trained reward, monitor], ...]`` from ``(epoch, metrics)`` pairs, in epoch order;
    epochs that lack either value are left out."""
    rows = [
        (epoch, m[TRAINED], m[monitor_key(monitor)])
        for epoch, m in sorted(history, key=lambda item: item[0])
        if TRAINED in m and monitor_key(monitor) in m
    ]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def curve_png(curves: Mapping[str, np.ndarray], monitor: str, title: str = "") -> bytes:
    """A PNG of ``monitor`` against the trained reward, one line per entry of ``curves`` (a label ->
    :func:`curve_points`), each epoch a marker, the first and last epochs numbered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 4.0), dpi=100)
    for label, points in curves.items():
        if len(points) == 0:
            continue
        ax.plot(points[:, 1], points[:, 2], marker="o", markersize=3, label=label)
        for epoch, x, y in (points[0], points[-1]):
            ax.annotate(str(int(epoch) + 1), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("trained reward (reward_mean)")
    ax.set_ylabel(f"monitor: {monitor_key(monitor)}")
    ax.set_title(title or f"over-optimisation: {monitor} against the trained reward", fontsize=9)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


@dataclass
class MonitorGuard:
    """Early stop on a falling monitor while the trained reward rises.

    ``update(epoch, metrics)`` after each epoch returns True when training should stop: the
    monitor has not exceeded its best (by more than ``min_delta``) for ``patience`` epochs and
    the trained reward now exceeds its value at the best epoch. ``best_epoch`` is the epoch to
    roll back to. Its state is plain numbers (``asdict``), kept in the learner's checkpoint.
    """

    monitor: str
    patience: int
    min_delta: float = 0.0
    best_epoch: int = -1
    best_monitor: float = float("-inf")
    best_trained: float = float("nan")
    since_best: int = 0

    def update(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        missing = [k for k in (monitor_key(self.monitor), TRAINED) if k not in metrics]
        if missing:
            raise KeyError(
                f"guard.monitor={self.monitor}: this learner's epochs log no {', '.join(missing)}; the guard "
                "watches learners that score their own samples (ddpo, grpo, nft, alignprop, ...)"
            )
        value, trained = float(metrics[monitor_key(self.monitor)]), float(metrics[TRAINED])
        if value > self.best_monitor + self.min_delta or self.best_epoch < 0:
            self.best_epoch, self.best_monitor, self.best_trained, self.since_best = epoch, value, trained, 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience and trained > self.best_trained

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping) -> MonitorGuard:
        return cls(**state)
