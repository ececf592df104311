"""`ctsparse predict --dicom-out`: one DICOM SR per predicted DICOM series, read back and checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage
from typer.testing import CliRunner

from ctsparse import __version__
from ctsparse.cli.main import app
from ctsparse.dicom_node.sr import SR_SERIES_OFFSET, write_result_sr, write_result_srs
from ctsparse.dicom_node.sr_read import read_result_sr
from ctsparse.errors import ScanError
from ctsparse.io import read_volume, write_dicom_series
from tests.io_helpers import PYDICOM_DATA, ramp_volume

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

CT_SMALL = PYDICOM_DATA / "CT_small.dcm"
CT_SERIES = PYDICOM_DATA / "dicomdirtests" / "77654033" / "CT2"  # 4 JPEG Lossless slices
PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-4711",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "AccessionNumber": "ACC-99",
    "StudyID": "ST-7",
    "StudyDate": "20240229",
    "StudyTime": "101500",
    "ReferringPhysicianName": "House^Greg",
}
IDENTIFIERS = ("Doe", "PID-4711", "ACC-99", "House")


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """Two CT series of one study in one folder, with patient and study attributes."""
    folder = tmp_path / "export"
    folder.mkdir()
    study = "1.2.826.0.1.3680043.10.543.30"
    for k, shape in enumerate([(12, 12, 6), (12, 12, 4)]):
        vol = ramp_volume(shape, seed=k)
        uid = f"1.2.826.0.1.3680043.10.543.3{k + 1}"
        paths = write_dicom_series(
            vol, tmp_path / f"s{k}", series_uid=uid, study_uid=study, SeriesNumber=k + 3, **PATIENT
        )
        for p in paths:
            shutil.move(p, folder / f"s{k}_{p.name}")
    return folder


def _predict(args: list[str], tmp_path: Path) -> tuple[dict, str, int]:
    out = tmp_path / "pred.json"
    res = CliRunner().invoke(app, ["predict", *args, "--device", "cpu", "--out", str(out)])
    return json.loads(out.read_text()), res.output, res.exit_code


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]


def _check_against_row(sr_path: Path, row: dict, decision: dict) -> dict:
    """The SR reads back with pydicom and highdicom, and says what the prediction row says."""
    ds = pydicom.dcmread(sr_path)
    assert ds.SOPClassUID == ComprehensiveSRStorage and ds.Modality == "SR"
    assert ds.Manufacturer == "ctsparse" and ds.InstanceNumber == 1
    assert not any(el.tag.is_private for el in ds.iterall())
    assert isinstance(hd.sr.srread(sr_path), hd.sr.ComprehensiveSR)
    got = read_result_sr(sr_path)
    assert got["label"] == row["label"]
    assert got["confidence"] == pytest.approx(row["confidence"], abs=1e-4)
    classes = sorted(k[2:] for k in row if k.startswith("p_"))
    assert sorted(got["probabilities"]) == classes
    for name in classes:
        assert got["probabilities"][name] == pytest.approx(row[f"p_{name}"], abs=1e-4)
    assert got["sites"] == row["sites"] and got["occupancy"] == pytest.approx(row["occupancy"], abs=1e-6)
    assert got["threshold"] == pytest.approx(decision["threshold"])
    assert got["positive_class"] == decision["positive_class"]
    assert got["warnings"] == row["warnings"] and got["out_of_range"] == bool(row["warnings"])
    assert got["referenced_series_uid"] == row["series_uid"]
    assert got["model"]["version"] == __version__
    assert set(got["model"]["parameters"]) >= {"engine", "config_sha256", "checkpoint_sha256", "decision"}
    return got


def test_dicom_out_writes_one_sr_per_series(tiny_checkpoint: Path, export: Path, tmp_path: Path) -> None:
    srs = tmp_path / "srs"
    data, output, code = _predict([str(tiny_checkpoint), str(export), "--dicom-out", str(srs)], tmp_path)
    assert code == 0, output
    sources = _headers(export)
    source_uids = {str(d.SOPInstanceUID) for d in sources} | {str(d.SeriesInstanceUID) for d in sources}
    decision = data["summary"]["decision"]
    assert len(data["rows"]) == 2 and len(list(srs.iterdir())) == 2
    for row in data["rows"]:
        sr_path = Path(row["dicom_sr"])
        assert sr_path.parent == srs and not row["dicom_sr_note"]
        got = _check_against_row(sr_path, row, decision)
        own = [d for d in sources if d.SeriesInstanceUID == row["series_uid"]]
        # every instance of its own series, none of the other series of the folder
        assert sorted(got["referenced_sop_instance_uids"]) == sorted(str(d.SOPInstanceUID) for d in own)
        # new UIDs for the SR; the study, patient and study attributes are the source's
        assert got["sop_instance_uid"] not in source_uids and got["series_instance_uid"] not in source_uids
        assert got["series_instance_uid"] != got["sop_instance_uid"]
        ds = pydicom.dcmread(sr_path)
        assert ds.StudyInstanceUID == own[0].StudyInstanceUID
        for keyword, value in PATIENT.items():
            assert str(ds.get(keyword)) == value, keyword
        assert ds.SeriesNumber == SR_SERIES_OFFSET + own[0].SeriesNumber
        # the model reported in the SR is the checkpoint predict ran
        assert got["model"]["parameters"]["checkpoint_sha256"] == _sha256(tiny_checkpoint)
    first, second = (read_result_sr(r["dicom_sr"]) for r in data["rows"])
    assert first["series_instance_uid"] != second["series_instance_uid"]
    # console and report name UIDs, never the patient
    text = output + json.dumps(data)
    assert not any(word in text for word in IDENTIFIERS)
    assert f"SR of series {data['rows'][0]['series_uid']}" in output


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_real_ct_nifti_and_a_corrupt_file(tiny_checkpoint: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """pydicom's CT files get SRs; a NIfTI gets a note; a corrupt DICOM fails alone in one line."""
    corrupt = tmp_path / "corrupt.dcm"
    data = CT_SMALL.read_bytes()
    corrupt.write_bytes(data[: len(data) - 20000])  # header intact, pixel data cut short
    nifti = next(tiny_dataset.rglob("*.nii.gz"))
    srs = tmp_path / "srs"
    args = [
        str(tiny_checkpoint),
        str(CT_SMALL),
        str(nifti),
        str(corrupt),
        str(CT_SERIES),
        "--dicom-out",
        str(srs),
    ]
    data_out, output, code = _predict(args, tmp_path)
    assert code == 1, output  # the corrupt file fails
    rows = data_out["rows"]
    assert [bool(r["error"]) for r in rows] == [False, False, True, False]
    assert rows[1]["dicom_sr"] == "" and rows[1]["dicom_sr_note"] == "no SR: not a DICOM input"
    assert rows[2]["dicom_sr"] == "" and "prediction failed" in rows[2]["dicom_sr_note"]
    assert "\n" not in rows[2]["error"] and "Traceback" not in output
    assert len(list(srs.iterdir())) == 2
    decision = data_out["summary"]["decision"]
    small = _check_against_row(Path(rows[0]["dicom_sr"]), rows[0], decision)
    assert small["referenced_sop_instance_uids"] == [str(pydicom.dcmread(CT_SMALL).SOPInstanceUID)]
    series = _check_against_row(Path(rows[3]["dicom_sr"]), rows[3], decision)
    assert sorted(series["referenced_sop_instance_uids"]) == sorted(
        str(d.SOPInstanceUID) for d in _headers(CT_SERIES)
    )
    ds = pydicom.dcmread(rows[0]["dicom_sr"])
    source = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "StudyDate", "StudyTime", "StudyID", "StudyInstanceUID"):
        assert ds.get(keyword) == source.get(keyword), keyword
    assert "no SR: not a DICOM input" in output
    assert str(source.PatientID) not in output and str(source.PatientName) not in output


def _model_card() -> dict:
    decision = {"temperature": 1.5, "positive_class": "nodule", "threshold": 0.4, "rule": "youden"}
    return {
        "name": "ctsparse sparse classifier",
        "ctsparse_version": __version__,
        "engine": "sparse",
        "classes": ["normal", "nodule"],
        "decision": decision,
    }


def _row(source: pydicom.Dataset, path: Path) -> dict:
    return {
        "path": str(path),
        "series_uid": str(source.SeriesInstanceUID),
        "error": None,
        "label": "normal",
        "confidence": 0.75,
        "p_normal": 0.75,
        "p_nodule": 0.25,
        "sites": 321,
        "occupancy": 0.125,
        "warnings": [],
    }


def test_library_sources_as_datasets_and_errors(tmp_path: Path) -> None:
    """write_result_sr takes headers in memory; rows without a series, and wrong sources, raise."""
    source = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    row = _row(source, CT_SMALL)
    path = write_result_sr(row, [source, source], tmp_path, _model_card(), series_number=42)
    got = read_result_sr(path)
    assert got["series_number"] == 42 and got["referenced_sop_instance_uids"] == [str(source.SOPInstanceUID)]
    assert got["out_of_range"] is False and got["warnings"] == []
    assert got["threshold"] == pytest.approx(0.4) and got["temperature"] == pytest.approx(1.5)
    assert "PatientName" in source  # the caller's header is left as it was
    again = read_result_sr(write_result_sr(row, None, tmp_path, _model_card()))  # sources listed again
    assert again["sop_instance_uid"] != got["sop_instance_uid"] and len(list(tmp_path.iterdir())) == 1

    other = pydicom.dcmread(CT_SERIES / "17106", stop_before_pixels=True)
    with pytest.raises(ScanError, match="belongs to series"):
        write_result_sr(row, [other], tmp_path, _model_card())
    results = write_result_srs(
        [{**row, "series_uid": None}, {**row, "error": "x"}], tmp_path / "none", _model_card()
    )
    assert [r.note for r in results] == ["no SR: not a DICOM input", "no SR: the prediction failed"]
    assert not (tmp_path / "none").exists()
    with pytest.raises(ScanError, match="not a readable DICOM SR"):
        read_result_sr(CT_SMALL)


def test_warnings_and_a_series_without_patient_attributes(tmp_path: Path) -> None:
    """Out-of-range notes are carried as text; absent type 2 patient attributes are written empty."""
    vol = ramp_volume((8, 8, 3), seed=4)
    files = write_dicom_series(vol, tmp_path / "bare", PatientName=None, PatientID=None, StudyID=None)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    row = {**_row(source, tmp_path / "bare"), "warnings": ["sites 321 outside training range 10..20"]}
    path = write_result_sr(row, files, tmp_path / "srs", _model_card())
    got = read_result_sr(path)
    assert got["out_of_range"] is True and got["warnings"] == row["warnings"]
    assert sorted(got["referenced_sop_instance_uids"]) == sorted(
        str(pydicom.dcmread(f).SOPInstanceUID) for f in files
    )
    ds = pydicom.dcmread(path)
    assert ds.PatientID == "" and ds.PatientName == "" and ds.StudyID == ""
    assert np.isclose(got["probabilities"]["nodule"], 0.25)


def test_source_values_highdicom_would_refuse_are_copied_as_they_are(tmp_path: Path) -> None:
    """Exports often hold sex "U" (not a DICOM value); the SR still joins its study with it."""
    files = write_dicom_series(
        ramp_volume((8, 8, 2), seed=5), tmp_path / "u", PatientSex="U", SeriesNumber=None
    )
    row = _row(pydicom.dcmread(files[0], stop_before_pixels=True), tmp_path / "u")
    ds = pydicom.dcmread(write_result_sr(row, files, tmp_path / "srs", _model_card()))
    assert ds.PatientSex == "U" and ds.SeriesNumber == SR_SERIES_OFFSET


def test_explain_adds_a_parametric_map_per_series(
    tiny_checkpoint: Path, export: Path, tmp_path: Path
) -> None:
    """With --explain, each DICOM series also gets its saliency map as a Parametric Map."""
    srs, explained = tmp_path / "srs", tmp_path / "explain"
    args = [str(tiny_checkpoint), str(export), "--dicom-out", str(srs), "--explain", str(explained)]
    data, output, code = _predict(args, tmp_path)
    assert code == 0, output
    sources = _headers(export)
    sums = []
    for row in data["rows"]:
        pm = pydicom.dcmread(srs / f"{row['series_uid']}.saliency.dcm")
        own = {str(d.SOPInstanceUID) for d in sources if d.SeriesInstanceUID == row["series_uid"]}
        refs = {
            str(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for g in pm.PerFrameFunctionalGroupsSequence
        }
        assert refs == own and pm.StudyInstanceUID == sources[0].StudyInstanceUID
        sums.append(float(pm.pixel_array.sum()))
    # explain maps each scan on its own grid, so every map voxel is one pixel of one frame
    maps = sorted(float(read_volume(p).array.sum()) for p in explained.glob("*_gradcam.nii.gz"))
    assert len(maps) == 2 and max(maps) > 0
    np.testing.assert_allclose(sorted(sums), maps, rtol=1e-4)
    assert not any(word in output for word in IDENTIFIERS)
