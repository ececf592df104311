"""Helpers of the DICOM node tests: the node's events, its config, waiting on its journal."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from ctsparse.dicom_node.config import Destination, NodeConfig
from ctsparse.dicom_node.journal import Journal, SeriesState
from tests.orthanc import NODE_AET, ORTHANC_AET, Orthanc

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-77231", "PatientBirthDate": "19610203"}
PATIENT_PATTERN = "Doe|Jane|PID-77231|19610203"


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


def node_fields(orthanc: Orthanc, checkpoint: Path, storage: Path, **kw: Any) -> dict[str, Any]:
    """A node config as plain data: Orthanc allowed to send, Orthanc as the destination."""
    fields: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "storage": str(storage),
        "ae_title": NODE_AET,
        "port": 0,
        "allowed_callers": [ORTHANC_AET],
        "destinations": [{"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "quiet_seconds": 0.5,
        "predict": {"device": "cpu", "threads": None},
    }
    fields.update(kw)
    return fields


def node_config(orthanc: Orthanc, checkpoint: Path, storage: Path, **kw: Any) -> NodeConfig:
    from ctsparse.dicom_node.config import NodePredict

    fields = node_fields(orthanc, checkpoint, storage, **kw)
    fields["destinations"] = [Destination(**d) for d in fields["destinations"]]
    fields["predict"] = NodePredict(**fields["predict"])
    return NodeConfig(**fields)


def wait_status(
    journal: Journal | Path,
    series_uid: str,
    statuses: tuple[str, ...],
    timeout: float = 60.0,
    poll: float = 0.05,
) -> SeriesState:
    """The series' journal row once its status is one of `statuses`; a Path opens the journal of
    another process at each poll."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        if isinstance(journal, Journal):
            state = journal.get(series_uid)
        elif journal.exists():
            opened = Journal(journal)
            state = opened.get(series_uid)
            opened.close()
        if state is not None and state.status in statuses:
            return state
        time.sleep(poll)
    raise AssertionError(f"series {series_uid} not {statuses} after {timeout:.0f} s: {state}")
