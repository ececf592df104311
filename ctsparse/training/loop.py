"""The train loop: AdamW + warm-up/cosine, class balancing, validation, best/last checkpoints.

Outputs in out_dir: best.pt, last.pt (atomic), config.yaml, history.csv, metrics.json, split.json,
and PNGs of the curves and the confusion matrix. last.pt always holds the last *complete* epoch,
so a run killed at any moment resumes from there with --resume.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ctsparse.config import Config, to_dict
from ctsparse.data.datasets import discover_dataset, stratified_split
from ctsparse.device import resolve_device
from ctsparse.errors import CtsparseError, DatasetError
from ctsparse.fileio import atomic_write_text
from ctsparse.sparse import SparseVolume
from ctsparse.training import history as hist
from ctsparse.training.checkpoint import load_checkpoint, save_checkpoint
from ctsparse.training.epoch import evaluate, run_epoch
from ctsparse.training.prepare import prepare_scans

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_score: float
    epochs_run: int
    metrics: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False


def _higher_is_better(metric: str) -> bool:
    return metric != "loss"


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
) -> TrainResult:
    """Train on a labelled dataset; with resume=True continue OUT/last.pt under its own config.

    Args:
        cfg: the run's config (ignored when resuming: the checkpoint's config wins).
        resume_epochs: when resuming, a new total epoch count (to extend a finished run).
    """
    emit = on_event or (lambda kind, info: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {}
    if resume:
        last = out / "last.pt"
        if not last.is_file():
            raise CtsparseError(f"{last}: nothing to resume (no last.pt in {out})")
        ckpt = load_checkpoint(last)
        cfg = ckpt.config  # the run's own config wins; only the epoch budget may be extended
        if resume_epochs is not None:
            cfg.train.epochs = resume_epochs
        state = ckpt.extra
        state["state_dict"] = ckpt.state_dict
    dev = resolve_device(device, need_me=cfg.model.backend == "sparse")
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)

    samples = discover_dataset(data)
    classes = sorted({s.label for s in samples})
    if state and state.get("classes") != classes:
        raise CtsparseError(
            f"{out / 'last.pt'}: classes {state.get('classes')} differ from the dataset's {classes}"
        )
    emit("preprocess_start", {"n": len(samples)})
    prepared = prepare_scans(
        [s.path for s in samples],
        cfg.preprocess,
        cfg.data.cache_dir,
        cfg.data.workers,
        progress=lambda i, n, p: emit("preprocess", {"i": i, "n": n, "path": p}),
    )
    ok = [(s, r) for s, r in zip(samples, prepared, strict=True) if isinstance(r, SparseVolume)]
    skipped = [r for r in prepared if isinstance(r, str)]
    for msg in skipped:
        emit("skipped", {"error": msg})
    if len({s.label for s, _ in ok}) < 2:
        raise DatasetError(data, f"fewer than two classes left after {len(skipped)} unreadable scans")
    train_s, val_s = stratified_split([s for s, _ in ok], cfg.train.val_fraction, cfg.train.seed)
    by_path = {s.path: (sv, classes.index(s.label)) for s, sv in ok}
    train_set = [by_path[s.path] for s in train_s]
    val_set = [by_path[s.path] for s in val_s]
    atomic_write_text(
        out / "split.json",
        json.dumps(
            {
                "train": [str(s.path) for s in train_s],
                "val": [str(s.path) for s in val_s],
                "skipped": skipped,
            },
            indent=1,
        ),
    )
    in_channels = train_set[0][0].n_channels

    from ctsparse.models import create_model

    model = create_model(cfg.model, in_channels, len(classes)).to(dev)
    if "state_dict" in state:
        model.load_state_dict(state["state_dict"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / cfg.train.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.train.epochs * steps_per_epoch, cfg.train.warmup_epochs * steps_per_epoch)
    )
    counts = np.bincount([y for _, y in train_set], minlength=len(classes)).astype(np.float64)
    weights = None
    if cfg.train.balance == "loss":
        weights = torch.tensor(
            counts.sum() / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32, device=dev
        )
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)

    start_epoch, best_score, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best_score, best_epoch, bad_epochs = (
            float(state["best_score"]),
            int(state["best_epoch"]),
            int(state["bad_epochs"]),
        )
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        hist.truncate(out / "history.csv", int(state["epoch"]))
    else:
        hist.truncate(out / "history.csv", 0)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    stop = {"flag": False}

    def _on_sigint(signum: int, frame: Any) -> None:
        stop["flag"] = True

    previous = signal.signal(signal.SIGINT, _on_sigint) if _main_thread() else None
    emit(
        "start",
        {
            "classes": classes,
            "n_train": len(train_set),
            "n_val": len(val_set),
            "device": str(dev),
            "start_epoch": start_epoch,
            "epochs": cfg.train.epochs,
            "skipped": len(skipped),
        },
    )
    last_done = start_epoch - 1  # the last epoch whose checkpoint is on disk
    interrupted = False
    t_start = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.train.epochs + 1):
            t0 = time.perf_counter()
            tr = run_epoch(model, train_set, cfg, dev, optimizer, scheduler, loss_fn, rng, epoch, emit, stop)
            if tr is None:  # interrupted mid-epoch: abandon it, last.pt still holds the previous one
                interrupted = True
                break
            ev = evaluate(model, val_set or train_set, cfg, dev, loss_fn, classes)
            score = -ev["loss"] if cfg.train.metric == "loss" else float(ev[cfg.train.metric])
            improved = score > best_score or not math.isfinite(best_score)
            if improved:
                best_score, best_epoch, bad_epochs = score, epoch, 0
            else:
                bad_epochs += 1
            row = hist.row(epoch, optimizer, tr, ev, time.perf_counter() - t0, dev)
            extra = {
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "classes": classes,
            }
            if improved:
                save_checkpoint(
                    out / "best.pt",
                    model,
                    cfg,
                    classes,
                    in_channels,
                    {"epoch": epoch, "metrics": _jsonable(ev)},
                )
            save_checkpoint(out / "last.pt", model, cfg, classes, in_channels, extra)
            hist.append(out / "history.csv", row)
            last_done = epoch
            emit("epoch_end", {**row, "improved": improved, "best_epoch": best_epoch})
            if bad_epochs >= cfg.train.patience:
                emit("early_stop", {"epoch": epoch, "patience": cfg.train.patience})
                break
            if stop["flag"]:
                interrupted = True
                break
            if cfg.train.max_minutes is not None:
                spent = time.perf_counter() - t_start
                if spent + spent / (last_done - start_epoch + 1) > 60 * cfg.train.max_minutes:
                    emit("budget_stop", {"epoch": epoch, "minutes": spent / 60})
                    break
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    metrics = _final_metrics(out, val_set or train_set, cfg, dev, loss_fn, classes, bool(val_set))
    metrics["skipped"] = skipped
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    hist.plots(out, classes, metrics)
    emit("done", {"metrics": metrics, "interrupted": interrupted})
    return TrainResult(out, best_epoch, best_score, last_done, metrics, skipped, interrupted)


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
) -> dict[str, Any]:
    from ctsparse.training.checkpoint import build_from_checkpoint

    if not (out / "best.pt").is_file():
        return {"evaluated_on": "none", "note": "no complete epoch"}
    model, ckpt = build_from_checkpoint(out / "best.pt")
    ev = evaluate(model.to(dev), data, cfg, dev, loss_fn, classes)
    return {
        "evaluated_on": "validation" if is_val else "training (no validation split)",
        "best_epoch": ckpt.extra.get("epoch"),
        **_jsonable(ev),
    }
