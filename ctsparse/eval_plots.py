"""The PNGs of `ctsparse evaluate`: ROC curves and the reliability diagram, written atomically.

(The confusion matrix is training's plot: ctsparse.training.history.confusion_matrix_png.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctsparse.fileio import atomic_write


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=100)
    _pyplot().close(fig)


def roc_png(
    path: Path,
    y: npt.NDArray[np.int64],
    probs: npt.NDArray[np.float64],
    classes: list[str],
    positive: str | None,
    operating_point: tuple[float, float, float] | None,
    aurocs: dict[str, float],
) -> None:
    """One-vs-rest ROC per class (only the positive class's for a two-class task), with the
    operating threshold's (1 - specificity, sensitivity, threshold) marked."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    shown = [positive] if positive is not None else classes
    for c in shown:
        i = classes.index(c)
        is_c = y == i
        if is_c.all() or not is_c.any():
            continue  # one class only: no curve
        fpr, tpr, _ = roc_curve(is_c, probs[:, i])
        ax.plot(fpr, tpr, label=f"{c} (AUROC {aurocs.get(c, float('nan')):.3f})")
    if operating_point is not None:
        fpr_t, tpr_t, t = operating_point
        ax.plot(fpr_t, tpr_t, "o", color="black", label=f"operating threshold (p >= {t:.3g})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.set_title("ROC")
    fig.tight_layout()
    _save(fig, path)


def reliability_png(path: Path, bins: list[dict[str, float]], ece: float) -> None:
    """Accuracy against mean confidence per bin of top-class confidence, with the bin counts."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    width = bins[0]["hi"] - bins[0]["lo"]
    centres = [b["lo"] + width / 2 for b in bins]
    filled = [b for b in bins if b["n"]]
    ax.bar(
        [b["lo"] + width / 2 for b in filled],
        [b["accuracy"] for b in filled],
        width=width,
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="black",
            label="(mean confidence, accuracy)")  # fmt: skip
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left")
    ax.set_title(f"reliability (ECE {ece:.3f}, {len(bins)} bins)")
    hist.bar(centres, [b["n"] for b in bins], width=width, edgecolor="black", color="grey")
    hist.set_xlabel("top-class confidence")
    hist.set_ylabel("scans")
    hist.set_xlim(0, 1)
    fig.tight_layout()
    _save(fig, path)
