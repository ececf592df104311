"""Classification metrics in numpy: accuracy, balanced accuracy, per-class and macro AUROC."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def confusion_matrix(
    y_true: npt.NDArray[np.int64], y_pred: npt.NDArray[np.int64], n: int
) -> npt.NDArray[np.int64]:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def auroc(scores: npt.NDArray[np.float64], positive: npt.NDArray[np.bool_]) -> float:
    """Mann-Whitney AUROC with average ranks for ties; NaN when a class is absent."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average rank of each tie group
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(
    y_true: npt.NDArray[np.int64],
    probs: npt.NDArray[np.float64],
    classes: list[str],
    y_pred: npt.NDArray[np.int64] | None = None,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy and the confusion matrix of y_pred (default: argmax of probs),
    AUROC of probs."""
    n = len(classes)
    y_pred = probs.argmax(axis=1) if y_pred is None else y_pred
    cm = confusion_matrix(y_true, y_pred, n)
    support = cm.sum(axis=1)
    recall = np.divide(np.diag(cm), support, out=np.full(n, np.nan), where=support > 0)
    per_class_auc = {c: auroc(probs[:, i], y_true == i) for i, c in enumerate(classes)}
    finite = [v for v in per_class_auc.values() if np.isfinite(v)]
    if n == 2:  # one-vs-rest AUROCs of two classes are equal; macro is that value
        finite = finite[:1]
    return {
        "n": len(y_true),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "balanced_accuracy": float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan"),
        "auroc": float(np.mean(finite)) if finite else float("nan"),
        "auroc_per_class": per_class_auc,
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }
