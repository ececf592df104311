"""The DICOM node against a real Orthanc: series in by C-STORE, SR back, DICOMweb pull and STOW.

Orthanc (tests/orthanc.py) is the PACS: phantom series are uploaded to it over REST and Orthanc
itself sends them to the node, which runs in this process on a free port.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctsparse.dicom_node.config import Destination, NodeConfig
from ctsparse.dicom_node.node import DicomNode
from ctsparse.dicom_node.sr_read import read_result_sr
from ctsparse.predict import predict
from tests.orthanc import NODE_AET, ORTHANC_AET, Orthanc, phantom_series

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-77231", "PatientBirthDate": "19610203"}


class Events:
    """The node's events, as the CLI would print them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        with self.lock:
            self.items.append((kind, info))

    def of(self, kind: str) -> list[str]:
        with self.lock:
            return [str(i["message"]) for k, i in self.items if k == kind]

    def text(self) -> str:
        with self.lock:
            return "\n".join(str(i["message"]) for _, i in self.items)


def node_config(orthanc: Orthanc, checkpoint: Path, storage: Path, **kw: Any) -> NodeConfig:
    fields: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "storage": str(storage),
        "ae_title": NODE_AET,
        "port": 0,
        "allowed_callers": [ORTHANC_AET],
        "destinations": [Destination(ORTHANC_AET, "127.0.0.1", orthanc.dicom_port)],
        "quiet_seconds": 0.5,
    }
    fields.update(kw)
    return NodeConfig(**fields)


@pytest.fixture
def running(orthanc: Orthanc, tiny_checkpoint: Path, tmp_path: Path) -> Iterator[tuple[DicomNode, Events]]:
    """A node on a free port that Orthanc knows as modality `ctsparse`."""
    events = Events()
    node = DicomNode(node_config(orthanc, tiny_checkpoint, tmp_path / "node"), on_event=events)
    node.start()
    orthanc.register_node(node.port)
    try:
        yield node, events
    finally:
        node.stop()


def wait_status(node: DicomNode, series_uid: str, statuses: tuple[str, ...], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = node.journal.get(series_uid)
        if state is not None and state.status in statuses:
            return state
        time.sleep(0.05)
    raise AssertionError(
        f"series {series_uid} not {statuses} after {timeout:.0f} s: {node.journal.get(series_uid)}"
    )


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

    state = wait_status(node, series, ("done",))
    assert (state.instances, state.attempts, state.label) == (len(files), 1, expected["label"])
    stored = sorted(p.name for p in (node.storage / "series" / series).iterdir())
    assert stored == sorted(f"{_sop(f)}.dcm" for f in files)  # every instance on disk, no temp file
    assert events.of("series_done") and not events.of("series_failed")
    assert not re.search("Doe|Jane|PID-77231|19610203", events.text())


def _sop(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
