"""Decision rule and out-of-range flags through a real tiny checkpoint: train -> predict -> evaluate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctsparse.cli.main import app

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

TINY_TRAIN = [
    "model.widths=[8, 16]",
    "model.depths=[1, 1]",
    "preprocess.features=patch",
    "train.batch_size=4",
    "train.warmup_epochs=0",
    "train.epochs=2",
    "train.val_fraction=0.25",
]


@pytest.fixture(scope="module")
def run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for two epochs (its own cache folder: module fixtures run before the
    per-test cache fixture)."""
    from ctsparse.config import load_config
    from ctsparse.training.loop import train

    root = tmp_path_factory.mktemp("evalrun")
    cfg = load_config(None, [*TINY_TRAIN, f"data.cache_dir={root / 'cache'}"])
    train(tiny_dataset, root / "run", cfg, device="cpu")
    return root / "run"


def _with_decision(run: Path, out: Path, **changes: object) -> Path:
    from ctsparse.models.checkpoint import build_from_checkpoint, save_checkpoint

    model, ckpt = build_from_checkpoint(run / "best.pt")
    extra = {**ckpt.extra, "decision": {**ckpt.extra["decision"], **changes}}
    save_checkpoint(out, model, ckpt.config, ckpt.classes, ckpt.in_channels, extra)
    return out


def test_training_stores_the_decision_and_the_ranges(run: Path) -> None:
    from ctsparse.models.checkpoint import load_checkpoint

    extra = load_checkpoint(run / "best.pt").extra
    d = extra["decision"]
    assert d["fitted_on"] == "validation" and d["n"] == 2 and d["positive_class"] == "nodule"
    assert d["temperature"] > 0 and 0 <= d["threshold"] <= 1
    assert {"epoch", "metrics"} <= set(extra)  # the re-save kept the other keys
    ranges = extra["training_ranges"]
    for key in (
        "spacing_x_mm",
        "spacing_z_mm",
        "sites",
        "occupancy",
        "region_ml",
        "hu_p1",
        "hu_p50",
        "hu_p99",
    ):
        assert ranges[key]["n"] == 6 and ranges[key]["min"] <= ranges[key]["max"], key
    assert ranges["spacing_z_mm"]["min"] == pytest.approx(16.0)
    assert json.loads((run / "metrics.json").read_text())["decision"] == pytest.approx(d)


def test_predict_applies_the_stored_temperature_and_threshold(
    run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    from ctsparse.predict import predict

    plain = predict(_with_decision(run, tmp_path / "t1.pt", temperature=1.0, threshold=None), [tiny_dataset],
                    device="cpu")  # fmt: skip
    warm = predict(_with_decision(run, tmp_path / "t2.pt", temperature=2.0, threshold=None), [tiny_dataset],
                   device="cpu")  # fmt: skip
    for a, b in zip(plain, warm, strict=True):
        # softmax(z / 2) from softmax(z): the log-odds halve
        odds = np.log(a["p_nodule"] / a["p_normal"]) / 2
        assert b["p_nodule"] == pytest.approx(1 / (1 + np.exp(-odds)), rel=1e-4)
        assert a["label"] == b["label"]  # argmax does not depend on T
    every = predict(_with_decision(run, tmp_path / "t0.pt", threshold=0.0), [tiny_dataset], device="cpu")
    assert {r["label"] for r in every} == {"nodule"}
    none = predict(_with_decision(run, tmp_path / "t9.pt", threshold=1.5), [tiny_dataset], device="cpu")
    assert {r["label"] for r in none} == {"normal"}
    res = CliRunner().invoke(
        app, ["predict", str(tmp_path / "t0.pt"), str(tiny_dataset), "--device", "cpu", "--out",
              str(tmp_path / "p.json")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "p.json").read_text())["summary"]
    assert summary["decision"]["threshold"] == 0.0 and "p(nodule) >= 0" in summary["threshold"]


def test_predict_flags_a_scan_outside_the_training_ranges(
    run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    import nibabel as nib

    from ctsparse.predict import predict

    src = sorted(tiny_dataset.glob("*.nii.gz"))[0]
    img = nib.load(src)
    # the same voxels with twice the voxel size: another protocol's spacing, 8x the volume
    odd = tmp_path / "odd_spacing.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])), odd)
    train_scans = json.loads((run / "split.json").read_text())["train"]
    rows = predict(run / "best.pt", [odd, *train_scans], device="cpu")
    assert any(w.startswith("spacing_z_mm 32") for w in rows[0]["warnings"]), rows[0]["warnings"]
    assert any(w.startswith("region_ml") for w in rows[0]["warnings"])
    assert all(r["warnings"] == [] for r in rows[1:])  # the training scans are inside their own range
    res = CliRunner().invoke(
        app, ["predict", str(run / "best.pt"), str(odd), "--device", "cpu", "--out", str(tmp_path / "p.csv")]
    )
    assert res.exit_code == 0, res.output
    assert "!" in res.output and "spacing_z_mm" in res.output and "outside the ranges" in res.output
    with open(tmp_path / "p.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert "spacing_z_mm" in row["warnings"]


def test_evaluate_cli_end_to_end_with_a_corrupt_scan(run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with open(data / "labels.csv", "a", newline="") as fh:
        fh.write("bad.nii.gz,nodule\n")
    out = tmp_path / "report"
    res = CliRunner().invoke(
        app, ["evaluate", str(run / "best.pt"), str(data), "--out", str(out), "--json",
              str(tmp_path / "m.json"), "--n-boot", "200", "--device", "cpu"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output  # one scan failed, after everything was written
    for name in ("metrics.json", "per_scan.csv", "roc.png", "calibration.png", "confusion_matrix.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m == json.loads((tmp_path / "m.json").read_text())
    assert (m["n_scans"], m["n_evaluated"], m["n_failed"]) == (9, 8, 1)
    assert "bad.nii.gz" in m["failed"][0]["path"] and m["failed"][0]["error"]
    assert sum(map(sum, m["confusion_matrix"])) == 8
    acc = m["metrics"]["accuracy"]
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    assert {"sensitivity", "specificity", "auroc", "auroc_nodule", "balanced_accuracy"} <= set(m["metrics"])
    assert m["bootstrap"]["n_boot"] == 200 and "stratified" in m["bootstrap"]["method"]
    with open(out / "per_scan.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9
    bad = next(r for r in rows if r["path"].endswith("bad.nii.gz"))
    assert bad["error"] and bad["correct"] == "" and bad["true_label"] == "nodule"
    good = [r for r in rows if not r["error"]]
    assert all(r["correct"] == str(r["true_label"] == r["predicted"]).lower() for r in good)
    assert sum(r["correct"] == "true" for r in good) == round(acc["value"] * 8)
    out_text = " ".join(res.output.split())
    assert "bad.nii.gz" in out_text and "failed" in out_text and "95 % CI" in out_text
    assert "Traceback" not in res.output


def test_evaluate_refuses_labels_the_checkpoint_does_not_know(
    run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    text = (data / "labels.csv").read_text().replace(",nodule", ",tumour")
    (data / "labels.csv").write_text(text)
    res = CliRunner().invoke(app, ["evaluate", str(run / "best.pt"), str(data), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "tumour" in res.output and "not classes of the checkpoint" in res.output
    assert not (tmp_path / "r").exists()


def test_bad_positive_class_is_one_line(tiny_dataset: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        ["train", str(tiny_dataset), "--out", str(tmp_path / "r"), "--set", "train.positive_class=tumour"],
    )
    assert res.exit_code == 1
    assert "train.positive_class" in res.output and "tumour" in res.output and "Traceback" not in res.output
