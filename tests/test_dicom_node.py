"""The DICOM node against a real Orthanc: series in by C-STORE, SR back, DICOMweb pull and STOW.

Orthanc (tests/orthanc.py) is the PACS: phantom series are uploaded to it over REST and Orthanc
itself sends them to the node, which runs in this process on a free port.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctsparse.cli.main import app
from ctsparse.dicom_node.node import DicomNode
from ctsparse.dicom_node.sr_read import read_result_sr
from ctsparse.predict import predict
from tests.node_helpers import PATIENT, PATIENT_PATTERN, Events, node_config, wait_status
from tests.orthanc import Orthanc, phantom_series


@pytest.fixture
def running(orthanc: Orthanc, tiny_checkpoint: Path, tmp_path: Path) -> Iterator[tuple[DicomNode, Events]]:
    """A node on a free port that Orthanc knows as modality `ctsparse`."""
    events = Events()
    # every SR goes back twice, by C-STORE and STOW-RS: Orthanc keeps one instance per SOP UID
    cfg = node_config(orthanc, tiny_checkpoint, tmp_path / "node", stow_url=orthanc.dicomweb)
    node = DicomNode(cfg, on_event=events)
    node.start()
    orthanc.register_node(node.port)
    try:
        yield node, events
    finally:
        node.stop()


def test_series_from_orthanc_comes_back_as_sr(
    orthanc: Orthanc, running: tuple[DicomNode, Events], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    node, events = running
    study, series, files = phantom_series(tmp_path / "ct", seed=11, **PATIENT)
    orthanc.upload(files)
    orthanc.send_to_node([orthanc.series_id(series)])

    (sr_id,) = orthanc.wait_for_srs(study, 1)
    got = read_result_sr(orthanc.download(sr_id, tmp_path / "sr.dcm"))
    (expected,) = predict(tiny_checkpoint, [tmp_path / "ct"], device="cpu")
    assert got["referenced_series_uid"] == series
    assert got["label"] == expected["label"]
    for name, p in got["probabilities"].items():
        assert p == pytest.approx(expected[f"p_{name}"], abs=1e-5)

    state = wait_status(node.journal, series, ("done",))
    assert (state.instances, state.attempts, state.label) == (len(files), 1, expected["label"])
    assert state.sent == (f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", f"stow:{orthanc.dicomweb}")
    stored = sorted(p.name for p in (node.storage / "series" / series).iterdir())
    assert stored == sorted(f"{_sop(f)}.dcm" for f in files)  # every instance on disk, no temp file
    assert events.of("series_done") and not events.of("series_failed")
    assert not re.search(PATIENT_PATTERN, events.text())


def _sop(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_pull_from_dicomweb_and_stow_the_sr_back(
    orthanc: Orthanc, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    study, series, files = phantom_series(tmp_path / "ct", seed=12, label="normal", **PATIENT)
    orthanc.upload(files)
    source = [
        "predict",
        str(tiny_checkpoint),
        f"dicomweb:{orthanc.dicomweb}",
        "--study",
        study,
        "--series",
        series,
    ]
    res = CliRunner().invoke(app, [*source, "--store", "--device", "cpu", "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "stored" in res.output and "STOW-RS" in res.output
    assert not re.search(PATIENT_PATTERN, res.output)
    (row,) = json.loads((tmp_path / "p.json").read_text())["rows"]
    (expected,) = predict(tiny_checkpoint, [tmp_path / "ct"], device="cpu")
    assert (row["series_uid"], row["label"]) == (series, expected["label"])
    assert row["p_nodule"] == pytest.approx(expected["p_nodule"], abs=1e-6)

    (sr_id,) = orthanc.wait_for_srs(study, 1, timeout=5)
    got = read_result_sr(orthanc.download(sr_id, tmp_path / "sr.dcm"))
    assert got["referenced_series_uid"] == series and got["label"] == expected["label"]
    assert not Path(row["path"]).exists()  # the retrieved copy is gone with the command


def test_dicomweb_input_needs_a_study(orthanc: Orthanc, tiny_checkpoint: Path) -> None:
    res = CliRunner().invoke(app, ["predict", str(tiny_checkpoint), f"dicomweb:{orthanc.dicomweb}"])
    assert res.exit_code == 1 and "--study" in res.output
    res = CliRunner().invoke(
        app, ["predict", str(tiny_checkpoint), f"dicomweb:{orthanc.dicomweb}", "--study", "1.2.3.999"]
    )
    assert res.exit_code == 1 and "study 1.2.3.999 not found" in res.output


def test_a_caller_not_allowed_is_rejected(orthanc: Orthanc, tiny_checkpoint: Path, tmp_path: Path) -> None:
    events = Events()
    cfg = node_config(orthanc, tiny_checkpoint, tmp_path / "node", allowed_callers=["OTHERPACS"])
    node = DicomNode(cfg, on_event=events)
    node.start()
    try:
        orthanc.register_node(node.port)
        _study, series, files = phantom_series(tmp_path / "ct", seed=13, label="normal", shape=(32, 32, 8))
        orthanc.upload(files)
        with pytest.raises(urllib.error.HTTPError):
            orthanc.send_to_node([orthanc.series_id(series)])
        assert any("'ORTHANC'" in m and "rejected" in m for m in events.of("rejected"))
        assert node.journal.get(series) is None
        assert not (node.storage / "series").exists()
    finally:
        node.stop()


def test_non_ct_and_localizer_series_get_one_error_line_each_and_no_sr(
    orthanc: Orthanc, running: tuple[DicomNode, Events], tmp_path: Path
) -> None:
    node, events = running
    study, mr, mr_files = phantom_series(
        tmp_path / "mr", seed=14, label="normal", shape=(32, 32, 8), modality="MR"
    )
    _, scout, scout_files = phantom_series(
        tmp_path / "scout",
        seed=15,
        label="normal",
        shape=(32, 32, 2),
        study_uid=study,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    _, ct, ct_files = phantom_series(tmp_path / "ct", seed=16, study_uid=study)
    orthanc.upload(mr_files + scout_files + ct_files)
    orthanc.send_to_node([orthanc.series_id(uid) for uid in (mr, scout)])
    for uid in (mr, scout):
        assert wait_status(node.journal, uid, ("failed",)).status == "failed"
    failed = events.of("series_failed")
    assert len(failed) == 2
    assert any(mr in m and "modality MR is not CT" in m for m in failed)
    assert any(scout in m and "localizer" in m for m in failed)
    # the node keeps running: a CT series of the same study still gets its SR, and only it
    orthanc.send_to_node([orthanc.series_id(ct)])
    (sr_id,) = orthanc.wait_for_srs(study, 1)
    assert read_result_sr(orthanc.download(sr_id, tmp_path / "sr.dcm"))["referenced_series_uid"] == ct
    assert wait_status(node.journal, ct, ("done",)).attempts == 1
    assert len(events.of("series_failed")) == 2


def test_two_series_arriving_interleaved_are_each_predicted_once(
    orthanc: Orthanc, running: tuple[DicomNode, Events], tmp_path: Path
) -> None:
    node, _events = running
    study, a, a_files = phantom_series(tmp_path / "a", seed=17, shape=(48, 48, 24))
    _, b, b_files = phantom_series(
        tmp_path / "b", seed=18, label="normal", shape=(48, 48, 24), study_uid=study
    )
    a_ids, b_ids = orthanc.upload(a_files), orthanc.upload(b_files)
    interleaved = [i for pair in zip(a_ids, b_ids, strict=True) for i in pair]
    orthanc.send_to_node(interleaved)

    srs = orthanc.wait_for_srs(study, 2)
    states = {uid: wait_status(node.journal, uid, ("done",)) for uid in (a, b)}
    assert all(s.instances == 24 and s.attempts == 1 for s in states.values())
    # each series' reception spans the other's: they arrived interleaved, not one after the other
    assert states[a].first_at < states[b].last_at and states[b].first_at < states[a].last_at
    refs = {read_result_sr(orthanc.download(i, tmp_path / f"{i}.dcm"))["referenced_series_uid"] for i in srs}
    assert refs == {a, b}
    time.sleep(1.0)  # several quiet periods later, still one SR per series
    assert len(orthanc.sr_instances(study)) == 2
