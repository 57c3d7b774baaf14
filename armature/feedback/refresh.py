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

Where the policy and the reward live decides who does steps 1, 4 and the scoring: the sampler and
reward actors (:class:`Actors`: DDPO, GRPO, NFT), or the learner's own process (:class:`InProcess`:
AlignProp, DRaFT and ReFL sample and score there, and every worker holds its own copy of the reward:
rank 0 fine-tunes and hands the weights to the others).

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

__all__ = ["Actors", "InProcess", "RewardRefresh", "attach_refresh", "PREFIX", "VERSION_BASE"]

PREFIX = "refresh."  # the refreshed scorers among a checkpoint's extra tensors
VERSION_BASE = 1_000_000  # the refresh's rollouts load the weights under versions no epoch uses
SLOT_SEED = 7_919  # the refresh draws its prompt slots and seeds apart from the epochs'


def attach_refresh(
    w: Worker, sampling_weights: Callable[[], dict] | None = None, in_process: InProcess | None = None
) -> RewardRefresh | None:
    """Add the reward refresh to the worker's hooks when ``refresh.every`` > 0 (before
    ``w.start``); ``sampling_weights()``: the weights the sampler actors draw with (default: the
    trained policy's); ``in_process``: the policy and reward of a learner without actors."""
    if not w.c.refresh.every:
        return None
    hook = RewardRefresh(w, sampling_weights, in_process)
    w.hooks.append(hook)
    return hook


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _from_rank_0(value):
    """``value`` as rank 0 has it, on every rank (itself when there is one process)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Actors:
    """The refresh's work on the job's actors: the sampler actors draw, reward actor 0 fine-tunes
    and every reward actor loads the new weights (shared by every rank: loaded once, by rank 0)."""

    shared = True

    def __init__(self, w: Worker, sampling_weights: Callable[[], dict]):
        self.w, self.sampling_weights = w, sampling_weights

    def rollout(self, prompts: list[str], seeds: list[int], version: int) -> np.ndarray:
        import ray

        samplers, size, refs = self.w.samplers, self.w.c.sampling.batch_size, []
        weights = [ray.put(self.sampling_weights())]
        for b, start in enumerate(range(0, len(prompts), size)):
            sl = slice(start, start + size)
            _, images = samplers[b % len(samplers)].rollout.remote(prompts[sl], seeds[sl], weights, version)
            refs.append(images)
        return np.concatenate(ray.get(refs))

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """The trained reward's total, by the last reward actor (the fine-tune runs in the first:
        with two or more, the scores after it come from weights that reached an actor through
        ``load_trainable``)."""
        import ray

        return ray.get(self.w.rewards[-1].score.remote(images, list(prompts)))["reward"]

    def fine_tune(self, images_w, images_l, tie, steps, learning_rate, batch_size, seed):
        import ray

        rewards = self.w.rewards
        state, info = ray.get(
            rewards[0].fine_tune.remote(images_w, images_l, tie, steps, learning_rate, batch_size, seed)
        )
        ray.get([a.load_trainable.remote(state) for a in rewards[1:]])
        return state, info

    def load(self, weights: dict) -> None:
        import ray

        ray.get([a.load_trainable.remote(weights) for a in self.w.rewards])


class InProcess:
    """The refresh's work in the learner's process: ``policy`` draws (no gradients, the weights it
    trains), ``reward`` (the trained reward the learner backpropagates) scores and is fine-tuned
    in place. Each rank holds its own copy: every rank loads the weights."""

    shared = False

    def __init__(self, policy, reward, batch_size: int):
        self.policy, self.reward, self.batch_size = policy, reward, batch_size

    def rollout(self, prompts: list[str], seeds: list[int], version: int) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                sl = slice(start, start + self.batch_size)
                generators = [torch.Generator(device=self.policy.device).manual_seed(int(s)) for s in seeds[sl]]
                out.append(np.asarray(self.policy.rollout(prompts[sl], generators).images))
        return np.concatenate(out)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from PIL import Image

        return np.asarray(self.reward([Image.fromarray(a) for a in images], list(prompts)), np.float32)

    def fine_tune(self, images_w, images_l, tie, steps, learning_rate, batch_size, seed):
        from armature.rewards.fine_tune import fine_tune, trainable_scorers, trainable_state

        scorers = trainable_scorers(self.reward)
        info = fine_tune(scorers, images_w, images_l, tie, steps, learning_rate, batch_size, seed)
        return trainable_state(scorers), info

    def load(self, weights: dict) -> None:
        from armature.rewards.fine_tune import load_trainable_state, trainable_scorers

        load_trainable_state(trainable_scorers(self.reward), weights)


class RewardRefresh:
    """``refresh.*`` in a worker (a ``Worker`` hook): the work is rank 0's, the others wait."""

    name = "refresh"

    def __init__(
        self, w: Worker, sampling_weights: Callable[[], dict] | None = None, in_process: InProcess | None = None
    ):
        self.w, self.cfg, self.rank = w, w.c.refresh, w.rank
        self.backend = in_process or Actors(w, sampling_weights or (lambda: w.policy.trainable_state_dict()))
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
        """Take the refresh's part of a checkpoint; the reward (its actors, or every rank's copy)
        gets the refreshed weights."""
        self.refreshes = int((state.get(self.name) or {}).get("refreshes", 0))
        extra = dict(extra or {})
        weights = {k[len(PREFIX) :]: extra.pop(k) for k in list(extra) if k.startswith(PREFIX)}
        if not self.backend.shared:
            weights = _from_rank_0(weights)
        if weights:
            self.weights = weights
            if self.rank == 0 or not self.backend.shared:
                self.backend.load(weights)
        _barrier()
        return extra or None

    def end_epoch(self, epoch: int, metrics: dict, last: bool) -> None:
        """Refresh after every ``refresh.every``-th epoch but the last (nothing trains after it)."""
        if last or (epoch + 1) % self.cfg.every:
            return
        if self.rank == 0:
            metrics.update(self.refresh(epoch))
        if not self.backend.shared:  # the other ranks' copies of the reward take rank 0's new weights
            weights = _from_rank_0(self.weights)
            if self.rank != 0 and weights:
                self.weights = weights
                self.backend.load(weights)
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
        store, r = self.store, self.cfg
        stored = sorted(pid for pid, rnd in store.rounds().items() if rnd == epoch)
        if stored:
            return stored
        plan = epoch_plan(prompt_list(self.w.c.prompts), self.w.seed + SLOT_SEED, epoch, r.pairs, 2, rank=0, world=1)
        images = self.backend.rollout(list(plan.prompts), list(plan.seeds), VERSION_BASE + epoch)
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
        """The trained reward (the weighted total: monitors weigh 0) of each pair's images."""
        total = self.backend.score(np.concatenate([images_a, images_b]), list(prompts) * 2)
        return total[: len(images_a)], total[len(images_a) :]

    def _fine_tune(self, images_w, images_l, tie, epoch: int) -> dict[str, float]:
        r, seed = self.cfg, self.w.seed * 10_000 + epoch
        self.weights, info = self.backend.fine_tune(
            images_w, images_l, tie, r.steps, r.learning_rate, r.batch_size, seed
        )
        return info


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
