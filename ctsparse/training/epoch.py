"""One training epoch and one evaluation pass (shared by train, resume and the benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ctsparse.collate import collate
from ctsparse.config import Config
from ctsparse.data import augment
from ctsparse.sparse import SparseVolume
from ctsparse.training.metrics import classification_metrics

Dataset = list[tuple[SparseVolume, int]]


def stride_multiple(cfg: Config) -> int:
    return int(2 ** (len(cfg.model.widths) - 1))


def epoch_order(data: Dataset, cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """Sample order: a permutation, or class-balanced sampling with replacement ("sampler")."""
    if cfg.train.balance != "sampler":
        return rng.permutation(len(data))
    labels = np.array([y for _, y in data])
    freq = np.bincount(labels)
    p = 1.0 / freq[labels]
    return rng.choice(len(data), size=len(data), replace=True, p=p / p.sum())


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
) -> dict[str, float] | None:
    """Returns train loss/accuracy/sites-per-second, or None if stopped (SIGINT) mid-epoch."""
    model.train()
    order = epoch_order(data, cfg, rng)
    bs = cfg.train.batch_size
    n_batches = (len(order) + bs - 1) // bs
    losses, correct, seen, sites, t0 = 0.0, 0, 0, 0, time.perf_counter()
    for b in range(n_batches):
        if stop["flag"]:
            return None
        idx = order[b * bs : (b + 1) * bs]
        svs = [data[i][0] for i in idx]
        if cfg.augment.enabled:
            svs = [augment.apply(sv, augment.make_params(cfg.augment, rng)) for sv in svs]
        batch = collate(svs, [data[i][1] for i in idx], cfg.model.backend, dev, stride_multiple(cfg))
        logits = model(batch.inputs)
        assert batch.labels is not None
        loss = loss_fn(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        losses += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == batch.labels).sum())
        seen += len(idx)
        sites += sum(batch.n_sites)
        elapsed = time.perf_counter() - t0
        emit(
            "batch",
            {
                "epoch": epoch,
                "batch": b + 1,
                "n_batches": n_batches,
                "loss": float(loss.detach()),
                "sites_per_s": sites / elapsed if elapsed else 0.0,
            },
        )
    elapsed = time.perf_counter() - t0
    return {"loss": losses / max(seen, 1), "accuracy": correct / max(seen, 1), "sites_per_s": sites / elapsed}


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module, svs: list[SparseVolume], cfg: Config, dev: torch.device
) -> np.ndarray:
    model.eval()
    out = []
    bs = cfg.train.batch_size
    for b in range(0, len(svs), bs):
        batch = collate(svs[b : b + bs], None, cfg.model.backend, dev, stride_multiple(cfg))
        out.append(torch.softmax(model(batch.inputs).float(), dim=1).cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Dataset,
    cfg: Config,
    dev: torch.device,
    loss_fn: torch.nn.Module,
    classes: list[str],
) -> dict[str, Any]:
    probs = predict_probs(model, [sv for sv, _ in data], cfg, dev)
    y = np.array([label for _, label in data], dtype=np.int64)
    metrics = classification_metrics(y, probs.astype(np.float64), classes)
    logp = torch.log(torch.from_numpy(probs).clamp_min(1e-12))
    weight = getattr(loss_fn, "weight", None)
    w = None if weight is None else weight.cpu()
    metrics["loss"] = (
        float(torch.nn.functional.nll_loss(logp, torch.from_numpy(y), weight=w)) if len(y) else float("nan")
    )
    return metrics
