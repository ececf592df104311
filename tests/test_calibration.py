"""Temperature scaling, operating thresholds, ECE and the positive-class rule on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from ctsparse.calibration import (
    Decision,
    choose_threshold,
    expected_calibration_error,
    fit_decision,
    fit_temperature,
    positive_class,
    reliability_bins,
    softmax,
)
from ctsparse.config import load_config
from ctsparse.errors import ConfigError


def test_temperature_recovers_a_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, size=(20000, 3))
    # labels drawn from the calibrated probabilities, then the logits shown 3x too sharp
    p = softmax(true_logits)
    y = (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    assert fit_temperature(3.0 * true_logits, y) == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(0.5 * true_logits, y) == pytest.approx(0.5, rel=0.05)
    assert fit_temperature(true_logits, y) == pytest.approx(1.0, rel=0.05)


def test_youden_threshold_lies_between_separable_classes() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    positive = np.array([False, False, False, True, True, True])
    t, rule = choose_threshold(scores, positive)
    assert rule == "youden"
    assert 0.3 < t < 0.6
    # every threshold in (0.3, 0.6] separates them; the one taken lies, in logit space, equally
    # many of each class's own standard deviations from its mean
    z = np.log(scores / (1 - scores))
    m0, m1 = z[:3].mean(), z[3:].mean()
    s0, s1 = z[:3].std(ddof=1), z[3:].std(ddof=1)
    assert (np.log(t / (1 - t)) - m0) / s0 == pytest.approx((m1 - np.log(t / (1 - t))) / s1)
    assert t == pytest.approx(0.4085, abs=1e-4)


def test_youden_threshold_sits_next_to_the_tight_class() -> None:
    """Separated classes, the negatives tight and the positives spread: the threshold moves
    towards the negatives, where the spread class's unseen scans can still fall above it."""
    neg = np.array([0.10, 0.11, 0.12, 0.13])
    pos = np.array([0.5, 0.8, 0.95, 0.99, 0.999])
    scores = np.concatenate([neg, pos])
    is_pos = np.arange(len(scores)) >= len(neg)
    t, _ = choose_threshold(scores, is_pos)
    assert 0.13 < t < 0.5
    assert np.log(t / (1 - t)) < (np.log(0.13 / 0.87) + np.log(0.5 / 0.5)) / 2  # below the logit midpoint
    # the mirror case moves it towards the positives
    t2, _ = choose_threshold(1 - scores, ~is_pos)
    assert t2 == pytest.approx(1 - t)


def test_youden_threshold_outside_the_balanced_point_takes_the_middle_of_the_nearest_best_interval() -> None:
    """Two ranges of thresholds tie on the best J, and the balanced logit falls in the worse range
    between them: the threshold is the middle, in logit space, of the best-J interval nearest it."""
    neg = np.array([0.1, 0.2, 0.3, 0.35])
    pos = np.array([0.32, 0.4, 0.45, 0.5])
    scores = np.concatenate([neg, pos])
    is_pos = np.arange(len(scores)) >= len(neg)
    # (0.3, 0.32]: all positives, one false positive; (0.35, 0.4]: three positives, none false;
    # both J = 0.75. In (0.32, 0.35] J = 0.5, and the balanced logit lies there
    z = np.log(scores / (1 - scores))
    m0, m1, s0, s1 = z[:4].mean(), z[4:].mean(), z[:4].std(ddof=1), z[4:].std(ddof=1)
    balanced = 1 / (1 + np.exp(-(m0 + (m1 - m0) * s0 / (s0 + s1))))
    assert 0.32 < balanced <= 0.35
    t, _ = choose_threshold(scores, is_pos)
    logit = np.log(np.array([0.35, 0.4]) / (1 - np.array([0.35, 0.4])))
    assert t == pytest.approx(1 / (1 + np.exp(-logit.mean())))  # the nearer interval, (0.35, 0.4]
    assert np.mean(pos >= t) == 0.75 and np.mean(neg >= t) == 0.0


def test_target_sensitivity_picks_the_highest_threshold_that_reaches_it() -> None:
    pos = np.array([0.2, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99])
    neg = np.array([0.1, 0.3, 0.4, 0.45, 0.55, 0.65, 0.75, 0.85])
    scores = np.concatenate([pos, neg])
    is_pos = np.arange(len(scores)) < len(pos)
    t, rule = choose_threshold(scores, is_pos, target_sensitivity=0.9)
    assert rule == "sensitivity>=0.9"
    assert np.mean(pos >= t) >= 0.9  # reaches the target ...
    assert np.mean(pos >= 0.5 + 1e-9) < 0.9  # ... and any higher cut-off would not
    assert t == pytest.approx((0.5 + 0.45) / 2)
    t_all, _ = choose_threshold(scores, is_pos, target_sensitivity=1.0)
    assert t_all == pytest.approx((0.2 + 0.1) / 2) and np.all(pos >= t_all)
    # Youden on the same scores gives a higher threshold than sensitivity 1.0 does
    assert choose_threshold(scores, is_pos)[0] > t_all


def test_decision_applies_temperature_then_threshold() -> None:
    d = Decision(temperature=2.0, positive_class="nodule", threshold=0.3, rule="youden")
    logits = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    probs = d.probabilities(logits)
    assert probs[0, 1] == pytest.approx(1 / (1 + np.exp(0.5)))  # softmax of logits / 2
    # p(nodule) = 0.378 >= 0.3 -> nodule although argmax says normal; 0.182 -> normal
    assert d.labels(probs, ["normal", "nodule"]).tolist() == [1, 0, 1]
    assert Decision.from_dict(None).labels(probs, ["normal", "nodule"]).tolist() == [0, 0, 1]
    assert Decision.from_dict(d.to_dict()) == d
    assert "p(nodule) >= 0.3" in d.describe() and "T=2" in d.describe()


def test_fit_decision_on_validation_logits() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 2000)
    # x = 4 (y - 1/2) + N(0, 2^2) is exactly the log-odds of y; shown 3x too sharp
    x = 4.0 * (y - 0.5) + rng.normal(0, 2.0, len(y))
    logits = np.stack([np.zeros(len(y)), 3.0 * x], axis=1)
    d = fit_decision(
        logits, y, ["normal", "nodule"], positive="nodule", target_sensitivity=None, fitted_on="validation"
    )
    assert d.positive_class == "nodule" and d.rule == "youden" and d.n == 4000
    assert d.temperature == pytest.approx(3.0, rel=0.1)
    assert d.ece_after is not None and d.ece_before is not None and d.ece_after < d.ece_before
    assert d.threshold is not None and 0.0 < d.threshold < 1.0
    # every scan right: no finite temperature minimises the NLL, so T stays 1 and it says why
    sep = fit_decision(
        np.array([[2.0, 0.0], [0.0, 2.0]]), [0, 1], ["a", "b"], positive="b", target_sensitivity=None,
        fitted_on="validation",
    )  # fmt: skip
    assert sep.temperature == 1.0 and "no finite T" in sep.note


def test_ece_on_a_hand_computed_example() -> None:
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.28, 0.72], [0.62, 0.38]])
    y = np.array([0, 1, 1, 0])  # correct, wrong, correct, correct; four different bins
    assert expected_calibration_error(probs, y) == pytest.approx((0.05 + 0.85 + 0.28 + 0.38) / 4)
    bins = reliability_bins(probs, y)
    assert len(bins) == 15 and sum(b["n"] for b in bins) == 4


def test_reliability_bins_match_sklearn_calibration_curve() -> None:
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(2)
    probs = softmax(rng.normal(0, 2, size=(500, 2)))
    y = rng.integers(0, 2, 500)
    bins = [b for b in reliability_bins(probs, y) if b["n"]]
    correct = probs.argmax(1) == y
    acc, conf = calibration_curve(correct, probs.max(1), n_bins=15, strategy="uniform")
    assert np.allclose([b["accuracy"] for b in bins], acc)
    assert np.allclose([b["confidence"] for b in bins], conf)


@pytest.mark.parametrize(
    ("classes", "configured", "expected"),
    [
        (["normal", "nodule"], None, "nodule"),
        (["abnormal", "Healthy"], None, "abnormal"),
        (["0", "1"], None, "1"),
        (["cat", "dog"], None, "dog"),  # nothing normal-like: the second in sorted order
        (["normal", "nodule"], "normal", "normal"),
        (["a", "b", "c"], None, None),  # more than two classes: argmax, no positive class
    ],
)
def test_positive_class_rule(classes: list[str], configured: str | None, expected: str | None) -> None:
    assert positive_class(classes, configured) == expected


def test_positive_class_and_target_sensitivity_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"train\.positive_class"):
        positive_class(["normal", "nodule"], "tumour")
    with pytest.raises(ConfigError, match=r"train\.target_sensitivity"):
        load_config(None, ["train.target_sensitivity=1.5"])
    assert load_config(None, ["train.target_sensitivity=0.9"]).train.target_sensitivity == 0.9
