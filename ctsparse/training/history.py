"""history.csv (one row per epoch, rewritten atomically) and the PNG plots of a run."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from ctsparse.fileio import atomic_write, atomic_write_text

COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_auroc",
    "epoch_time_s",
    "sites_per_s",
    "peak_rss_mb",
    "peak_cuda_mb",
]


def row(
    epoch: int,
    optimizer: torch.optim.Optimizer,
    tr: dict[str, float],
    ev: dict[str, Any],
    seconds: float,
    dev: torch.device,
) -> dict[str, Any]:
    from ctsparse.meters import peak_rss_bytes

    cuda = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    return {
        "epoch": epoch,
        "lr": optimizer.param_groups[0]["lr"],
        "train_loss": tr["loss"],
        "train_accuracy": tr["accuracy"],
        "val_loss": ev["loss"],
        "val_accuracy": ev["accuracy"],
        "val_balanced_accuracy": ev["balanced_accuracy"],
        "val_auroc": ev["auroc"],
        "epoch_time_s": seconds,
        "sites_per_s": tr["sites_per_s"],
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "peak_cuda_mb": cuda,
    }


def append(path: Path, values: dict[str, Any]) -> None:
    """Add one epoch's row by rewriting the file atomically (temp file, fsync, rename).

    The file is a few dozen lines, so a rewrite costs nothing, and a crash at any moment leaves
    either the old file or the new one: never a half-written line for a resumed run to trip on.
    """
    rows = read(path)
    rows.append({k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in values.items()})
    _write(path, rows)


def read(path: Path) -> list[dict[str, str]]:
    """The complete rows (every column present, integer epoch); anything else is skipped."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [
            r
            for r in csv.DictReader(fh)
            if r.get("epoch", "").isdigit() and all(r.get(c) is not None for c in COLUMNS)
        ]


def truncate(path: Path, last_epoch: int) -> None:
    """Keep rows up to last_epoch (what the checkpoint we resume from has seen), once each."""
    by_epoch = {int(r["epoch"]): r for r in read(path) if int(r["epoch"]) <= last_epoch}
    _write(path, [by_epoch[e] for e in sorted(by_epoch)])


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plots(out: Path, classes: list[str], metrics: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(out / "history.csv")
    if rows:
        ep = [int(r["epoch"]) for r in rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        a1.plot(ep, [float(r["train_loss"]) for r in rows], label="train")
        a1.plot(ep, [float(r["val_loss"]) for r in rows], label="validation")
        a1.set_xlabel("epoch")
        a1.set_ylabel("loss")
        a1.legend()
        for key in ("train_accuracy", "val_accuracy", "val_balanced_accuracy", "val_auroc"):
            a2.plot(ep, [float(r[key]) for r in rows], label=key)
        a2.set_xlabel("epoch")
        a2.set_ylim(0, 1.02)
        a2.legend()
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
        plt.close(fig)
    cm = metrics.get("confusion_matrix")
    if cm:
        title = f"confusion matrix ({metrics.get('evaluated_on', '')})"
        confusion_matrix_png(out / "confusion_matrix.png", classes, cm, title)


def confusion_matrix_png(path: Path, classes: list[str], cm: list[list[int]], title: str) -> None:
    """Rows true, columns predicted, counts in the cells; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4 + len(classes) * 0.4, 4 + len(classes) * 0.4))
    ax.imshow(cm, cmap="Blues")
    for i, r in enumerate(cm):
        for j, v in enumerate(r):
            ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
