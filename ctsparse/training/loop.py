"""The train loop: AdamW + warm-up/cosine, class balancing, validation, best/last checkpoints.

Outputs in out_dir: best.pt, last.pt (atomic), config.yaml, history.csv, metrics.json, split.json,
and PNGs of the curves and the confusion matrix. Every file is replaced atomically (temp file,
fsync, rename), so a run killed at any moment (even SIGKILL) leaves valid files and resumes with
--resume from last.pt: the last complete epoch, or the step where Ctrl-C/SIGTERM stopped it.

The same function is every rank of a data-parallel job under torchrun (see distributed.py):
only rank 0 writes files and emits events.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ctsparse.calibration import Decision, fit_decision, positive_class, softmax
from ctsparse.candidates import IGNORE, ball_labels, split_balls
from ctsparse.config import Config, to_dict
from ctsparse.data.datasets import Sample, discover_dataset, findings_file, read_findings, stratified_split
from ctsparse.errors import ConfigError, CtsparseError, DatasetError
from ctsparse.fileio import atomic_write_text, remove_stale_temps
from ctsparse.models.checkpoint import load_checkpoint, save_checkpoint
from ctsparse.models.registry import get_engine
from ctsparse.ood import scan_quantities, training_ranges
from ctsparse.prepare import prepare_scans
from ctsparse.sparse_volume import SparseVolume
from ctsparse.training import distributed as ddp
from ctsparse.training import history as hist
from ctsparse.training.average import WeightAverage
from ctsparse.training.epoch import (
    BallPool,
    EpochProgress,
    evaluate,
    predict_logits,
    probs_metrics,
    run_epoch,
)
from ctsparse.training.resume import resume_config
from ctsparse.training.run_folder import RUN_FILES

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_score: float
    epochs_run: int  # the last complete epoch
    metrics: dict[str, Any]  # empty on ranks other than 0
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False
    batches_into_next: int = 0  # steps of epoch epochs_run + 1 already in last.pt (Ctrl-C)


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train(
    data: str | Path,
    out_dir: str | Path,
    cfg: Config,
    *,
    device: str = "auto",
    resume: bool = False,
    resume_epochs: int | None = None,
    on_event: Event | None = None,
    resume_keys: Iterable[str] = (),
) -> TrainResult:
    """Train on a labelled dataset; with resume=True continue OUT/last.pt under its own config.

    Args:
        cfg: the run's config. When resuming, the checkpoint's config wins except for the
            `resume_keys` (those the command line set), taken from `cfg` where they cannot alter
            what was learned (training/resume.py); any other one that differs is refused.
        resume_epochs: when resuming, a new total epoch count (to extend a finished run).
    """
    out = Path(out_dir)
    state: dict[str, Any] = {}
    if resume:  # every rank reads last.pt: resuming a multi-node job needs OUT on a shared filesystem
        last = out / "last.pt"
        if not last.is_file():
            raise CtsparseError(f"{last}: nothing to resume (no last.pt in {out})")
        ckpt = load_checkpoint(last)
        # refused before anything in OUT is touched
        cfg = resume_config(ckpt.config, cfg, resume_keys)
        if resume_epochs is not None:
            cfg.train.epochs = resume_epochs
        state = ckpt.extra
        state["state_dict"] = ckpt.state_dict
    d, dev = ddp.setup(device, need_me=get_engine(cfg.model.backend).needs_me)
    try:
        result = _train(data, out, cfg, d, dev, state, on_event if d.is_main else None)
    except BaseException:
        ddp.cleanup(d, failed=True)  # no barrier: the other ranks may never reach it
        raise
    ddp.cleanup(d)
    return result


def _prepare(samples: list[Sample], cfg: Config, d: ddp.Dist, emit: Event) -> list[SparseVolume | str]:
    """Fill the cache with worker processes; on several ranks each node's ranks split the work."""
    paths = [s.path for s in samples]
    share = paths[d.local_rank :: d.local_world] if d.enabled else paths
    emit("preprocess_start", {"n": len(share)})
    done = prepare_scans(
        share,
        cfg.preprocess,
        cfg.data.cache_dir,
        cfg.data.workers,
        progress=lambda i, n, p: emit("preprocess", {"i": i, "n": n, "path": p}),
    )
    if not d.enabled:
        return done
    d.barrier()  # the node's cache is full: every rank now reads all scans from it
    return prepare_scans(paths, cfg.preprocess, cfg.data.cache_dir, 0)


def _train(
    data: str | Path,
    out: Path,
    cfg: Config,
    d: ddp.Dist,
    dev: torch.device,
    state: dict[str, Any],
    on_event: Event | None,
) -> TrainResult:
    emit = on_event or (lambda kind, info: None)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out, RUN_FILES)  # left by a writer that was killed mid-write
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP checks it)
    rng = np.random.default_rng(cfg.train.seed)  # same epoch order on every rank

    samples = discover_dataset(data)
    classes = sorted({s.label for s in samples})
    positive_class(classes, cfg.train.positive_class)  # a bad train.positive_class fails before any work
    if state and state.get("classes") != classes:
        raise CtsparseError(
            f"{out / 'last.pt'}: classes {state.get('classes')} differ from the dataset's {classes}"
        )
    findings = _findings_for_candidates(data, cfg)  # before any scan is read
    prepared = _prepare(samples, cfg, d, emit)
    ok = [(s, r) for s, r in zip(samples, prepared, strict=True) if isinstance(r, SparseVolume)]
    skipped = [r for r in prepared if isinstance(r, str)]
    for msg in skipped:
        emit("skipped", {"error": msg})
    if len({s.label for s, _ in ok}) < 2:
        raise DatasetError(data, f"fewer than two classes left after {len(skipped)} unreadable scans")
    train_s, val_s = stratified_split([s for s, _ in ok], cfg.train.val_fraction, cfg.train.seed)
    by_path = {s.path: (sv, classes.index(s.label)) for s, sv in ok}
    if cfg.model.candidates > 0:
        cfg, by_path = _with_findings(data, findings, cfg, classes, by_path)
    train_set = [by_path[s.path] for s in train_s]
    val_set = [by_path[s.path] for s in val_s]
    # what the weights saw: predict flags scans outside these ranges (ctsparse/ood.py)
    ranges = training_ranges([scan_quantities(sv) for sv, _ in train_set])
    if d.is_main:
        split = {"train": [str(s.path) for s in train_s], "val": [str(s.path) for s in val_s]}
        atomic_write_text(out / "split.json", json.dumps({**split, "skipped": skipped}, indent=1))
    in_channels = train_set[0][0].n_channels

    from ctsparse.models import create_model

    raw = create_model(cfg.model, in_channels, len(classes)).to(dev)
    if "state_dict" in state:
        raw.load_state_dict(state["state_dict"])
    model = ddp.wrap(raw, d, dev, sync_bn=cfg.train.sync_bn)
    raw = ddp.unwrap(model)  # (SyncBN-converted) module whose state_dict goes into checkpoints
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    pool = BallPool.of(train_set, cfg, data) if cfg.train.balance == "balls" else None
    steps = ddp.steps_per_epoch(len(train_set), cfg.train.batch_size, d)
    if pool is not None:
        steps = pool.n_batches(cfg.train.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.train.epochs * steps, cfg.train.warmup_epochs * steps)
    )
    n_classes = len(classes)
    ema = WeightAverage.of(
        lambda: create_model(cfg.model, in_channels, n_classes).to(dev), cfg.train.ema_epochs, steps
    )
    judged = raw if ema is None else ema.module  # the weights validation and best.pt see
    counts = np.bincount([y for _, y in train_set], minlength=len(classes)).astype(np.float64)
    weights = None
    if cfg.train.balance in ("loss", "balls"):  # balls: for the validation loss
        weights = torch.tensor(
            counts.sum() / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32, device=dev
        )
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    ball_loss_fn: torch.nn.Module | None = None
    if pool is not None:  # the draw balances the classes
        ball_loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    elif cfg.model.candidates > 0:
        ball_loss_fn = _ball_loss(train_set, cfg, len(classes), dev)

    start_epoch, best_score, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    best_loss = math.inf  # breaks ties of the metric: 40 validation scans give coarse scores
    partial: EpochProgress | None = None
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        best_loss = float(state.get("best_loss", math.inf))
        bad_epochs = int(state["bad_epochs"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        rng.bit_generator.state = state["numpy_rng"]
        ddp.restore_torch_rng(state, cfg.train.seed, d, start_epoch)
        if state.get("partial"):
            partial = EpochProgress.from_dict(state["partial"])
            if partial.world != d.world:  # another sharding: redo that epoch from its start
                emit("partial_restart", {"epoch": partial.epoch, "was": partial.world, "now": d.world})
                rng.bit_generator.state = partial.rng_state
                partial = None
    elif d.enabled:
        ddp.seed_rank(cfg.train.seed, d, 0)  # per-rank dropout masks
    if d.is_main:
        hist.truncate(out / "history.csv", start_epoch - 1)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def save_last(epoch_done: int, progress: EpochProgress | None) -> None:
        extra = {
            "epoch": epoch_done,
            "best_score": best_score,
            "best_epoch": best_epoch,
            "best_loss": best_loss,
            "bad_epochs": bad_epochs,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "numpy_rng": progress.rng_state if progress else rng.bit_generator.state,
            "classes": classes,
            "world": d.world,
            "partial": progress.to_dict() if progress else None,
            "ema": None if ema is None else ema.state_dict(),
            **ddp.torch_rng_state(d),  # a collective: every rank calls save_last
        }
        if d.is_main:
            save_checkpoint(out / "last.pt", raw, cfg, classes, in_channels, extra)
        d.barrier()  # nobody moves on (or exits) before last.pt is on disk

    stop = {"flag": False}

    def _on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True  # read between steps; the step in progress finishes

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _on_signal) for s in handled} if _main_thread() else {}
    emit(
        "start",
        {
            "classes": classes,
            "n_train": len(train_set),
            "n_val": len(val_set),
            "device": str(dev),
            "world": d.world,
            "batch_per_rank": ddp.per_rank_batch(cfg.train.batch_size, d),
            "start_epoch": start_epoch,
            "epochs": cfg.train.epochs,
            "skipped": len(skipped),
            "balls": None if pool is None else pool.counts(cfg.train.batch_size),
        },
    )
    last_done = start_epoch - 1  # the last epoch whose checkpoint is on disk
    interrupted, batches_into_next = False, 0
    t_start = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.train.epochs + 1):
            t0 = time.perf_counter()
            resume_from = partial if partial is not None and partial.epoch == epoch else None
            partial = None
            tr = run_epoch(
                model, train_set, cfg, dev, optimizer, scheduler, loss_fn, rng, epoch, emit, stop,
                dist=d, resume_from=resume_from, ball_loss_fn=ball_loss_fn, pool=pool, ema=ema,
            )  # fmt: skip
            if isinstance(tr, EpochProgress):  # stopped between two steps: save that step
                save_last(epoch - 1, tr)
                interrupted, batches_into_next = True, tr.batches_done
                break
            ddp.average_bn_buffers(raw, d)
            if judged is not raw:
                ddp.average_bn_buffers(judged, d)
            ev = evaluate(judged, val_set or train_set, cfg, dev, loss_fn, classes, dist=d)
            score = -ev["loss"] if cfg.train.metric == "loss" else float(ev[cfg.train.metric])
            improved = _better(score, float(ev["loss"]), best_score, best_loss)
            if improved:
                best_score, best_epoch, best_loss, bad_epochs = score, epoch, float(ev["loss"]), 0
            else:
                bad_epochs += 1
            row = hist.row(epoch, optimizer, tr, ev, time.perf_counter() - t0, dev)
            if d.is_main:
                # best, then history, then last: a kill between any two leaves last.pt at the
                # previous epoch, and resuming from it redoes this epoch and rewrites the others
                if improved:
                    meta = {"epoch": epoch, "metrics": _jsonable(ev), "training_ranges": ranges}
                    save_checkpoint(out / "best.pt", judged, cfg, classes, in_channels, meta)
                hist.append(out / "history.csv", row)
            save_last(epoch, None)
            last_done = epoch
            emit("epoch_end", {**row, "improved": improved, "best_epoch": best_epoch})
            if bad_epochs >= cfg.train.patience:
                emit("early_stop", {"epoch": epoch, "patience": cfg.train.patience})
                break
            if d.any(stop["flag"]):
                interrupted = True
                break
            if cfg.train.max_minutes is not None:
                spent = time.perf_counter() - t_start
                over = spent + spent / (last_done - start_epoch + 1) > 60 * cfg.train.max_minutes
                if d.any(over):
                    emit("budget_stop", {"epoch": epoch, "minutes": spent / 60})
                    break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    metrics: dict[str, Any] = {}
    if d.is_main:
        metrics = _final_metrics(out, val_set or train_set, cfg, dev, loss_fn, classes, bool(val_set), ranges)
        metrics["skipped"] = skipped
        metrics["implementation"] = get_engine(cfg.model.backend).implementation(dev)  # which kernels ran
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
        hist.plots(out, classes, metrics)
    emit("done", {"metrics": metrics, "interrupted": interrupted})
    return TrainResult(
        out, best_epoch, best_score, last_done, metrics, skipped, interrupted, batches_into_next
    )


def _findings_for_candidates(data: str | Path, cfg: Config) -> dict[Path, np.ndarray]:
    """DATA/findings.csv when model.candidates asks for it (checked before any scan is read)."""
    if cfg.model.candidates == 0:
        if cfg.train.balance == "balls":
            raise ConfigError("train.balance", "is 'balls', which needs model.candidates > 0")
        return {}
    if cfg.preprocess.blob_candidates != cfg.model.candidates:
        raise ConfigError(
            "model.candidates",
            f"is {cfg.model.candidates} but preprocess.blob_candidates is {cfg.preprocess.blob_candidates}: "
            "set both to the same number of balls (0 and 0 to see the scan whole)",
        )
    findings = read_findings(data)
    if not findings:
        raise DatasetError(data, "model.candidates needs the findings' positions in findings.csv")
    return findings


def _with_findings(
    data: str | Path,
    findings: dict[Path, np.ndarray],
    cfg: Config,
    classes: list[str],
    by_path: dict[Path, tuple[SparseVolume, int]],
) -> tuple[Config, dict[Path, tuple[SparseVolume, int]]]:
    """model.candidates: the findings attached to their scans, and model.background set to the
    one class none of whose scans has a finding."""
    found = {p: findings.get(p.resolve()) for p in by_path}
    marked = {classes[y] for p, (_, y) in by_path.items() if found[p] is not None}
    unmarked = [c for c in classes if c not in marked]
    if len(unmarked) != 1:
        where = findings_file(data) or data
        raise DatasetError(
            where, f"lists findings in scans of {len(marked)} of {len(classes)} classes; model.candidates "
            "needs exactly one class without findings (the background)"
        )  # fmt: skip
    attached = {p: (_marked(sv, found[p]), y) for p, (sv, y) in by_path.items()}
    model = dataclasses.replace(cfg.model, background=classes.index(unmarked[0]))
    return dataclasses.replace(cfg, model=model), attached


def _marked(sv: SparseVolume, world: np.ndarray | None) -> SparseVolume:
    return sv if world is None else sv.with_findings(world)


def _ball_loss(
    train_set: list[tuple[SparseVolume, int]], cfg: Config, n_classes: int, dev: torch.device
) -> torch.nn.Module:
    """Cross-entropy over candidate balls whose weights give every finding class a third of the
    background balls' total weight (a 1:3 ratio, as nodule CAD samples its candidates)."""
    k, bg = cfg.model.candidates, cfg.model.background
    counts = np.zeros(n_classes)
    for sv, y in train_set:
        labels = np.array(ball_labels(sv, split_balls(sv, k), y, bg))
        counts += np.bincount(labels[labels != IGNORE], minlength=n_classes)
    weights = np.where(np.arange(n_classes) == bg, 1.0, counts[bg] / (3.0 * np.maximum(counts, 1)))
    return torch.nn.CrossEntropyLoss(
        weight=torch.tensor(weights, dtype=torch.float32, device=dev), ignore_index=IGNORE
    )


def _better(score: float, loss: float, best_score: float, best_loss: float) -> bool:
    """Whether an epoch beats the best so far: a higher score, or the same score at a lower
    validation loss. On a small validation set accuracy moves in steps of 1/n, so many epochs tie;
    the first of them is rarely the best, and the loss tells them apart."""
    if not math.isfinite(best_score):
        return True
    return score > best_score or (score == best_score and loss < best_loss)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(d, default=float))
    return out


def _final_metrics(
    out: Path,
    data: list[tuple[SparseVolume, int]],
    cfg: Config,
    dev: torch.device,
    loss_fn: torch.nn.Module,
    classes: list[str],
    is_val: bool,
    ranges: dict[str, Any],
) -> dict[str, Any]:
    """The best checkpoint on the validation set; rank 0 alone, with the plain (non-DDP) model.

    Also fits the decision rule there (temperature, operating threshold: ctsparse/calibration.py)
    and re-saves best.pt with it and the training ranges, so predict applies both.
    """
    from ctsparse.models.checkpoint import build_from_checkpoint

    if not (out / "best.pt").is_file():
        return {"evaluated_on": "none", "note": "no complete epoch"}
    model, ckpt = build_from_checkpoint(out / "best.pt")
    model = model.to(dev)
    y = np.array([label for _, label in data], dtype=np.int64)
    logits = predict_logits(model, [sv for sv, _ in data], cfg, dev).reshape(len(y), len(classes))
    ev = probs_metrics(softmax(logits.astype(np.float64)), y, loss_fn, classes)
    positive = positive_class(classes, cfg.train.positive_class)
    if is_val:
        decision = fit_decision(
            logits,
            y,
            classes,
            positive=positive,
            target_sensitivity=cfg.train.target_sensitivity,
            fitted_on="validation",
        )
    else:
        decision = Decision(
            positive_class=positive,
            threshold=0.5 if positive is not None else None,
            note="no validation split: T = 1 and argmax; set train.val_fraction > 0 to fit them",
        )
    extra = {**ckpt.extra, "decision": decision.to_dict(), "training_ranges": ranges}
    save_checkpoint(out / "best.pt", model, ckpt.config, ckpt.classes, ckpt.in_channels, extra)
    return {
        "evaluated_on": "validation" if is_val else "training (no validation split)",
        "best_epoch": ckpt.extra.get("epoch"),
        **_jsonable(ev),
        "decision": _jsonable(decision.to_dict()),
        "threshold": decision.describe(),
    }
