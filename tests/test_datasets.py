"""Dataset layouts (labels.csv, MONAI/Decathlon datalist JSON, class subfolders) and the seeded,
stratified train/validation split, on tiny real NIfTI files and DICOM series folders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ctsparse.data.datasets import Sample, discover_dataset, read_datalist, stratified_split
from ctsparse.errors import DatasetError
from ctsparse.io import write_nifti
from ctsparse.io.write import write_dicom_series
from tests.io_helpers import ramp_volume


def _nifti(path: Path, seed: int = 0) -> Path:
    return write_nifti(ramp_volume((6, 5, 4), seed=seed), path)


def test_datalist_json_with_index_labels_and_a_validation_list(tmp_path: Path) -> None:
    for i in range(4):
        _nifti(tmp_path / "img" / f"s{i}.nii.gz", i)
    datalist = {
        "labels": {"0": "normal", "1": "nodule"},
        "training": [
            {"image": "img/s0.nii.gz", "label": 0},
            {"image": ["img/s1.nii.gz"], "label": [1]},  # MONAI lists of one
            {"image": str(tmp_path / "img" / "s2.nii.gz"), "label": "nodule"},  # absolute, by name
        ],
        "validation": [{"image": "img/s3.nii.gz", "label": 0}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    samples = discover_dataset(tmp_path)
    assert [(s.path.name, s.label, s.split) for s in samples] == [
        ("s0.nii.gz", "normal", "train"),
        ("s1.nii.gz", "nodule", "train"),
        ("s2.nii.gz", "nodule", "train"),
        ("s3.nii.gz", "normal", "val"),
    ]
    assert discover_dataset(tmp_path / "dataset.json") == samples  # the file given directly
    train, val = stratified_split(samples, 0.5, seed=0)  # the datalist's own split wins
    assert [s.path.name for s in train] == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]
    assert [s.path.name for s in val] == ["s3.nii.gz"]


def test_datalist_errors_name_the_file_and_the_entry(tmp_path: Path) -> None:
    _nifti(tmp_path / "a.nii.gz")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"training\[0\] needs 'image' and 'label'") as err:
        read_datalist(bad)
    assert "bad.json" in str(err.value)
    bad.write_text(json.dumps({"training": [{"image": "gone.nii.gz", "label": "x"}]}))
    with pytest.raises(DatasetError, match=r"listed scan does not exist: gone\.nii\.gz"):
        read_datalist(bad)
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read datalist JSON"):
        read_datalist(bad)


def test_labels_csv_wins_over_a_datalist_in_the_same_folder(tmp_path: Path) -> None:
    _nifti(tmp_path / "a.nii.gz", 0)
    _nifti(tmp_path / "b.nii.gz", 1)
    (tmp_path / "labels.csv").write_text("path,label\na.nii.gz,x\nb.nii.gz,y\n")
    (tmp_path / "list.json").write_text(
        json.dumps({"training": [{"image": "a.nii.gz", "label": "p"}, {"image": "b.nii.gz", "label": "q"}]})
    )
    assert [s.label for s in discover_dataset(tmp_path)] == ["x", "y"]


def test_class_subfolders_hold_nifti_files_and_dicom_series(tmp_path: Path) -> None:
    _nifti(tmp_path / "normal" / "n1.nii.gz", 1)
    _nifti(tmp_path / "normal" / "n0.nii.gz", 0)
    write_dicom_series(ramp_volume((6, 5, 3), seed=2), tmp_path / "nodule" / "patient_a")
    _nifti(tmp_path / "nodule" / "k.nii", 3)
    (tmp_path / "nodule" / "notes.txt").write_text("not a scan")
    _nifti(tmp_path / ".hidden" / "h.nii.gz", 4)  # not a class
    samples = discover_dataset(tmp_path)
    assert [(s.path.relative_to(tmp_path).as_posix(), s.label) for s in samples] == [
        ("nodule/k.nii", "nodule"),
        ("nodule/patient_a", "nodule"),
        ("normal/n0.nii.gz", "normal"),
        ("normal/n1.nii.gz", "normal"),
    ]
    assert all(s.split == "" for s in samples)


def test_one_class_is_refused(tmp_path: Path) -> None:
    _nifti(tmp_path / "normal" / "a.nii.gz")
    with pytest.raises(DatasetError, match="at least two classes"):
        discover_dataset(tmp_path)


def _samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"{label}_{i}.nii.gz"), label) for label, n in counts.items() for i in range(n)]


def test_split_is_seeded_and_keeps_class_ratios() -> None:
    samples = _samples({"normal": 20, "nodule": 10, "rare": 2, "single": 1})
    train, val = stratified_split(samples, 0.2, seed=4)
    assert Counter(s.label for s in val) == {"normal": 4, "nodule": 2, "rare": 1}
    assert Counter(s.label for s in train) == {"normal": 16, "nodule": 8, "rare": 1, "single": 1}
    assert sorted(map(str, [*train, *val])) == sorted(map(str, samples))  # a partition
    assert stratified_split(samples, 0.2, seed=4) == (train, val)  # same seed, same split
    vals = {tuple(s.path.name for s in stratified_split(samples, 0.2, seed)[1]) for seed in range(4, 8)}
    assert len(vals) > 1  # the seed reaches it
    assert stratified_split(samples, 0.0, seed=4) == (samples, [])


def test_an_explicit_split_column_wins(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        _nifti(tmp_path / f"{name}.nii.gz")
    (tmp_path / "labels.csv").write_text(
        "path,label,split\na.nii.gz,x,train\nb.nii.gz,y,validation\nc.nii.gz,x,test\nd.nii.gz,y,\n"
    )
    train, val = stratified_split(discover_dataset(tmp_path), 0.5, seed=0)
    assert [s.path.name for s in train] == ["a.nii.gz", "d.nii.gz"]  # no split: training
    assert [s.path.name for s in val] == ["b.nii.gz"]  # the test split is held out of both
