from __future__ import annotations

import numpy as np
import pytest

from ctsparse.training.metrics import auroc, classification_metrics


def test_auroc_known_values() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5]), np.array([False, True])) == pytest.approx(0.5)
    assert np.isnan(auroc(np.array([0.2, 0.3]), np.array([True, True])))


def test_classification_metrics_imbalanced() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    m = classification_metrics(y, probs, ["normal", "nodule"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m["confusion_matrix"] == [[3, 1], [1, 1]]
    assert m["auroc"] == pytest.approx(m["auroc_per_class"]["nodule"])
