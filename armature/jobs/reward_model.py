"""Reward-model training (HPS / BACON style) on preference pairs, on Ray Train, tracked in MLflow.

``armature train algo=reward_model`` fine-tunes a CLIP scorer

    s(x, p) = exp(logit_scale) * cos(e_I(x), e_T(p))

(HPS v1/v2 and PickScore's form; the image tower, its projection and ``logit_scale`` train,
the text tower stays frozen) on the pair format of :mod:`armature.data.pairs`, streamed by
:mod:`armature.data.stream` (validated, decoded, resized; bad records quarantined; a held-out
split by a hash of ``pair_id``). Losses (:mod:`armature.losses.reward_model`):

* ``algo.loss=bradley_terry``: ``-[y log sigma(s_w - s_l) + (1 - y) log sigma(s_l - s_w)]``,
  ``y = 1``, or ``0.5`` for a tie (``data.keep_ties=true`` keeps them);
* ``algo.loss=listwise``: HPS's cross-entropy over a choice set -- the pairs of a batch that
  share a prompt and a preferred image form one set ``{chosen, rejected_1, ...}`` of at most
  ``algo.max_choices`` images (ties are left out);
* ``algo.backbone=conv`` trains a small convolutional image scorer instead
  (:class:`~armature.rewards.conv_scorer.ConvScorer`, ``algo.conv_widths``, from scratch at
  ``data.image_size``), which reads the image alone: an anatomy scorer for drawn figures.
* ``algo.severity_weight > 0`` adds the ordinal severity head (BACON's levels 0-3 from the
  pairs' ``severity_w`` / ``severity_l``): ``P(severity >= k) = sigma(theta_k - s)``.

Read top to bottom: ``run`` (the driver) opens the MLflow run, builds synthetic pairs when
``data.pairs`` is unset (procedural drawings, each with ``algo.synthetic_choices`` degraded
copies, severities by kind, and some ties), runs the Ray Data pipeline and the
``TorchTrainer``; ``train_loop`` (each worker) averages gradients over workers by hand,
reports a checkpoint every epoch, measures held-out accuracy (ties excluded and included),
and rank 0 saves the scorer to ``<run folder>/scorer`` and the MLflow artifact ``scorer/``.
Then ``armature.rewards.load("learned", path=...)`` scores with it, e.g. in a DDPO run:
``armature train reward.components='{learned: {path: <run folder>/scorer}}'``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from armature.losses.reward_model import (
    bradley_terry_loss,
    listwise_loss,
    ordinal_loss,
    ordinal_thresholds,
    pairwise_accuracy,
    spearman,
    tie_calibrated_accuracy,
)
from armature.platform.algorithms import Algorithm, register
from armature.platform.checkpoints import restore_torch_checkpoint, save_torch_checkpoint
from armature.platform.config import DataConfig
from armature.platform.learner import LoopInputs, Worker, quarantine_metrics, run_learner

SEVERITY_BY_KIND = {"remove": 3, "duplicate": 2, "shift": 2, "warp": 1, "mirror": 1}


# ============================================================================ config
@dataclass
class RewardModelConfig:
    """Reward-model training (armature/jobs/reward_model.py): a CLIP scorer on preference pairs."""

    name: str = "reward_model"
    num_epochs: int = 6
    train_batch_size: int = 16  # pairs per micro-batch on one worker
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "bradley_terry"  # bradley_terry (ties at target 0.5) or listwise (HPS: one chosen among n)
    max_choices: int = 4  # listwise: the most images in a choice set (pairs sharing prompt and chosen image)
    severity_weight: float = 0.0  # > 0: ordinal severity head (BACON's 4 levels) on the same score
    backbone: str = "tiny"  # tiny (a small random CLIP built from config), a CLIPModel hub id / folder, or conv
    conv_widths: list[int] = field(default_factory=lambda: [32, 64, 64, 128])  # backbone=conv: block channels
    processor: Optional[str] = None  # tokenizer + preprocessing source (default: the backbone)
    synthetic_choices: int = 3  # synthetic data: degraded copies per drawing (choice sets of up to this + 1)
    synthetic_tie_fraction: float = 0.1  # synthetic data: share of drawings that also give a tie pair


# ============================================================================ driver
def run(cfg: DictConfig) -> dict:
    """Train a reward model as configured; returns the last epoch's metrics."""
    return run_learner(cfg, train_loop, extra_cpus=1, prepare=_prepare)


def result(metrics: dict) -> str:
    """The CLI's closing words."""
    return f"held-out accuracy {metrics.get('heldout_acc', float('nan')):.3f}"


register(Algorithm("reward_model", RewardModelConfig, run, result=result))


def _prepare(job, samplers: list, rewards: list) -> LoopInputs:
    """The backbone and the pairs (given, or synthetic) through the Ray Data pipeline."""
    import ray.data

    from armature.data.stream import read_dataset, split

    c = job.cfg
    algo, data = c.algo, c.data
    if algo.loss not in ("bradley_terry", "listwise"):
        raise ValueError(f"algo.loss={algo.loss!r}: choose bradley_terry or listwise")
    if not 2 <= algo.max_choices <= 16:
        raise ValueError(f"algo.max_choices={algo.max_choices}: a choice set holds 2..16 images (HPS: 2-4)")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True

    size = data.image_size or 32
    backbone = _prepare_backbone(algo, f"{job.run_dir}/backbone", size, c.trainer.seed)
    pairs = data.pairs or synthetic_pairs(f"{job.run_dir}/synthetic_pairs", data, algo, size, c.trainer.seed)
    quarantine = data.quarantine_path or f"{job.run_dir}/quarantine"
    ds = (
        read_dataset(pairs, allow_outside_root=data.allow_outside_root)
        .repartition(target_num_rows_per_block=data.batch_size)
        .map_batches(
            prepare_with_severity,
            batch_format="pyarrow",
            batch_size=data.batch_size,
            num_cpus=data.decode_num_cpus,
            fn_kwargs={
                "size": size,
                "quarantine_dir": quarantine,
                "keep_ties": data.keep_ties,
                "heldout_fraction": data.heldout_fraction,
            },
        )
    )
    train_ds, heldout_ds = split(ds.materialize())
    counts = {
        "data_train_pairs": train_ds.count(),
        "data_heldout_pairs": heldout_ds.count(),
        **quarantine_metrics(quarantine),
    }
    print(
        f"[armature] pairs {pairs}: {counts['data_train_pairs']} for training, {counts['data_heldout_pairs']} "
        f"held out, {counts['data_quarantined']} quarantined",
        flush=True,
    )
    c.tracking.registered_model = None  # the scorer is an artifact, not a diffusion adapter
    return LoopInputs(
        {"backbone": backbone, "run_dir": job.run_dir, "counts": counts, "image_size": size},
        {"train": train_ds, "heldout": heldout_ds},
    )


def prepare_with_severity(batch, size: int, quarantine_dir: str, keep_ties: bool, heldout_fraction: float):
    """:func:`armature.data.stream.prepare_batch` plus ``severity_w`` / ``severity_l`` (-1: unknown),
    oriented like the images (a label ``l`` record's severities are swapped with them)."""
    from armature.data.stream import prepare_batch

    out = prepare_batch(batch, size, quarantine_dir, keep_ties=keep_ties, heldout_fraction=heldout_fraction)
    raw = {
        r["pair_id"]: r
        for r in batch.select(
            [k for k in ("pair_id", "label", "severity_w", "severity_l") if k in batch.column_names]
        ).to_pylist()
    }
    sev_w, sev_l = [], []
    for pair_id in out["pair_id"]:
        r = raw[pair_id]
        w, l = r.get("severity_w"), r.get("severity_l")
        if r.get("label") == "l":
            w, l = l, w
        sev_w.append(-1 if w is None else int(w))
        sev_l.append(-1 if l is None else int(l))
    out["severity_w"], out["severity_l"] = np.array(sev_w, np.int64), np.array(sev_l, np.int64)
    return out


def _prepare_backbone(algo: RewardModelConfig, directory: str, size: int, seed: int) -> str:
    """A folder the scorer loads from: the configured hub id / folder, or a tiny random CLIP
    (``conv``: no folder, the convolutional scorer starts from random weights)."""
    if algo.backbone == "conv":
        return "conv"
    if algo.backbone != "tiny":
        return algo.backbone
    from armature.policies.tiny import build_char_tokenizer
    from armature.rewards.clip_score import build_tiny_clip

    if not os.path.isfile(os.path.join(directory, "config.json")):
        build_tiny_clip(directory, build_char_tokenizer(32), seed=seed, image_size=size)
    return directory


def synthetic_pairs(directory: str, data: DataConfig, algo: RewardModelConfig, size: int, seed: int) -> str:
    """Pairs from procedural drawings: ``synthetic_choices`` degraded copies of each (one pair
    each, severity by kind, so pairs sharing a drawing form choice sets), and for a share of
    the drawings a tie between two copies degraded the same way."""
    from armature.data.pairs import write_pairs
    from armature.data.synthetic import make_pair, procedural_sources

    path = f"{directory}/pairs.parquet"
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for source in procedural_sources(data.synthetic_pairs, size=size, seed=seed):
        kinds = list(rng.permutation(data.synthetic_kinds))[: algo.synthetic_choices]
        made = []
        for kind in kinds:
            pair = make_pair(source, rng, kinds=[kind], pad=data.synthetic_pad)
            if pair is not None:
                pair["pair_id"] = f"{source['id']}:{kind}"
                pair["severity_l"] = SEVERITY_BY_KIND.get(kind, 2)
                records.append(pair)
                made.append(pair)
        if made and rng.random() < algo.synthetic_tie_fraction:
            again = make_pair(source, rng, kinds=[made[0]["source"].split(":")[1]], pad=data.synthetic_pad)
            if again is not None:  # two copies broken the same way: rated equal
                records.append(
                    {
                        **again,
                        "pair_id": f"{source['id']}:tie",
                        "image_w": made[0]["image_l"],
                        "label": "tie",
                        "severity_w": made[0]["severity_l"],
                        "severity_l": made[0]["severity_l"],
                        "source": "synthetic:tie",
                    }
                )
    write_pairs(records, path)
    print(f"[armature] built {len(records)} synthetic pairs in {path}", flush=True)
    return path


# ============================================================================ learner
class Scorer(torch.nn.Module):
    """``exp(logit_scale) * cos`` of a CLIP (via the ``learned`` reward's own code), or the
    convolutional scorer (``backbone="conv"``), + ordinal thresholds."""

    def __init__(
        self, backbone: str, processor: str | None, device: str = "cpu", conv_widths=None, image_size: int = 64
    ):
        super().__init__()
        self.clip = None
        if backbone == "conv":
            from armature.rewards.conv_scorer import DEFAULT_WIDTHS, ConvNet, ConvScorer

            self.reward = ConvScorer(ConvNet(conv_widths or DEFAULT_WIDTHS), image_size, device=device)
            self.conv = self.reward.net.requires_grad_(True)  # a submodule: state_dict, parameters
        else:
            from armature.rewards.clip_score import ClipSimilarity

            self.reward = ClipSimilarity(backbone, processor, scale=1.0, device=device, name="learned")
            self.clip = self.reward.model
            self.clip.vision_model.requires_grad_(True)
            self.clip.visual_projection.requires_grad_(True)
            self.clip.logit_scale.requires_grad_(True)
        self.raw_thresholds = torch.nn.Parameter(torch.tensor([-1.0, 0.0, 0.0]))  # 3 cuts: 4 levels

    def forward(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2).float() / 255.0
        if self.clip is None:
            return self.conv(self.reward.pixels(images))
        cos = (self.reward.image_embeds(images) * self.reward.text_embeds(prompts)).sum(-1)
        return self.clip.logit_scale.exp() * cos

    def thresholds(self) -> torch.Tensor:
        return ordinal_thresholds(self.raw_thresholds)


def choice_sets(batch: dict, max_choices: int):
    """HPS choice sets from a batch of pairs: the non-tie pairs sharing a prompt and a preferred
    image. Returns ``(chosen_rows, rejected_rows)``: per set, the pair row whose ``pixels_w`` is
    the chosen image and the rows whose ``pixels_l`` are the others (at most ``max_choices - 1``)."""
    groups: dict[tuple, list[int]] = {}
    for i, (prompt, tie) in enumerate(zip(batch["prompt"], batch["tie"].tolist())):
        if tie:
            continue
        key = (prompt, hash(batch["pixels_w"][i].numpy().tobytes()))
        groups.setdefault(key, []).append(i)
    return [(rows[0], rows[: max_choices - 1]) for rows in groups.values()]


def batch_loss(scorer: Scorer, batch: dict, algo: RewardModelConfig) -> tuple[torch.Tensor, dict]:
    prompts = list(batch["prompt"])
    n = len(prompts)
    scores = scorer(torch.cat([batch["pixels_w"], batch["pixels_l"]]), prompts + prompts)
    s_w, s_l = scores[:n], scores[n:]
    info = {"train_acc": pairwise_accuracy(s_w.detach().numpy(), s_l.detach().numpy(), batch["tie"].numpy())}
    if algo.loss == "bradley_terry":
        loss = bradley_terry_loss(s_w, s_l, batch["tie"])
    else:
        sets = choice_sets(batch, algo.max_choices)
        width = max(1 + len(rejected) for _, rejected in sets)
        table = s_w.new_zeros(len(sets), width)
        valid = torch.zeros(len(sets), width, dtype=torch.bool)
        for g, (chosen, rejected) in enumerate(sets):
            table[g, 0], valid[g, 0] = s_w[chosen], True
            for j, row in enumerate(rejected, start=1):
                table[g, j], valid[g, j] = s_l[row], True
        loss = listwise_loss(table, torch.zeros(len(sets), dtype=torch.long), valid)
        info["choice_set_size"] = float(valid.sum()) / len(sets)
    info["ranking_loss"] = loss.item()
    if algo.severity_weight > 0:
        severity = torch.cat([batch["severity_w"], batch["severity_l"]])
        ordinal = ordinal_loss(scores, severity, scorer.thresholds())
        loss = loss + algo.severity_weight * ordinal
        info["ordinal_loss"] = ordinal.item()
    return loss, info


def train_loop(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from armature.data.stream import collate

    w = Worker(config)
    algo, rank = w.algo, w.rank
    scorer = Scorer(
        config["backbone"], algo.processor, conv_widths=algo.conv_widths, image_size=config["image_size"]
    ).train()
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=algo.learning_rate, weight_decay=algo.weight_decay)
    distributed = dist.is_initialized() and dist.get_world_size() > 1

    start_epoch = 0
    state = restore_torch_checkpoint()
    if state is not None:
        scorer.load_state_dict(state["scorer"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
    logger = w.open_logger()

    shard = ray.train.get_dataset_shard("train")
    metrics: dict = {}
    for epoch in range(start_epoch, algo.num_epochs):
        t0 = time.perf_counter()
        stats = []
        for batch in shard.iter_torch_batches(
            batch_size=algo.train_batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=4 * algo.train_batch_size,
            local_shuffle_seed=w.seed * 10_000 + epoch,
        ):
            loss, info = batch_loss(scorer, batch, algo)
            optimizer.zero_grad()
            loss.backward()
            if distributed:  # average the gradients over the workers
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= dist.get_world_size()
            info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, algo.max_grad_norm))
            optimizer.step()
            stats.append({"loss": loss.item(), **info})
        metrics = {
            "epoch": epoch,
            **{k: float(np.nanmean([s.get(k, np.nan) for s in stats])) for k in stats[0]},
            **({"logit_scale": float(scorer.clip.logit_scale.exp())} if scorer.clip is not None else {}),
        }
        if rank == 0:
            metrics.update(evaluate(scorer, ray.train.get_dataset_shard("heldout"), algo.train_batch_size))
            metrics.update(config["counts"])
        metrics["epoch_time_s"] = time.perf_counter() - t0
        if rank == 0:
            print(
                f"[armature] epoch {epoch + 1}/{algo.num_epochs}  loss {metrics['loss']:.4f}  "
                f"train acc {metrics['train_acc']:.3f}  held-out acc {metrics.get('heldout_acc', float('nan')):.3f} "
                f"(ties incl. {metrics.get('heldout_acc_ties', float('nan')):.3f})  {metrics['epoch_time_s']:.1f}s",
                flush=True,
            )
        save_torch_checkpoint(
            {"scorer": scorer.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}, metrics, rank
        )
        if logger is not None:
            logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=epoch)

    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_scorer(scorer, Path(tmp) / "scorer", config["backbone"], algo)
            logger.log_artifacts(folder, "scorer")
            target = f"{config['run_dir']}/scorer"
            if "://" not in target:
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(folder, target)
        print(
            f"[armature] scorer saved to {target} (MLflow: runs:/{config['run_id']}/scorer); "
            f"use it as reward.components='{{learned: {{path: {target}}}}}'",
            flush=True,
        )


@torch.no_grad()
def evaluate(scorer: Scorer, shard, batch_size: int) -> dict:
    """Held-out pairwise accuracy (ties excluded; ties included, tie-calibrated) and the Spearman
    correlation of the score with the severity labels (where known)."""
    from armature.data.stream import collate

    scorer.eval()
    s_w, s_l, tie, scores, severity = [], [], [], [], []
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
        n = len(batch["prompt"])
        s = scorer(torch.cat([batch["pixels_w"], batch["pixels_l"]]), list(batch["prompt"]) * 2).numpy()
        s_w.append(s[:n]), s_l.append(s[n:]), tie.append(batch["tie"].numpy())
        scores.append(s), severity.append(torch.cat([batch["severity_w"], batch["severity_l"]]).numpy())
    scorer.train()
    if not s_w:
        return {}
    s_w, s_l, tie = np.concatenate(s_w), np.concatenate(s_l), np.concatenate(tie)
    scores, severity = np.concatenate(scores), np.concatenate(severity)
    out = {"heldout_acc": pairwise_accuracy(s_w, s_l, tie)}
    if tie.any():
        out["heldout_acc_ties"], out["heldout_tie_eps"] = tie_calibrated_accuracy(s_w, s_l, tie)
    known = severity >= 0
    if known.sum() > 2:
        out["heldout_spearman_severity"] = spearman(scores[known], -severity[known])
    return out


def save_scorer(scorer: Scorer, folder: Path, backbone: str, algo: RewardModelConfig) -> Path:
    """The ``learned`` reward's folder: ``clip/`` (model, tokenizer, preprocessing) + ``scorer.json``,
    or ``conv.safetensors`` + ``scorer.json`` for the convolutional scorer."""
    thresholds = scorer.thresholds().tolist() if algo.severity_weight > 0 else []
    if scorer.clip is None:
        scorer.reward.save(str(folder), thresholds=thresholds, loss=algo.loss)
        return folder
    clip_dir = folder / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    scorer.clip.save_pretrained(clip_dir)
    scorer.reward.tokenizer.save_pretrained(clip_dir)
    source = algo.processor or backbone
    preprocessor = Path(source) / "preprocessor_config.json"
    if preprocessor.is_file():
        shutil.copy(preprocessor, clip_dir / "preprocessor_config.json")
    else:
        size, crop, mean, std = scorer.reward.size, scorer.reward.crop_size, scorer.reward.mean, scorer.reward.std
        (clip_dir / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "size": {"shortest_edge": size} if isinstance(size, int) else {"height": size[0], "width": size[1]},
                    "do_center_crop": crop is not None,
                    "crop_size": {"height": crop[0], "width": crop[1]} if crop else None,
                    "image_mean": list(mean),
                    "image_std": list(std),
                }
            )
        )
    (folder / "scorer.json").write_text(
        json.dumps(
            {"kind": "clip_similarity", "thresholds": thresholds, "loss": algo.loss, "backbone": backbone}, indent=2
        )
    )
    return folder
