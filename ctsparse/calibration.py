"""The decision rule: temperature scaling, the operating threshold of a two-class task, and ECE.

Fitted once, at the end of training, on the validation split (`fit_decision`), stored in best.pt
as plain data, and applied by predict and evaluate (`Decision.probabilities`, `Decision.labels`).

>>> d = Decision(temperature=2.0, positive_class="nodule", threshold=0.3, rule="youden")
>>> d.labels(d.probabilities(np.array([[1.0, 0.0]])), ["normal", "nodule"])
array([1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ctsparse.errors import ConfigError

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

# Class names that mean "nothing found": the other class of a two-class task is the positive one.
NORMAL_LIKE = frozenset(
    {"normal", "negative", "healthy", "control", "benign", "no", "none", "absent", "0", "false"}
)
ECE_BINS = 15
# log T is searched in [log 1/20, log 20]: beyond that a model is so far off that a temperature
# is not the fix, and the bound keeps a near-separable validation set from driving T to 0.
_LOG_T_BOUND = math.log(20.0)


@dataclass(frozen=True)
class Decision:
    """How logits become probabilities (softmax(logits / T)) and a label.

    threshold: on the positive class's calibrated probability (label = positive iff p >= it);
    None means argmax (more than two classes, or an old checkpoint without a fitted rule).
    """

    temperature: float = 1.0
    positive_class: str | None = None
    threshold: float | None = None
    rule: str = "argmax"
    fitted_on: str = "none"
    n: int = 0
    ece_before: float | None = None
    ece_after: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Decision:
        """The stored rule, or the plain argmax rule when there is none (old checkpoints)."""
        if not d:
            return cls()
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def describe(self) -> str:
        """One line for reports, e.g. "p(nodule) >= 0.412 (youden on validation, n=24), T=1.31"."""
        fitted = f" on {self.fitted_on}, n={self.n}" if self.fitted_on != "none" else ""
        rule = (
            f"p({self.positive_class}) >= {self.threshold:.3g} ({self.rule}{fitted})"
            if self.threshold is not None
            else f"argmax{f' ({fitted.strip()})' if fitted else ''}"
        )
        return f"{rule}, T={self.temperature:.3g}" + (f"; {self.note}" if self.note else "")

    def probabilities(self, logits: npt.ArrayLike) -> F64:
        return softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def labels(self, probs: F64, classes: Sequence[str]) -> I64:
        """Class index per row: the threshold on the positive class when there is one, else argmax."""
        if self.threshold is None or self.positive_class is None or len(classes) != 2:
            return np.asarray(probs.argmax(axis=1), dtype=np.int64)
        if self.positive_class not in classes:
            return np.asarray(probs.argmax(axis=1), dtype=np.int64)
        pos = list(classes).index(self.positive_class)
        return np.where(probs[:, pos] >= self.threshold, pos, 1 - pos).astype(np.int64)


def softmax(z: F64) -> F64:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: F64 = e / e.sum(axis=1, keepdims=True)
    return out


def _nll(logits: F64, y: I64, temperature: float) -> float:
    from scipy.special import logsumexp

    z = logits / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(logits: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """The T > 0 that minimises the mean NLL of softmax(logits / T) (Guo et al. 2017).

    The NLL is convex in 1/T, so a bounded scalar search on log T finds its minimum. When every
    scan is classified correctly the NLL keeps falling as T -> 0 and has no minimum; the search
    then stops at the bound (1/20), and `fit_decision` keeps T = 1 instead.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64)
    res = minimize_scalar(
        lambda log_t: _nll(z, labels, math.exp(log_t)),
        bounds=(-_LOG_T_BOUND, _LOG_T_BOUND),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(res.x))


def choose_threshold(
    scores: npt.ArrayLike, positive: npt.ArrayLike, target_sensitivity: float | None = None
) -> tuple[float, str]:
    """Operating threshold on a positive-class score: label positive iff score >= threshold.

    Youden's J (max sensitivity + specificity - 1) by default. On a small validation set a whole
    range of thresholds reaches the best J (all of the gap between two separated classes, say), and
    which of them is taken decides the errors on new scans. The rule takes, in logit space, the
    point where the two classes' scores are equally many of their own standard deviations away
    (`_balanced_logit`): next to a tight class and far from a spread one, as the spread class's
    unseen scans need. When that point itself falls outside the best-J range, the middle of the
    nearest best-J interval is taken instead.

    With target_sensitivity, the highest threshold whose sensitivity reaches it (the best
    specificity at that sensitivity), i.e. where sensitivity first reaches the target as the
    threshold is lowered, put halfway between the cut-off score and the next lower score, so the
    validation confusion matrix is the one chosen, with a margin on both sides.

    Returns:
        (threshold, rule name for reports: "youden" or "sensitivity>=0.9").
    """
    from sklearn.metrics import roc_curve

    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if pos.all() or not pos.any():
        raise ValueError("an operating threshold needs scans of both classes")
    fpr, tpr, thr = roc_curve(pos, s, drop_intermediate=False)  # thr[0] is +inf: nothing positive
    if target_sensitivity is None:
        j = tpr - fpr
        best = [i for i in range(1, len(thr)) if j[i] >= j[1:].max() - 1e-12]
        return _within_best(thr, best, _balanced_logit(_logit(s[pos]), _logit(s[~pos]))), "youden"
    i = max(int(np.argmax(tpr >= target_sensitivity - 1e-12)), 1)
    cut = float(thr[i])
    rule = f"sensitivity>={target_sensitivity:g}"
    return (cut + float(thr[i + 1])) / 2 if i + 1 < len(thr) else cut, rule


def _logit(p: npt.ArrayLike) -> F64:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.asarray(np.log(q) - np.log1p(-q), dtype=np.float64)


def _balanced_logit(z_pos: F64, z_neg: F64) -> float:
    """The logit z between the two classes' means with (z - mean_neg) / sd_neg equal to
    (mean_pos - z) / sd_pos: each class's scores are equally many of their own standard
    deviations from it (the midpoint of the means when both spreads are 0)."""
    m1, m0 = float(z_pos.mean()), float(z_neg.mean())
    s1 = float(z_pos.std(ddof=1)) if len(z_pos) > 1 else 0.0
    s0 = float(z_neg.std(ddof=1)) if len(z_neg) > 1 else 0.0
    return (m0 + m1) / 2 if s0 + s1 == 0 else m0 + (m1 - m0) * s0 / (s0 + s1)


def _within_best(thr: F64, best: list[int], z: float) -> float:
    """The threshold (a probability) for Youden's J: `z` (a logit) when it lies in one of the
    intervals of thresholds that give a best cut-off i, (thr[i + 1], thr[i]]; else the middle, in
    logit space, of the interval nearest to it."""
    nearest: tuple[float, float] | None = None
    for i in best:
        hi = float(_logit(thr[i]))
        lo = float(_logit(thr[i + 1])) if i + 1 < len(thr) else -math.inf
        if lo < z <= hi:
            return _sigmoid(z)
        mid = (lo + hi) / 2 if math.isfinite(lo) else hi
        if nearest is None or abs(mid - z) < nearest[0]:
            nearest = (abs(mid - z), mid)
    assert nearest is not None  # best is never empty: J has a maximum
    return _sigmoid(nearest[1])


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))  # |z| <= 28: _logit clips probabilities at 1e-12


def reliability_bins(probs: F64, y: I64, n_bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width bins of the top-class confidence: count, mean confidence, accuracy per bin.

    Binned like sklearn.calibration.calibration_curve(strategy="uniform"), which returns no counts
    (ECE needs them). Empty bins are kept with count 0 so plots show the whole [0, 1] range.
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf)
    n = np.bincount(ids, minlength=n_bins)
    conf_sum = np.bincount(ids, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(ids, weights=correct, minlength=n_bins)
    return [
        {
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "n": int(n[b]),
            "confidence": float(conf_sum[b] / n[b]) if n[b] else float("nan"),
            "accuracy": float(acc_sum[b] / n[b]) if n[b] else float("nan"),
        }
        for b in range(n_bins)
    ]


def expected_calibration_error(probs: F64, y: I64, n_bins: int = ECE_BINS) -> float:
    """Sum over bins of (bin share) x |accuracy - mean confidence|, top-class confidence."""
    total = len(y)
    if total == 0:
        return float("nan")
    bins = reliability_bins(probs, y, n_bins)
    return float(sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"]))


def positive_class(classes: Sequence[str], configured: str | None) -> str | None:
    """The positive class of a two-class task (None for more classes).

    train.positive_class when set; else the other class when exactly one name is normal-like
    ("normal", "negative", "healthy", ...); else the second class in sorted order.
    """
    if configured is not None:
        if configured not in classes:
            raise ConfigError(
                "train.positive_class",
                f"'{configured}' is not a class of this dataset ({', '.join(classes)})",
            )
        return configured if len(classes) == 2 else None
    if len(classes) != 2:
        return None
    normal = [c for c in classes if c.strip().lower() in NORMAL_LIKE]
    if len(normal) == 1:
        return next(c for c in classes if c != normal[0])
    return sorted(classes)[1]


def fit_decision(
    logits: npt.ArrayLike,
    y: npt.ArrayLike,
    classes: Sequence[str],
    *,
    positive: str | None,
    target_sensitivity: float | None,
    fitted_on: str,
) -> Decision:
    """Temperature, then (two classes) the threshold on the calibrated positive probability."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1, len(classes))
    labels = np.asarray(y, dtype=np.int64)
    before = expected_calibration_error(softmax(z), labels)
    notes = []
    if len(labels) == 0:
        return Decision(positive_class=positive, note="no scans to fit on: T = 1, argmax")
    if np.all(z.argmax(axis=1) == labels):
        t, notes = 1.0, ["every scan is classified correctly, so no finite T minimises the NLL: T = 1"]
    else:
        t = fit_temperature(z, labels)
    probs = softmax(z / t)
    threshold, rule = None, "argmax"
    if positive is not None:
        pos = list(classes).index(positive)
        is_pos = labels == pos
        if is_pos.all() or not is_pos.any():
            threshold, rule = 0.5, "argmax"
            notes.append(f"{fitted_on} holds one class only: threshold 0.5 (argmax)")
        else:
            threshold, rule = choose_threshold(probs[:, pos], is_pos, target_sensitivity)
    return Decision(
        temperature=t,
        positive_class=positive,
        threshold=threshold,
        rule=rule,
        fitted_on=fitted_on,
        n=len(labels),
        ece_before=before,
        ece_after=expected_calibration_error(probs, labels),
        note="; ".join(notes),
    )
