"""Checkpoint + labelled scans -> metrics with bootstrap 95 % CIs, at the stored operating threshold.

Scans go through `ctsparse.predict.predict`, so evaluate sees exactly what predict answers:
calibrated probabilities, the checkpoint's decision rule, out-of-range warnings. A scan that fails
becomes an error row: listed, counted (n_failed), never dropped silently; the metrics are over
the scans that were predicted.

Confidence intervals: stratified percentile bootstrap. Each resample draws scans with replacement
within each true class, so it keeps the class counts of the data: balanced accuracy, sensitivity
and AUROC stay defined in every resample even with a handful of positives, where a plain
resample (and so scipy.stats.bootstrap's BCa, which cannot stratify) would sometimes draw none.
The interval is the 2.5th..97.5th percentile of the resampled values.

Outputs (OUT, default runs/evaluate/<run folder>-<dataset name>): metrics.json, per_scan.csv,
roc.png, calibration.png, confusion_matrix.png, each written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctsparse.calibration import Decision, expected_calibration_error, positive_class, reliability_bins
from ctsparse.errors import DatasetError
from ctsparse.fileio import atomic_write_text
from ctsparse.training.metrics import classification_metrics

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
LEVEL = 0.95
BOOT_METHOD = (
    "stratified percentile bootstrap: scans resampled with replacement within each true class, "
    "2.5th..97.5th percentiles"
)


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # the content of metrics.json
    rows: list[dict[str, Any]]  # one per scan, in dataset order, with true label and correctness
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def default_out_dir(checkpoint: str | Path, data: str | Path) -> Path:
    run = Path(checkpoint).resolve().parent.name or "run"
    d = Path(data).resolve()
    return Path("runs") / "evaluate" / f"{run}-{d.stem if d.is_file() else d.name}"


def bootstrap_indices(y: I64, n_boot: int, rng: np.random.Generator) -> I64:
    """(n_boot, len(y)) indices; resample b draws, within each class, as many scans as it has."""
    out = np.empty((n_boot, len(y)), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        out[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    return out


def percentile_ci(values: npt.ArrayLike, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of the bootstrap values (NaN resamples ignored)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def point_metrics(
    y: I64, probs: F64, y_pred: I64, classes: list[str], positive: str | None
) -> dict[str, float]:
    """Flat metrics of one set of scans: accuracy, balanced accuracy, AUROC (macro and per class),
    and with a positive class, sensitivity and specificity of y_pred."""
    m = classification_metrics(y, probs, classes, y_pred=y_pred)
    out = {k: float(m[k]) for k in ("accuracy", "balanced_accuracy", "auroc")}
    out.update({f"auroc_{c}": float(v) for c, v in m["auroc_per_class"].items()})
    if positive is not None:
        cm = np.asarray(m["confusion_matrix"])
        p = classes.index(positive)
        n = 1 - p
        out["sensitivity"] = float(cm[p, p] / cm[p].sum()) if cm[p].sum() else float("nan")
        out["specificity"] = float(cm[n, n] / cm[n].sum()) if cm[n].sum() else float("nan")
    return out


def metrics_with_ci(
    y: I64,
    probs: F64,
    y_pred: I64,
    classes: list[str],
    positive: str | None,
    n_boot: int,
    rng: np.random.Generator,
) -> dict[str, dict[str, float]]:
    """{metric: {"value", "ci_low", "ci_high"}} with stratified percentile bootstrap intervals."""
    point = point_metrics(y, probs, y_pred, classes, positive)
    boot: dict[str, list[float]] = {k: [] for k in point}
    if len(y) and n_boot > 0:
        for idx in bootstrap_indices(y, n_boot, rng):
            for k, v in point_metrics(y[idx], probs[idx], y_pred[idx], classes, positive).items():
                boot[k].append(v)
    out = {}
    for k, v in point.items():
        lo, hi = percentile_ci(boot[k]) if boot[k] else (float("nan"), float("nan"))
        out[k] = {"value": v, "ci_low": lo, "ci_high": hi}
    return out


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    *,
    out_dir: str | Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 1,
    series_uid: str | None = None,
    workers: int = 0,
    allow_non_ct: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> Evaluation:
    """Predict every scan of a labelled dataset, score the predictions, write the report files.

    A dataset with a `test` split (labels.csv split column, datalist "test") is evaluated on that
    split only, so training scans listed beside it are never scored by accident.
    """
    from ctsparse.data.datasets import discover_dataset
    from ctsparse.predict import predict

    samples = discover_dataset(data)
    scope = "all scans"
    if any(s.split == "test" for s in samples):
        samples, scope = [s for s in samples if s.split == "test"], "the test split"
    started: dict[str, Any] = {}

    def check_labels(info: dict[str, Any]) -> None:
        unknown = sorted({s.label for s in samples} - set(info["classes"]))
        if unknown:
            raise DatasetError(
                data,
                f"labels {', '.join(unknown)} are not classes of the checkpoint "
                f"({', '.join(info['classes'])})",
            )
        started.update(info)

    rows = predict(
        checkpoint,
        [s.path for s in samples],
        device=device,
        batch_size=batch_size,
        series_uid=series_uid,
        on_row=on_row,
        workers=workers,
        on_start=check_labels,
        expand=False,  # one row per labelled sample, read as training read it
        allow_non_ct=allow_non_ct,
    )
    classes: list[str] = started["classes"]
    decision: Decision = started["decision"]
    positive = decision.positive_class or positive_class(classes, None)
    for s, r in zip(samples, rows, strict=True):
        r["true_label"] = s.label
        r["correct"] = None if r["error"] else r["label"] == s.label
    ok = [r for r in rows if not r["error"]]
    y = np.array([classes.index(r["true_label"]) for r in ok], dtype=np.int64)
    probs = np.array([[r[f"p_{c}"] for c in classes] for r in ok], dtype=np.float64).reshape(-1, len(classes))
    y_pred = np.array([classes.index(r["label"]) for r in ok], dtype=np.int64)
    scored = metrics_with_ci(y, probs, y_pred, classes, positive, n_boot, np.random.default_rng(seed))
    failed = [{"path": r["path"], "error": r["error"]} for r in rows if r["error"]]
    bins = reliability_bins(probs, y)
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "scans": scope,
        "classes": classes,
        "n_scans": len(rows),
        "n_evaluated": len(ok),
        "n_failed": len(failed),
        "metrics_over": f"the {len(ok)} scan(s) predicted; {len(failed)} failed scan(s) excluded",
        "failed": failed,
        "n_out_of_range": sum(bool(r["warnings"]) for r in ok),
        "label_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "threshold": decision.describe(),
        "decision": decision.to_dict(),
        "positive_class": positive,
        "metrics": scored,
        "confusion_matrix": classification_metrics(y, probs, classes, y_pred=y_pred)["confusion_matrix"],
        "confusion_matrix_axes": "rows true, columns predicted, in the order of classes",
        "ece": expected_calibration_error(probs, y),
        "reliability": bins,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": LEVEL, "method": BOOT_METHOD},
    }
    out = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint, data)
    result = Evaluation(metrics, rows, out)
    _write(result, y, probs, positive)
    return result


def _write(ev: Evaluation, y: I64, probs: F64, positive: str | None) -> None:
    from ctsparse.eval_plots import reliability_png, roc_png
    from ctsparse.training.history import confusion_matrix_png

    m, out = ev.metrics, ev.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(plain(m), indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / "per_scan.csv", per_scan_csv(ev.rows, m["classes"]))
    ev.files += [out / "metrics.json", out / "per_scan.csv"]
    if len(y):
        scored = m["metrics"]
        op = None
        if "sensitivity" in scored and m["decision"]["threshold"] is not None:
            op = (
                1 - scored["specificity"]["value"],
                scored["sensitivity"]["value"],
                m["decision"]["threshold"],
            )
        aurocs = {c: scored[f"auroc_{c}"]["value"] for c in m["classes"]}
        roc_png(out / "roc.png", y, probs, m["classes"], positive, op, aurocs)
        reliability_png(out / "calibration.png", m["reliability"], m["ece"])
        confusion_matrix_png(
            out / "confusion_matrix.png",
            m["classes"],
            m["confusion_matrix"],
            f"confusion matrix ({len(y)} scans)",
        )
        ev.files += [out / "roc.png", out / "calibration.png", out / "confusion_matrix.png"]


def per_scan_csv(rows: list[dict[str, Any]], classes: list[str]) -> str:
    cols = ["path", "true_label", "predicted", *[f"p_{c}" for c in classes], "correct", "warnings", "error"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        probs = [f"{r[f'p_{c}']:.6g}" if f"p_{c}" in r else "" for c in classes]
        correct = "" if r["correct"] is None else str(r["correct"]).lower()
        w.writerow(
            [r["path"], r["true_label"], r.get("label", ""), *probs, correct, "; ".join(r["warnings"]),
             r["error"] or ""]
        )  # fmt: skip
    return buf.getvalue()


def plain(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
