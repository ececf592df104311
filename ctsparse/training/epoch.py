"""One training epoch and one evaluation pass (shared by train, resume and the benchmarks).

Both run on one process or as one rank of a data-parallel job (see distributed.py): the epoch
order and the augmentation of each position in it are drawn the same way on every rank, so the
union of the ranks' work is what a single process does with the same seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctsparse.candidates import BALLS_PER_FINDING, IGNORE, ball_labels, most_abnormal, own_balls
from ctsparse.collate import Batch, collate, collate_balls
from ctsparse.config import Config
from ctsparse.data import augment
from ctsparse.errors import DatasetError
from ctsparse.sparse_volume import SparseVolume
from ctsparse.training.average import WeightAverage
from ctsparse.training.distributed import Dist, per_rank_batch, shard, unwrap
from ctsparse.training.metrics import classification_metrics

Dataset = list[tuple[SparseVolume, int]]
SUMS = ("loss", "correct", "seen", "sites", "seconds")


@dataclass
class EpochProgress:
    """An epoch stopped between two steps (Ctrl-C): enough to finish it later exactly.

    rng_state is the numpy generator's state when the epoch began, so the resumed epoch redraws
    the same order and augmentations and skips the batches already done. sums are over all ranks.
    """

    epoch: int
    batches_done: int
    rng_state: dict[str, Any]
    world: int
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUMS, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "rng_state": self.rng_state,
            "world": self.world,
            "sums": dict(self.sums),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochProgress:
        return cls(int(d["epoch"]), int(d["batches_done"]), d["rng_state"], int(d["world"]), dict(d["sums"]))


@dataclass
class BallPool:
    """train.balance "balls" (with model.candidates): every candidate ball of the training scans
    with its class, drawn into batches across scans.

    A batch of B balls holds B / 4 balls with a finding, drawn with equal weight per finding
    class, and 3B / 4 background balls, from anywhere in the training set. A scan-level batch
    (every ball of 8 scans) holds about one finding ball in 64: its gradient is nearly all
    background. An epoch draws as many finding balls as the training scans hold, so every one
    is seen about once per epoch. Balls whose class is unknown (a finding class's scan without
    positions in findings.csv) are left out.
    """

    balls: list[SparseVolume]
    labels: np.ndarray
    background: int
    # derived once: the rows of the finding and background balls, and each finding ball's
    # chance of a draw (equal shares per finding class)
    findings: np.ndarray = field(init=False)
    backgrounds: np.ndarray = field(init=False)
    finding_p: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.findings = np.flatnonzero(self.labels != self.background)
        self.backgrounds = np.flatnonzero(self.labels == self.background)
        per_class = np.bincount(self.labels[self.findings])
        p = 1.0 / per_class[self.labels[self.findings]] if len(self.findings) else np.zeros(0)
        self.finding_p = p / p.sum() if len(p) else p

    @classmethod
    def of(cls, data: Dataset, cfg: Config, where: str | Path = "") -> BallPool:
        """The pool of `data`'s balls; `where` (the dataset) is named when it cannot be made."""
        k, bg = cfg.model.candidates, cfg.model.background
        balls: list[SparseVolume] = []
        labels: list[int] = []
        for sv, y in data:
            mine = own_balls(sv, k)
            for ball, label in zip(mine, ball_labels(sv, mine, y, bg), strict=True):
                if label != IGNORE:
                    balls.append(ball)
                    labels.append(label)
        pool = cls(balls, np.array(labels, dtype=np.int64), bg)
        if not len(pool.findings) or not len(pool.backgrounds):
            raise DatasetError(
                where,
                f"train.balance 'balls': {len(pool.findings)} finding and {len(pool.backgrounds)} "
                "background balls among the training scans' candidates; both are needed (does "
                "findings.csv place the findings inside the region, near a strong blob maximum?)",
            )
        return pool

    def counts(self, batch_size: int) -> dict[str, int]:
        return {
            "finding": len(self.findings),
            "background": len(self.backgrounds),
            "steps": self.n_batches(batch_size),
            "batch": batch_size,
        }

    def n_batches(self, batch_size: int) -> int:
        return max(1, -(-BALLS_PER_FINDING * len(self.findings) // batch_size))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n ball indices: a quarter (at least one) finding balls, the rest background."""
        n_found = max(1, n // BALLS_PER_FINDING)
        picks = rng.choice(self.findings, size=n_found, replace=True, p=self.finding_p)
        rest = rng.choice(self.backgrounds, size=n - n_found, replace=True)
        out: np.ndarray = rng.permutation(np.concatenate([picks, rest]))
        return out


def epoch_order(data: Dataset, cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """Sample order: a permutation, or class-balanced sampling with replacement ("sampler")."""
    if cfg.train.balance != "sampler":
        return rng.permutation(len(data))
    labels = np.array([y for _, y in data])
    freq = np.bincount(labels)
    p = 1.0 / freq[labels]
    return rng.choice(len(data), size=len(data), replace=True, p=p / p.sum())


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, loss_fn: torch.nn.Module, d: Dist) -> torch.Tensor:
    """The rank's share of the global batch loss.

    DDP averages gradients over ranks, so each rank returns world * (its weighted loss sum) /
    (the weight sum of the whole global batch): the average over ranks is then the class-weighted
    mean over the global batch, exactly the single-process loss. (Averaging per-rank weighted
    means is not: each would be normalised by its own half of the class weights.)
    """
    known = labels[labels != IGNORE]  # candidate balls of unknown class (ctsparse/candidates.py)
    if not d.enabled:
        return loss_fn(logits, labels) if len(known) else logits.sum() * 0.0
    weight = getattr(loss_fn, "weight", None)
    per = torch.nn.functional.cross_entropy(
        logits, labels, weight=weight, reduction="none", ignore_index=IGNORE
    )
    local = float(weight[known].sum()) if weight is not None else float(len(known))
    (total,) = d.sum([local])  # every rank joins, also one whose balls are all of unknown class
    return per.sum() * d.world / total if total > 0 else per.sum() * 0.0


def run_epoch(
    model: torch.nn.Module,
    data: Dataset,
    cfg: Config,
    dev: torch.device,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: torch.nn.Module,
    rng: np.random.Generator,
    epoch: int,
    emit: Callable[[str, dict[str, Any]], None],
    stop: dict[str, bool],
    *,
    dist: Dist | None = None,
    resume_from: EpochProgress | None = None,
    ball_loss_fn: torch.nn.Module | None = None,
    pool: BallPool | None = None,
    ema: WeightAverage | None = None,
) -> dict[str, float] | EpochProgress:
    """Train loss/accuracy/sites-per-second over all ranks, or where it stopped (stop["flag"]).

    The stop flag is read between steps: the step in progress always finishes, so the weights,
    optimizer and scheduler are at a step boundary when the caller saves them. With a `pool`
    (train.balance "balls") the steps are batches of candidate balls drawn from it, and loss and
    accuracy are per ball. An `ema` (train.ema_epochs) takes in the weights after every step.
    """
    d = dist or Dist()
    model.train()
    if resume_from is not None:
        rng.bit_generator.state = resume_from.rng_state
    start_state = dict(rng.bit_generator.state)
    order = epoch_order(data, cfg, rng) if pool is None else np.zeros(0, dtype=np.int64)
    # one key per epoch, then one generator per position: a sample's augmentation depends on
    # where it sits in the epoch order, not on which rank (or how many ranks) processes it
    epoch_key = int(rng.integers(2**63))
    mine, positions = shard(order, d)
    bs = per_rank_batch(cfg.train.batch_size, d)
    n_batches = (len(mine) + bs - 1) // bs if pool is None else pool.n_batches(cfg.train.batch_size)
    first = resume_from.batches_done if resume_from is not None else 0
    # carried sums are global: held by rank 0 only, so the all-reduce below counts them once
    carried = resume_from.sums if resume_from is not None and d.is_main else dict.fromkeys(SUMS, 0.0)
    losses, correct, seen, sites = carried["loss"], carried["correct"], carried["seen"], carried["sites"]
    t0 = time.perf_counter() - carried["seconds"]
    for b in range(first, n_batches):
        if d.any(stop["flag"]):
            sums = d.sum([losses, correct, seen, sites])
            elapsed = time.perf_counter() - t0
            return EpochProgress(
                epoch, b, start_state, d.world, dict(zip(SUMS, [*sums, elapsed], strict=True))
            )
        if pool is not None:
            batch = _ball_batch(pool, cfg, dev, epoch_key, b, d)
        else:
            at = slice(b * bs, (b + 1) * bs)
            batch = _scan_batch(data, cfg, dev, epoch_key, mine[at], positions[at])
        assert batch.labels is not None
        if pool is not None:
            assert ball_loss_fn is not None, "ball batches need ball_loss_fn"
            logits = model(batch.inputs, per_ball=True)
            loss = batch_loss(logits, batch.labels, ball_loss_fn, d)
        elif batch.ball_labels is not None and ball_loss_fn is not None:  # model.candidates
            by_ball = model(batch.inputs, per_ball=True)
            loss = batch_loss(by_ball, batch.ball_labels, ball_loss_fn, d)
            logits = most_abnormal(by_ball.detach(), cfg.model.candidates, cfg.model.background)
        else:
            logits = model(batch.inputs)
            loss = batch_loss(logits, batch.labels, loss_fn, d)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:  # DDP has averaged the gradients: every rank clips alike
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(unwrap(model))
        losses += float(loss.detach()) * len(batch.labels)
        correct += int((logits.detach().argmax(1) == batch.labels).sum())
        seen += len(batch.labels)
        sites += sum(batch.n_sites)
        elapsed = time.perf_counter() - t0
        emit(
            "batch",
            {
                "epoch": epoch,
                "batch": b + 1,
                "n_batches": n_batches,
                "loss": float(loss.detach()),
                "sites_per_s": sites * d.world / elapsed if elapsed else 0.0,
            },
        )
    losses, correct, seen, sites = d.sum([losses, correct, seen, sites])
    elapsed = time.perf_counter() - t0
    return {"loss": losses / max(seen, 1), "accuracy": correct / max(seen, 1), "sites_per_s": sites / elapsed}


def _scan_batch(
    data: Dataset, cfg: Config, dev: torch.device, epoch_key: int, idx: np.ndarray, positions: np.ndarray
) -> Batch:
    """The scans at `idx` of the epoch order (at `positions` in it), augmented."""
    svs = [data[i][0] for i in idx]
    if cfg.augment.enabled:
        svs = [
            augment.apply(sv, augment.make_params(cfg.augment, np.random.default_rng([epoch_key, int(p)])))
            for sv, p in zip(svs, positions, strict=True)
        ]
    orient = None
    if cfg.augment.enabled and cfg.augment.orient_balls and cfg.model.candidates:
        orient = np.random.default_rng([epoch_key, int(positions[0]), 1])
    return collate(svs, [data[i][1] for i in idx], cfg.model, dev, orient)


def _ball_batch(pool: BallPool, cfg: Config, dev: torch.device, epoch_key: int, b: int, d: Dist) -> Batch:
    """Step b's global batch of balls drawn from the pool, this rank's share of it augmented:
    each ball as its scan would be (augment.apply), then turned to a random grid orientation
    (augment.orient_balls). The draw and each ball's augmentation depend on the step and the
    ball's position in it, not on the rank."""
    mine, positions = shard(pool.draw(np.random.default_rng([epoch_key, b]), cfg.train.batch_size), d)
    balls = []
    for i, p in zip(mine, positions, strict=True):
        ball = pool.balls[i]
        if cfg.augment.enabled:
            g = np.random.default_rng([epoch_key, b, int(p)])
            ball = augment.apply(ball, augment.make_params(cfg.augment, g))
            if cfg.augment.orient_balls:
                ball = augment.random_orientation(ball, g)
        balls.append(ball)
    return collate_balls(balls, pool.labels[mine].tolist(), cfg.model, dev)


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, svs: list[SparseVolume], cfg: Config, dev: torch.device
) -> np.ndarray:
    model.eval()
    out = []
    bs = cfg.train.batch_size
    if cfg.train.balance == "balls":  # the batch counts balls: as many scans as hold that many
        bs = max(1, bs // max(1, cfg.model.candidates))
    for b in range(0, len(svs), bs):
        batch = collate(svs[b : b + bs], None, cfg.model, dev)
        out.append(model(batch.inputs).float().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0))


def predict_probs(
    model: torch.nn.Module, svs: list[SparseVolume], cfg: Config, dev: torch.device
) -> np.ndarray:
    logits = predict_logits(model, svs, cfg, dev)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy() if logits.size else logits


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Dataset,
    cfg: Config,
    dev: torch.device,
    loss_fn: torch.nn.Module,
    classes: list[str],
    *,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Metrics over the whole of `data`: each rank predicts every world-th sample and the
    probabilities are gathered, so AUROC and the confusion matrix are over the full set."""
    d = dist or Dist()
    mine = list(range(d.rank, len(data), d.world))
    local = predict_probs(model, [data[i][0] for i in mine], cfg, dev)
    if not mine:
        local = np.zeros((0, len(classes)), dtype=np.float32)
    probs = np.zeros((len(data), len(classes)), dtype=np.float32)
    for r, part in enumerate(d.gather(local)):
        probs[r :: d.world] = part
    y = np.array([label for _, label in data], dtype=np.int64)
    return probs_metrics(probs, y, loss_fn, classes)


def probs_metrics(
    probs: np.ndarray, y: np.ndarray, loss_fn: torch.nn.Module, classes: list[str]
) -> dict[str, Any]:
    """classification_metrics plus the (class-weighted) loss of these probabilities."""
    metrics = classification_metrics(y, probs.astype(np.float64), classes)
    logp = torch.log(torch.from_numpy(probs.astype(np.float32)).clamp_min(1e-12))
    weight = getattr(loss_fn, "weight", None)
    w = None if weight is None else weight.cpu()
    metrics["loss"] = (
        float(torch.nn.functional.nll_loss(logp, torch.from_numpy(y), weight=w)) if len(y) else float("nan")
    )
    return metrics
