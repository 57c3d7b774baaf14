"""The on-policy reward refresh (``refresh.*``): the trained reward keeps up with what the policy
now draws. A learned reward ranks the base policy's samples; as the policy moves, it draws
images the reward never saw, and a learner climbs the reward's blind spots. Every
``refresh.every`` epochs, between two epochs, rank 0:

1. **samples** ``refresh.pairs`` pairs with the current weights: two images per prompt slot, each
   with its own seed (``epoch_plan`` with groups of 2, the slots drawn apart from the epochs');
2. **stores** them in the preference store as round ``epoch`` (``refresh.store``, default
   ``<run folder>/refresh.db``), the pairs the reward is least sure of served first;
3. **labels** them through the store: ``annotator=simulated``, ``num_annotators`` simulated
   annotators (the reward ``annotator_reward``, by default the gym's exact oracle, with ``noise``
   flips and ``tie_rate`` ties); ``annotator=human``, people on the labeling page
   (``armature label serve --db <store>``), waited for up to ``label_timeout_s``;
4. **fine-tunes** every trainable member of the trained reward (the conv scorers of
   ``learned`` / ``gym_anatomy``; :mod:`armature.rewards.fine_tune`) in reward actor 0, on the
   round's pairs (majority label, ties as 50/50) plus ``replay`` of the earlier rounds' pairs,
   and loads the new weights into every reward actor: the next epoch is scored by them;
5. **logs** (with the epoch's metrics): ``refresh_labels``, ``refresh_ties``,
   ``refresh_agreement`` / ``refresh_kappa`` (between annotators, on the round's pairs), the
   trained reward's pairwise accuracy on the round's labels before the fine-tune
   (``refresh_acc_before``: how far it had fallen behind the policy) and after
   (``refresh_acc_after``), the train pairs, the losses and ``refresh_seconds``.

The refreshed weights ride in each checkpoint as safetensors (``refresh.<component>.<member>.*``);
a resumed run loads them into the reward actors before its first epoch. A resumed refresh whose
pairs are stored already samples nothing and labels what is missing.

With ``trainer.rollout_ahead=1`` the epoch rolled out ahead was scored before the refresh: the
refreshed reward scores from the epoch after it. A reward actor that crashes and restarts comes
back with its starting weights until the next refresh.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np

from armature.feedback.simulated import SimulatedAnnotator, uncertainty
from armature.feedback.store import PreferenceStore, resolve_decisions
from armature.losses.reward_model import pairwise_accuracy
from armature.platform.learner import Worker, epoch_plan, prompt_list

__all__ = ["RewardRefresh", "attach_refresh", "PREFIX", "VERSION_BASE"]

PREFIX = "refresh."  # the refreshed scorers among a checkpoint's extra tensors
VERSION_BASE = 1_000_000  # the refresh's rollouts load the weights under versions no epoch uses
SLOT_SEED = 7_919  # the refresh draws its prompt slots and seeds apart from the epochs'


def attach_refresh(w: Worker, sampling_weights: Callable[[], dict] | None = None) -> RewardRefresh | None:
    """Add the reward refresh to the worker's hooks when ``refresh.every`` > 0 (before
    ``w.start``); ``sampling_weights()``: the weights the policy samples with (default: the
    trained policy's)."""
    if not w.c.refresh.every:
        return None
    hook = RewardRefresh(w, sampling_weights)
    w.hooks.append(hook)
    return hook


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class RewardRefresh:
    """``refresh.*`` in a worker (a ``Worker`` hook): the work is rank 0's, the others wait."""

    name = "refresh"

    def __init__(self, w: Worker, sampling_weights: Callable[[], dict] | None = None):
        self.w, self.cfg, self.rank = w, w.c.refresh, w.rank
        self.sampling_weights = sampling_weights or (lambda: w.policy.trainable_state_dict())
        self.weights: dict | None = None  # the refreshed scorers' weights (rank 0)
        self.refreshes = 0
        self.store, self.annotators = None, []
        if self.rank != 0:
            return
        r = self.cfg
        url = r.store or f"{w.config['run_dir']}/refresh.db"
        self.store = PreferenceStore(url, labels_per_pair=r.labels_per_pair)
        if r.annotator == "simulated":
            from armature.rewards import load_weighted

            reward = load_weighted(r.annotator_reward)
            self.annotators = [
                SimulatedAnnotator(reward, name=f"sim-{i}", noise=r.noise, tie_rate=r.tie_rate, seed=w.seed)
                for i in range(r.num_annotators)
            ]
            shared = sorted(set(r.annotator_reward) & set(w.c.reward.components))
            if shared:
                print(
                    f"[armature] refresh: the simulated annotators label with {', '.join(shared)}, also a component "
                    "of the trained reward (their copy keeps its starting weights)",
                    flush=True,
                )
        print(f"[armature] refresh every {r.every} epochs; preference store {self.store.url}", flush=True)

    # ------------------------------------------------------------------ Worker hook
    def restore(self, state: dict, extra: dict | None) -> dict | None:
        """Take the refresh's part of a checkpoint; the reward actors get the refreshed weights."""
        self.refreshes = int((state.get(self.name) or {}).get("refreshes", 0))
        extra = dict(extra or {})
        weights = {k[len(PREFIX) :]: extra.pop(k) for k in list(extra) if k.startswith(PREFIX)}
        if weights:
            self.weights = weights
            if self.rank == 0:
                self._load_everywhere(weights)
        _barrier()
        return extra or None

    def end_epoch(self, epoch: int, metrics: dict, last: bool) -> None:
        """Refresh after every ``refresh.every``-th epoch but the last (nothing trains after it)."""
        if last or (epoch + 1) % self.cfg.every:
            return
        if self.rank == 0:
            metrics.update(self.refresh(epoch))
        _barrier()

    def state(self) -> dict:
        return {"refreshes": self.refreshes}

    def extra(self) -> dict:
        return {PREFIX + k: v for k, v in (self.weights or {}).items()}

    # ------------------------------------------------------------------ the refresh
    def refresh(self, epoch: int) -> dict[str, float]:
        t0 = time.perf_counter()
        r, store = self.cfg, self.store
        ids = self._sample_into_store(epoch)
        images_a, images_b, prompts = self._images(ids)
        before = self._score(images_a, images_b, prompts)
        self._label(ids, epoch)
        decided = {pid: resolve_decisions(d) for pid, d in store.decisions(ids).items()}
        labels = [d for ds in store.decisions(ids).values() for d in ds]

        # the round's pairs and `replay` of the earlier rounds' labelled pairs
        rounds = store.rounds()
        earlier = sorted(pid for pid in store.decisions() if rounds[pid] < epoch)
        rng = np.random.default_rng([self.w.seed, epoch, SLOT_SEED])
        replayed = sorted(rng.choice(earlier, size=round(r.replay * len(earlier)), replace=False).tolist())
        train = [pid for pid in ids if pid in decided] + replayed
        metrics = {
            "refresh_pairs": len(ids),
            "refresh_labels": len(labels),
            "refresh_ties": sum(d == "tie" for d in labels),
            "refresh_train_pairs": len(train),
            "refresh_replay_pairs": len(replayed),
        }
        agreement = store.agreement(ids)
        metrics["refresh_agreement"], metrics["refresh_kappa"] = agreement["agreement"], agreement["kappa"]
        metrics["refresh_acc_before"] = round_accuracy(ids, decided, *before)
        metrics["refresh_reward_before_mean"] = float(np.mean(np.concatenate(before)))
        if train:
            all_decided = {pid: resolve_decisions(d) for pid, d in store.decisions(train).items()}
            train_a, train_b, _ = self._images(train)
            pick_a = np.array([all_decided[pid] != "l" for pid in train])  # a won, or a tie
            images_w = np.where(pick_a[:, None, None, None], train_a, train_b)
            images_l = np.where(pick_a[:, None, None, None], train_b, train_a)
            tie = np.array([all_decided[pid] == "tie" for pid in train])
            info = self._fine_tune(images_w, images_l, tie, epoch)
            metrics.update({f"refresh_{k}": v for k, v in info.items()})
        after = self._score(images_a, images_b, prompts)
        metrics["refresh_acc_after"] = round_accuracy(ids, decided, *after)
        metrics["refresh_reward_after_mean"] = float(np.mean(np.concatenate(after)))
        self.refreshes += 1
        metrics["refreshes"] = self.refreshes
        metrics["refresh_seconds"] = time.perf_counter() - t0
        print(
            f"[armature] refresh after epoch {epoch + 1}: {len(ids)} pairs, {len(labels)} labels "
            f"({metrics['refresh_ties']} ties, agreement {metrics['refresh_agreement']:.2f}), trained on "
            f"{len(train)}; reward's accuracy on them {metrics['refresh_acc_before']:.3f} -> "
            f"{metrics['refresh_acc_after']:.3f}  {metrics['refresh_seconds']:.1f}s",
            flush=True,
        )
        return metrics

    def _sample_into_store(self, epoch: int) -> list[str]:
        """The round's pair ids; sampled with the current weights and stored unless a resumed
        run stored them already."""
        import ray

        store, r = self.store, self.cfg
        stored = sorted(pid for pid, rnd in store.rounds().items() if rnd == epoch)
        if stored:
            return stored
        c, samplers = self.w.c, self.w.samplers
        plan = epoch_plan(prompt_list(c.prompts), self.w.seed + SLOT_SEED, epoch, r.pairs, 2, rank=0, world=1)
        weights, version = [ray.put(self.sampling_weights())], VERSION_BASE + epoch
        size, refs = c.sampling.batch_size, []
        for b, start in enumerate(range(0, len(plan.prompts), size)):
            sl = slice(start, start + size)
            _, images = samplers[b % len(samplers)].rollout.remote(plan.prompts[sl], plan.seeds[sl], weights, version)
            refs.append(images)
        images = np.concatenate(ray.get(refs))
        scores = self._score(images[0::2], images[1::2], plan.prompts[0::2])
        unsure = uncertainty(*scores)
        ids = [f"refresh-{epoch:04d}-{k:04d}" for k in range(r.pairs)]
        store.add_pairs(
            {
                "pair_id": ids[k],
                "prompt": plan.prompts[2 * k],
                "image_a": images[2 * k],
                "image_b": images[2 * k + 1],
                "policy_version": epoch + 2,  # the weights after epoch + 1 updates
                "round": epoch,
                "priority": float(unsure[k]),  # people see the pairs the reward is least sure of first
                "source": f"refresh:e{epoch}",
            }
            for k in range(r.pairs)
        )
        return ids

    def _label(self, ids: list[str], epoch: int) -> None:
        """Simulated annotators label all they are served; for people, wait for the round's labels."""
        r, store = self.cfg, self.store
        if self.annotators:
            for annotator in self.annotators:
                annotator.label(store)
            return
        wanted = r.min_labels or len(ids) * r.labels_per_pair
        deadline, last_note = time.time() + r.label_timeout_s, 0.0
        while (have := sum(map(len, store.decisions(ids).values()))) < wanted and time.time() < deadline:
            if time.time() - last_note > 60:
                print(
                    f"[armature] refresh after epoch {epoch + 1}: {have}/{wanted} labels; "
                    f"label at `armature label serve --db {store.url}`",
                    flush=True,
                )
                last_note = time.time()
            time.sleep(2.0)

    def _images(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The stored pairs' images (uint8 ``[N, H, W, 3]``, a and b) and prompts."""
        from PIL import Image

        def decode(pid, side):
            return np.asarray(Image.open(io.BytesIO(self.store.image(pid, side))).convert("RGB"))

        a = np.stack([decode(pid, "a") for pid in ids])
        b = np.stack([decode(pid, "b") for pid in ids])
        return a, b, [self.store.pair(pid)["prompt"] for pid in ids]

    def _score(self, images_a: np.ndarray, images_b: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The trained reward (the weighted total: monitors weigh 0) of each pair's images, by the
        last reward actor (the fine-tune runs in the first: with two or more, the scores after it
        come from weights that reached an actor through ``load_trainable``)."""
        import ray

        both = np.concatenate([images_a, images_b])
        total = ray.get(self.w.rewards[-1].score.remote(both, list(prompts) * 2))["reward"]
        return total[: len(images_a)], total[len(images_a) :]

    def _fine_tune(self, images_w, images_l, tie, epoch: int) -> dict[str, float]:
        import ray

        r, rewards = self.cfg, self.w.rewards
        seed = self.w.seed * 10_000 + epoch
        state, info = ray.get(
            rewards[0].fine_tune.remote(images_w, images_l, tie, r.steps, r.learning_rate, r.batch_size, seed)
        )
        ray.get([a.load_trainable.remote(state) for a in rewards[1:]])
        self.weights = state
        return info

    def _load_everywhere(self, weights: dict) -> None:
        import ray

        ray.get([a.load_trainable.remote(weights) for a in self.w.rewards])


def round_accuracy(ids: list[str], decided: dict, scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """Pairwise accuracy of the scores on the pairs the annotators decided (ties left out)."""
    s_w, s_l = [], []
    for k, pid in enumerate(ids):
        decision = decided.get(pid)
        if decision in ("w", "l"):
            winner, loser = (scores_a[k], scores_b[k]) if decision == "w" else (scores_b[k], scores_a[k])
            s_w.append(winner)
            s_l.append(loser)
    return pairwise_accuracy(s_w, s_l) if s_w else float("nan")
