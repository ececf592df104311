"""The DICOM node when things go wrong: corrupt or incomplete instances, a node SIGKILLed between
receiving and predicting and inside a prediction, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from ctsparse.dicom_node.node import DicomNode
from ctsparse.dicom_node.sr_read import read_result_sr
from ctsparse.dicom_node.store import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS
from tests.node_helpers import PATIENT, PATIENT_PATTERN, Events, node_config, node_fields, wait_status
from tests.orthanc import Orthanc, free_port, phantom_series

SCU_AET = "TESTSCU"


@pytest.fixture
def direct(orthanc: Orthanc, tiny_checkpoint: Path, tmp_path: Path) -> Iterator[tuple[DicomNode, Events]]:
    """A node that also accepts this test's own C-STORE SCU."""
    events = Events()
    cfg = node_config(orthanc, tiny_checkpoint, tmp_path / "node", allowed_callers=["ORTHANC", SCU_AET])
    node = DicomNode(cfg, on_event=events)
    node.start()
    try:
        yield node, events
    finally:
        node.stop()


def c_store(port: int, datasets: list[object]) -> list[int]:
    """C-STORE each dataset over one association; the status of each."""
    from pynetdicom import AE

    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CTSPARSE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_incomplete_and_corrupt_instances_get_one_error_line_each(
    direct: tuple[DicomNode, Events], orthanc: Orthanc, tmp_path: Path
) -> None:
    node, events = direct
    study, series, files = phantom_series(
        tmp_path / "ct", seed=31, label="normal", shape=(32, 32, 6), **PATIENT
    )
    no_series = dcmread(files[0])
    del no_series.SeriesInstanceUID
    bad_uid = dcmread(files[1])
    bad_uid.SeriesInstanceUID = "../../escape"
    truncated = []  # a series whose pixel data stop halfway in every instance
    for f in files:
        ds = dcmread(f)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        truncated.append(ds)
    statuses = c_store(node.port, [no_series, bad_uid, *truncated])

    assert statuses[:2] == [DOES_NOT_MATCH_SOP_CLASS, DOES_NOT_MATCH_SOP_CLASS]
    assert statuses[2:] == [0] * len(files)  # stored as received: the reader judges the series
    refused = events.of("instance_refused")
    assert len(refused) == 2 and "SeriesInstanceUID" in refused[0] and "SeriesInstanceUID" in refused[1]
    state = wait_status(node.journal, series, ("failed", "done"))
    assert state.status == "failed"
    (line,) = events.of("series_failed")
    assert series in line
    assert not (node.storage / "results").exists() and orthanc.sr_instances(study) == []
    assert not list((node.storage / "series").rglob("*escape*"))
    assert not re.search(PATIENT_PATTERN, events.text())
    assert CANNOT_UNDERSTAND != DOES_NOT_MATCH_SOP_CLASS


def _serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`ctsparse serve` in its own process (so it can be SIGKILLed), once it listens."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctsparse", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the node exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if log.read_text().count("listening on") > _serve.started.get(log, 0):
            _serve.started[log] = _serve.started.get(log, 0) + 1
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the node did not start: {log.read_text()[-2000:]}")


_serve.started = {}  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_killed_node_finishes_the_series_after_restart(
    orthanc: Orthanc, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    port = free_port()
    orthanc.register_node(port)
    storage, log = tmp_path / "node", tmp_path / "node.log"
    journal = storage / "journal.sqlite"

    def config(quiet: float) -> Path:
        path = tmp_path / f"node_{quiet:g}.yaml"
        path.write_text(
            yaml.safe_dump(node_fields(orthanc, tiny_checkpoint, storage, port=port, quiet_seconds=quiet))
        )
        return path

    study, series, files = phantom_series(tmp_path / "ct", seed=32, **PATIENT)
    orthanc.upload(files)

    # 1. received, not yet complete (a quiet period of 10 minutes), then SIGKILL
    proc = _serve(config(600), log)
    orthanc.send_to_node([orthanc.series_id(series)])  # returns once every instance is acknowledged
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_status(journal, series, ("received",), timeout=5).instances == len(files)
    assert len(list((storage / "series" / series).glob("*.dcm"))) == len(files)

    # 2. restarted: the series is due at once; SIGKILL inside its prediction
    proc = _serve(config(0.2), log)
    wait_status(journal, series, ("predicting", "predicted", "done"), poll=0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = wait_status(journal, series, ("predicting", "predicted", "done"), timeout=5)
    assert state.status == "predicting", "the prediction finished before SIGKILL reached it"
    assert orthanc.sr_instances(study) == []

    # 3. restarted again: predicted once more, sent, then a clean stop on SIGTERM
    proc = _serve(config(0.2), log)
    (sr_id,) = orthanc.wait_for_srs(study, 1)
    state = wait_status(journal, series, ("done",))
    assert (state.attempts, state.instances) == (2, len(files))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "interrupted while predicting" in text and text.rstrip().endswith("stopped")
    assert read_result_sr(orthanc.download(sr_id, tmp_path / "sr.dcm"))["referenced_series_uid"] == series
    assert len(orthanc.sr_instances(study)) == 1
    assert not re.search(PATIENT_PATTERN, text)
