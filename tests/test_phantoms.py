"""Synthetic chest phantoms: anatomy in HU, determinism, labels, files on disk, and no label leak."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import typer
from scipy import ndimage as ndi
from typer.testing import CliRunner

from ctsparse.data.phantoms import (
    CLASSES,
    case_rng,
    generate_phantoms,
    make_phantom,
    phantom_labels,
)

SMALL = {"shape": (48, 48, 32), "spacing": (7.3, 7.3, 10.0)}


def test_default_phantom_geometry_and_tissues() -> None:
    vol = make_phantom("normal", np.random.default_rng(0), source="phantom:0/0")
    a = vol.array
    assert vol.shape == (96, 96, 64) and a.dtype == np.float32
    np.testing.assert_allclose(vol.spacing, (3.65, 3.65, 5.0))
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag(vol.spacing))
    # centred on the world origin
    np.testing.assert_allclose(
        vol.affine[:3, :3] @ (np.array(vol.shape) - 1) / 2 + vol.affine[:3, 3], 0, atol=1e-9
    )
    assert vol.source == "phantom:0/0" and vol.meta["format"] == "phantom" and vol.meta["label"] == "normal"
    assert "nodule_center_mm" not in vol.meta
    assert a.min() >= -1024 and a.max() <= 3071
    assert abs(np.median(a[:5, -5:, :]) + 1000) < 30  # room air in a corner
    frac = lambda lo, hi: np.mean((a >= lo) & (a < hi))  # noqa: E731
    assert frac(-950, -700) > 0.05  # lung parenchyma
    assert frac(-150, -60) > 0.01  # fat
    assert frac(0, 100) > 0.05  # muscle, mediastinum, liver
    assert frac(300, 3071) > 0.001  # spine and ribs


def test_same_seed_same_scan_different_seed_different() -> None:
    a = make_phantom("nodule", case_rng(3, 1), **SMALL).array
    b = make_phantom("nodule", case_rng(3, 1), **SMALL).array
    c = make_phantom("nodule", case_rng(3, 2), **SMALL).array
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or np.abs(a - c).mean() > 10


@pytest.mark.parametrize("index", range(4))
def test_nodule_is_local_and_inside_a_lung(index: int) -> None:
    """One generator gives one patient; the nodule label only adds the nodule, inside lung tissue."""
    normal = make_phantom("normal", case_rng(5, index), nodule_mm=(14.0, 20.0))
    nodule = make_phantom("nodule", case_rng(5, index), nodule_mm=(14.0, 20.0))
    centre = np.array(nodule.meta["nodule_center_voxel"])
    diameter = nodule.meta["nodule_diameter_mm"]
    assert 14.0 <= diameter <= 20.0
    # the RAS position and the voxel position agree through the affine
    np.testing.assert_allclose(
        nodule.affine[:3, :3] @ centre + nodule.affine[:3, 3], nodule.meta["nodule_center_mm"], atol=0.02
    )
    diff = np.argwhere(np.abs(nodule.array - normal.array) > 1e-3)
    dist_mm = np.linalg.norm((diff - centre) * np.array(nodule.spacing), axis=1)
    # lobulation (x1.3), spicules (<= 10 mm beyond the surface) and the blur bound the change
    assert dist_mm.max() < diameter * 0.65 + 10.0 + 3 * 5.0
    c = tuple(np.round(centre).astype(int))
    assert nodule.array[c] - normal.array[c] > 300
    # in the normal twin, the nodule's place is lung (vessels may cross it)
    i, j, k = np.round(centre).astype(int)
    assert np.median(normal.array[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2]) < -500


def test_lungs_hold_many_small_bright_structures() -> None:
    """Vessels: a nodule must not be the only bright blob inside the lungs."""
    a = make_phantom("normal", case_rng(0, 4)).array
    blobs = 0
    for k in range(a.shape[2]):
        axial = a[:, :, k]
        air, _ = ndi.label(axial < -600)
        outside = np.unique(np.concatenate([air[0], air[-1], air[:, 0], air[:, -1]]))
        lung = (air > 0) & ~np.isin(air, outside)
        # brighter than parenchyma and enclosed by lung in this slice: vessel cross-sections
        blobs += ndi.label(ndi.binary_fill_holes(lung) & ~lung & (axial > -450))[1]
    assert blobs >= 20


@pytest.mark.parametrize("size", [SMALL, {}])
def test_table_is_apart_from_the_body(size: dict[str, tuple[float, ...]]) -> None:
    """The largest 26-connected component at -500 HU (the body mask) does not include the table."""
    for i in range(6):
        vol = make_phantom("normal", case_rng(2, i), vary_geometry=True, **size)  # type: ignore[arg-type]
        kept = vol.array >= -500
        lab, _ = ndi.label(kept, structure=np.ones((3, 3, 3)))
        body = np.argmax(np.bincount(lab.ravel())[1:]) + 1
        column = lab[vol.shape[0] // 2, :, vol.shape[2] // 2]
        table = column[np.nonzero(column)[0][0]]  # lowest kept voxel under the body axis
        assert table != body


def test_vary_geometry_changes_fov_and_slices() -> None:
    shapes = {make_phantom("normal", case_rng(9, i), vary_geometry=True, **SMALL).shape for i in range(6)}
    spacings = {
        make_phantom("normal", case_rng(9, i), vary_geometry=True, **SMALL).spacing[0] for i in range(6)
    }
    assert len(shapes) > 1 and len(spacings) > 1
    assert all(s[:2] == (48, 48) for s in shapes)


def test_labels_balanced_and_independent_of_n() -> None:
    labels = phantom_labels(10, seed=4)
    assert labels[:6] == phantom_labels(6, seed=4)
    assert labels.count("normal") == labels.count("nodule") == 5
    assert all(sorted(labels[i : i + 2]) == sorted(CLASSES) for i in range(0, 10, 2))
    assert phantom_labels(10, seed=5) != labels or phantom_labels(10, seed=6) != labels
    assert set(phantom_labels(40, seed=1, balanced=False)) == set(CLASSES)


def test_unknown_class_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown phantom class"):
        make_phantom("emphysema", np.random.default_rng(0))
    with pytest.raises(Exception, match="unknown phantom classes"):
        generate_phantoms(tmp_path, 2, 0, classes=("normal", "tumour"))


def _features(a: np.ndarray) -> list[float]:
    hist = np.histogram(a, bins=20, range=(-1000.0, 1000.0))[0] / a.size
    return [float(np.count_nonzero(a >= -500)), *hist, float(a.mean()), float(a.std())]


def _global_stats_accuracy(n: int, seed: int, **size: object) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = phantom_labels(n, seed)
    x = np.array(
        [
            _features(make_phantom(lab, case_rng(seed, i), vary_geometry=True, **size).array)
            for i, lab in enumerate(labels)
        ]  # type: ignore[arg-type]
    )
    y = np.array([lab == "nodule" for lab in labels])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    return float(cross_val_score(clf, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean())


def test_label_not_readable_from_global_statistics_small() -> None:
    assert _global_stats_accuracy(60, seed=11, shape=(40, 40, 24), spacing=(8.75, 8.75, 13.3)) < 0.65


@pytest.mark.slow
def test_label_not_readable_from_global_statistics_default_size() -> None:
    assert _global_stats_accuracy(80, seed=12) < 0.65


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_generate_nifti_writes_scans_and_labels(tmp_path: Path) -> None:
    paths = generate_phantoms(tmp_path, 4, seed=1, shape=(32, 32, 16), spacing=(11.0, 11.0, 20.0))
    rows = _rows(tmp_path / "labels.csv")
    assert [r["path"] for r in rows] == [f"case_{i:04d}.nii.gz" for i in range(4)] == [p.name for p in paths]
    assert [r["label"] for r in rows] == phantom_labels(4, seed=1)
    img = nib.load(paths[2])
    expected = make_phantom(
        rows[2]["label"], case_rng(1, 2), shape=(32, 32, 16), spacing=(11.0, 11.0, 20.0), vary_geometry=True
    )
    assert img.shape == expected.shape
    np.testing.assert_allclose(img.affine, expected.affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(img.dataobj, dtype=np.float32), expected.array, atol=1.0)


def test_worker_processes_write_the_same_scans(tmp_path: Path) -> None:
    kw = {"shape": (24, 24, 12), "spacing": (14.0, 14.0, 25.0)}
    one = generate_phantoms(tmp_path / "one", 4, 3, **kw)
    two = generate_phantoms(tmp_path / "two", 4, 3, workers=2, **kw)
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
    assert (tmp_path / "one" / "labels.csv").read_text() == (tmp_path / "two" / "labels.csv").read_text()


def test_generate_dicom_writes_series_folders(tmp_path: Path) -> None:
    paths = generate_phantoms(tmp_path, 2, seed=2, fmt="dicom", shape=(24, 24, 8), spacing=(14.6, 14.6, 40.0))
    rows = _rows(tmp_path / "labels.csv")
    assert [r["path"] for r in rows] == ["case_0000", "case_0001"]
    assert all(p.is_dir() for p in paths)
    for path in paths:
        files = sorted(f for f in path.iterdir() if f.is_file())
        ds = pydicom.dcmread(files[0])
        assert ds.Modality == "CT" and (ds.Rows, ds.Columns) == (24, 24)
        assert 6 <= len(files) <= 9  # 8 slices, varied by -20..+10 %
        assert "PatientBirthDate" not in ds or not ds.PatientBirthDate
    uids = {pydicom.dcmread(next(p.iterdir())).SeriesInstanceUID for p in paths}
    assert len(uids) == 2
    with pytest.raises(Exception, match="not empty"):
        generate_phantoms(tmp_path, 1, seed=2, fmt="dicom", shape=(24, 24, 8), spacing=(14.6, 14.6, 40.0))


def test_nifti_and_dicom_read_back_as_the_generated_volume(tmp_path: Path) -> None:
    from ctsparse.io import read_volume

    opts = {"shape": (32, 32, 10), "spacing": (11.0, 11.0, 32.0)}
    nifti = generate_phantoms(tmp_path / "n", 2, seed=8, **opts)  # type: ignore[arg-type]
    dicom = generate_phantoms(tmp_path / "d", 2, seed=8, fmt="dicom", **opts)  # type: ignore[arg-type]
    for i, label in enumerate(phantom_labels(2, seed=8)):
        expected = make_phantom(label, case_rng(8, i), vary_geometry=True, **opts)  # type: ignore[arg-type]
        for path in (nifti[i], dicom[i]):
            vol = read_volume(path)
            np.testing.assert_array_equal(vol.array, expected.array)  # integer HU survive exactly
            np.testing.assert_allclose(vol.affine, expected.affine, atol=1e-4)


def test_committed_samples_match_their_labels() -> None:
    """Each sample is the phantom its label names: regenerated from seed 0 and its case index
    (benchmarks/make_samples.py) with that label it is the file voxel for voxel, and with the
    other label it is not (the nodule is there, or absent)."""
    from ctsparse.io import read_volume

    root = Path(__file__).resolve().parent.parent / "data_samples"
    rows = _rows(root / "labels.csv")
    assert {r["label"] for r in rows} == set(CLASSES)
    assert any((root / r["path"]).is_dir() for r in rows)  # the DICOM series
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) < 5e6
    options = {
        "shape": (64, 64, 40),
        "spacing": (5.47, 5.47, 8.0),
        "nodule_mm": (10.0, 20.0),
        "vary_geometry": True,
    }
    for i, row in enumerate(rows):
        assert row["path"].startswith(f"case_{i:04d}")
        vol = read_volume(root / row["path"])
        (other,) = set(CLASSES) - {row["label"]}
        same = make_phantom(row["label"], case_rng(0, i), **options)  # type: ignore[arg-type]
        swapped = make_phantom(other, case_rng(0, i), **options)  # type: ignore[arg-type]
        np.testing.assert_array_equal(vol.array, same.array, err_msg=row["path"])
        np.testing.assert_allclose(vol.affine, same.affine, atol=1e-4)
        assert np.abs(vol.array - swapped.array).max() > 100, row["path"]  # the nodule, +20..+60 HU over lung


def _cli_app() -> typer.Typer:
    from ctsparse.cli import phantoms as cmd

    app = typer.Typer()
    app.command("phantoms")(cmd.phantoms)
    app.command("other")(lambda: None)  # two commands, so typer keeps the subcommand name
    return app


def test_cli_writes_phantoms_and_summarises(tmp_path: Path) -> None:
    out = tmp_path / "set"
    args = ["phantoms", str(out), "-n", "4", "--seed", "3", "--size", "24x24x12", "--spacing", "14x14x25"]
    result = CliRunner().invoke(_cli_app(), args)
    assert result.exit_code == 0, result.output
    assert "normal" in result.output and "nodule" in result.output and "labels.csv" in result.output
    assert len(_rows(out / "labels.csv")) == 4
    assert len(list(out.glob("case_*.nii.gz"))) == 4


def test_cli_rejects_bad_size(tmp_path: Path) -> None:
    result = CliRunner().invoke(_cli_app(), ["phantoms", str(tmp_path), "--size", "96x96"])
    assert result.exit_code == 2
    assert "96x96" in result.output


def test_findings_csv_locates_each_nodule_in_the_written_scans_frame(tmp_path: Path) -> None:
    """One findings row per nodule case, none for normal ones; its RAS+ centre, through the affine
    of the scan as read back from DICOM, lands where the nodule raises the HU most over the same
    patient drawn without it."""
    from ctsparse.io import read_volume

    opts = {"shape": (40, 40, 24), "spacing": (9.0, 9.0, 13.0), "nodule_mm": (24.0, 28.0)}
    paths = generate_phantoms(tmp_path, 4, seed=6, fmt="dicom", **opts)  # type: ignore[arg-type]
    labels = phantom_labels(4, seed=6)
    findings = _rows(tmp_path / "findings.csv")
    assert [f["path"] for f in findings] == [
        p.name for p, lab in zip(paths, labels, strict=True) if lab == "nodule"
    ]
    for f in findings:
        i = int(f["path"].split("_")[1])
        nodule = make_phantom("nodule", case_rng(6, i), vary_geometry=True, **opts)  # type: ignore[arg-type]
        assert float(f["radius_mm"]) == pytest.approx(nodule.meta["nodule_diameter_mm"] / 2, abs=1e-3)
        vol = read_volume(tmp_path / f["path"])
        centre = np.array([float(f["x_mm"]), float(f["y_mm"]), float(f["z_mm"]), 1.0])
        v = np.rint(np.linalg.solve(vol.affine, centre)[:3]).astype(int)
        normal = make_phantom("normal", case_rng(6, i), vary_geometry=True, **opts)  # type: ignore[arg-type]
        added = vol.array - normal.array  # the same patient drawn without the nodule
        assert added[tuple(v)] > 300
        assert np.abs(np.array(np.unravel_index(np.argmax(added), added.shape)) - v).max() <= 1
