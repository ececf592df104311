"""No output carries patient identifiers: a DICOM dataset whose files hold a patient's name, ID,
birth date, address and accession number goes through train (planned) -> predict -> evaluate ->
profile; none of those values appears in any file written (run folder, predictions, reports,
plots, the cache) nor in any console output."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from ctsparse.cli.main import app

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

PHI = {
    "PatientName": "Zyxwarden^Philomena",
    "PatientID": "PID9137264",
    "PatientBirthDate": "19410823",
    "OtherPatientIDs": "OPID5520913",
    "PatientAddress": "17 Quillback Lane",
    "AccessionNumber": "ACC8841027",
    "ReferringPhysicianName": "Vexmoor^Aldous",
}
# each value as it could be written: DICOM's, and with the person-name caret as a space
MARKERS = {v.encode() for v in PHI.values()} | {v.replace("^", " ").encode() for v in PHI.values()}
MARKERS |= {b"Zyxwarden", b"Philomena", b"Vexmoor"}


def _dicom_dataset_with_phi(root: Path) -> Path:
    from ctsparse.data.phantoms import generate_phantoms

    generate_phantoms(root, 6, seed=5, fmt="dicom", shape=(24, 24, 8), spacing=(14.6, 14.6, 40.0))
    for path in root.rglob("*"):
        if path.is_file() and path.suffix != ".csv":  # labels.csv, findings.csv
            ds = pydicom.dcmread(path)
            for key, value in PHI.items():
                setattr(ds, key, value)
            ds.save_as(path, enforce_file_format=True)
    return root


def _contents(path: Path) -> list[bytes]:
    """The file's bytes, and each member's for a zip (checkpoints, .npz), compressed or not."""
    data = path.read_bytes()
    out = [data]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            out += [z.read(name) for name in z.namelist()]
    return out


@pytest.mark.slow
def test_no_output_carries_patient_identifiers(tmp_path: Path) -> None:
    data = _dicom_dataset_with_phi(tmp_path / "data")
    assert pydicom.dcmread(next((data / "case_0000").iterdir())).PatientID == PHI["PatientID"]
    run, rep = tmp_path / "run", tmp_path / "reports"
    tiny = ["model.widths=[8, 16]", "model.depths=[1, 1]", "train.epochs=1", "train.batch_size=3"]
    sets = [x for s in tiny for x in ("--set", s)]
    ckpt, cpu = str(run / "best.pt"), ["--device", "cpu"]
    commands = [
        ["train", str(data), "--out", str(run), *cpu, "--no-measure", *sets],
        ["predict", ckpt, str(data), *cpu, "--out", str(rep / "p.csv")],
        ["predict", ckpt, str(data / "case_0001"), *cpu, "--out", str(rep / "p.json")],
        ["evaluate", ckpt, str(data), *cpu, "--n-boot", "50", "--out", str(rep / "eval")],
        ["profile", str(data), "--json", str(rep / "prof.json"), "--csv", str(rep / "prof.csv"),
         "--plots", str(rep / "plots")],
    ]  # fmt: skip
    rep.mkdir()
    console = []
    for args in commands:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, f"{args[0]}: {res.output}"
        console.append(res.output)
    roots = (run, rep, Path(os.environ["CTSPARSE_CACHE"]))  # the run, the reports, the scan cache
    written = [p for root in roots for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"best.pt", "last.pt", "plan.json", "history.csv", "p.csv", "p.json", "prof.json"} <= names
    assert any(p.suffix == ".npz" for p in written) and any(p.suffix == ".png" for p in written)
    for path in written:
        for blob in _contents(path):
            leaked = [m.decode() for m in MARKERS if m in blob]
            assert not leaked, f"{path.relative_to(tmp_path.parent)} carries {leaked}"
    for args, text in zip(commands, console, strict=True):
        leaked = [m.decode() for m in MARKERS if m.decode() in text]
        assert not leaked, f"`ctsparse {args[0]}` printed {leaked}"
