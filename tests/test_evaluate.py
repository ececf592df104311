"""Evaluate metrics, bootstrap intervals and out-of-range flags on tiny fixed examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctsparse.calibration import Decision
from ctsparse.evaluate import bootstrap_indices, metrics_with_ci, per_scan_csv, percentile_ci, point_metrics
from ctsparse.ood import allowed_interval, out_of_range, training_ranges

CLASSES = ["normal", "nodule"]
Y = np.array([0, 0, 0, 1, 1])
P_NODULE = np.array([0.1, 0.4, 0.7, 0.6, 0.9])
PROBS = np.stack([1 - P_NODULE, P_NODULE], axis=1)


def test_point_metrics_by_hand() -> None:
    y_pred = Decision(positive_class="nodule", threshold=0.5).labels(PROBS, CLASSES)
    assert y_pred.tolist() == [0, 0, 1, 1, 1]
    m = point_metrics(Y, PROBS, y_pred, CLASSES, "nodule")
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["sensitivity"] == pytest.approx(1.0)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)
    # positive scores 0.6, 0.9 against 0.1, 0.4, 0.7: 5 of 6 pairs ranked right
    assert m["auroc"] == pytest.approx(5 / 6) and m["auroc_nodule"] == pytest.approx(5 / 6)
    # a stricter threshold moves one positive below it
    strict = Decision(positive_class="nodule", threshold=0.65).labels(PROBS, CLASSES)
    m2 = point_metrics(Y, PROBS, strict, CLASSES, "nodule")
    assert m2["sensitivity"] == pytest.approx(0.5) and m2["specificity"] == pytest.approx(2 / 3)


def test_training_auroc_agrees_with_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    from ctsparse.training.metrics import auroc

    rng = np.random.default_rng(4)
    scores = np.round(rng.random(300), 2)  # many ties
    positive = rng.random(300) < 0.3
    assert auroc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))


def test_stratified_bootstrap_keeps_class_counts_and_brackets_the_value() -> None:
    idx = bootstrap_indices(Y, 50, np.random.default_rng(0))
    assert idx.shape == (50, 5)
    assert np.all((Y[idx] == 1).sum(axis=1) == 2)  # every resample keeps both positives' count
    y_pred = Decision(positive_class="nodule", threshold=0.5).labels(PROBS, CLASSES)
    m = metrics_with_ci(Y, PROBS, y_pred, CLASSES, "nodule", 300, np.random.default_rng(0))
    for k, v in m.items():
        assert v["ci_low"] <= v["value"] + 1e-12 and v["value"] <= v["ci_high"] + 1e-12, k
    # both positives are always above the threshold: no uncertainty left in the sensitivity
    assert (m["sensitivity"]["ci_low"], m["sensitivity"]["ci_high"]) == (1.0, 1.0)
    assert m["specificity"]["ci_low"] < m["specificity"]["ci_high"]
    again = metrics_with_ci(Y, PROBS, y_pred, CLASSES, "nodule", 300, np.random.default_rng(0))
    assert again == m  # seeded


def test_bootstrap_ci_covers_the_true_accuracy_about_95_percent_of_the_time() -> None:
    """Datasets of 120 + 80 scans whose classes are right with probability 0.9 and 0.7: the true
    accuracy at these class counts is 0.82. The 95 % interval should cover it ~95 % of the time."""
    rng = np.random.default_rng(11)
    y = np.repeat([0, 1], [120, 80])
    truth = (120 * 0.9 + 80 * 0.7) / 200
    sims, covered = 300, 0
    for _ in range(sims):
        correct = rng.random(200) < np.where(y == 0, 0.9, 0.7)
        lo, hi = percentile_ci(correct[bootstrap_indices(y, 500, rng)].mean(axis=1))
        covered += lo <= truth <= hi
    assert 0.88 <= covered / sims <= 0.99, covered / sims


def test_per_scan_csv_lists_errors_and_warnings() -> None:
    rows = [
        {"path": "a.nii.gz", "true_label": "normal", "label": "normal", "p_normal": 0.8, "p_nodule": 0.2,
         "correct": True, "warnings": ["sites 10 outside training range 100..200"], "error": None},
        {"path": "bad.nii.gz", "true_label": "nodule", "correct": None, "warnings": [],
         "error": "bad: truncated"},
    ]  # fmt: skip
    lines = per_scan_csv(rows, CLASSES).splitlines()
    assert lines[0] == "path,true_label,predicted,p_normal,p_nodule,correct,warnings,error"
    assert lines[1] == "a.nii.gz,normal,normal,0.8,0.2,true,sites 10 outside training range 100..200,"
    assert lines[2] == "bad.nii.gz,nodule,,,,,,bad: truncated"


def test_out_of_range_flags_only_what_is_outside_the_widened_range() -> None:
    ranges = training_ranges(
        [{"sites": 1000.0, "hu_p50": 20.0, "spacing_z_mm": 1.0}, {"sites": 2000.0, "hu_p50": 40.0}]
    )
    assert ranges["sites"] == {"min": 1000.0, "max": 2000.0, "n": 2}
    assert ranges["spacing_z_mm"]["n"] == 1
    assert allowed_interval("sites", ranges["sites"]) == pytest.approx((600.0, 2400.0))  # 20 % of 2000
    assert allowed_interval("hu_p50", ranges["hu_p50"]) == pytest.approx((-80.0, 140.0))  # 100 HU
    assert out_of_range({"sites": 2300.0, "hu_p50": 100.0, "spacing_z_mm": 1.1}, ranges) == []
    flags = out_of_range({"sites": 2500.0, "hu_p50": 1064.0, "spacing_z_mm": 5.0, "occupancy": 0.5}, ranges)
    assert [f.split()[0] for f in flags] == ["spacing_z_mm", "sites", "hu_p50"]
    assert out_of_range({"sites": 1e9}, None) == []  # an old checkpoint: nothing to compare with
    many = training_ranges([{"sites": float(v)} for v in range(200)])
    assert many["sites"]["p1"] == pytest.approx(1.99) and many["sites"]["p99"] == pytest.approx(197.01)


def test_sparsify_records_what_the_range_check_needs(tmp_path: Path) -> None:
    """The scan's own spacing (also when resampling keeps the grid size), the HU percentiles of the
    kept voxels and their volume."""
    import nibabel as nib

    from ctsparse.config import PreprocessConfig
    from ctsparse.io import read_volume
    from ctsparse.sparsify import sparsify

    hu = np.full((32, 32, 20), -1000.0, dtype=np.float32)
    hu[8:24, 8:24, 5:15] = np.linspace(0.0, 99.0, 16 * 16 * 10).reshape(16, 16, 10)  # 0..99 HU
    path = tmp_path / "block.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([10.0, 10.0, 16.0, 1.0])), path)
    cfg = PreprocessConfig(features="hu")
    sv = sparsify(read_volume(path), cfg)
    assert sv.stats["spacing_in"] == [10.0, 10.0, 16.0]
    assert sv.stats["hu_p50"] == pytest.approx(49.5, abs=0.1)
    assert sv.stats["hu_p1"] == pytest.approx(0.99, abs=0.1) and sv.stats["hu_p99"] == pytest.approx(
        98.0, abs=0.1
    )
    assert sv.stats["region_ml"] == pytest.approx(16 * 16 * 10 * 10 * 10 * 16 / 1000)
    # 9.9 mm over 32 voxels is still 32 voxels: the scan's own 10 mm is what the check must see
    cfg = PreprocessConfig(spacing=[9.9, 9.9, 15.9], features="hu")
    resampled = sparsify(read_volume(path, spacing=cfg.spacing), cfg)
    assert resampled.spacing == pytest.approx((9.9, 9.9, 15.9))
    assert resampled.stats["spacing_in"] == pytest.approx([10.0, 10.0, 16.0])
