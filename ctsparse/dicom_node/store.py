"""Instances in and results out: the C-STORE handler's write, and C-STORE / STOW-RS of an SR.

An instance is acknowledged only once it is on disk: written to a temporary file, fsynced,
renamed into place (``fileio.atomic_write``) and counted in the journal. A sender that got
status 0x0000 may delete its copy.
"""

from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from ctsparse.dicom_node.config import Destination
from ctsparse.errors import NodeError
from ctsparse.fileio import atomic_write

# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# UIDs become folder and file names: only what PS3.5 9.1 allows, so no path can be smuggled in.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class Received:
    """What the handler learnt about one instance (UIDs only), or why it refused it."""

    status: int
    sop_uid: str
    series_uid: str = ""
    study_uid: str = ""
    path: Path | None = None
    error: str = ""


def series_folder(storage: Path, series_uid: str) -> Path:
    return storage / "series" / series_uid


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def write_instance(event: Any, storage: Path) -> Received:
    """Decode just enough of a C-STORE request to place it, and write it durably.

    Returns a refusal (non-zero status, with a one-line reason naming UIDs only) for a dataset
    that cannot be decoded, lacks its UIDs, or cannot be written.
    """
    sop = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    try:
        ds: Dataset = event.dataset
        uids = [ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")]
    except Exception as exc:  # a malformed stream: pydicom raises many kinds
        return Received(CANNOT_UNDERSTAND, sop, error=f"cannot decode the dataset ({type(exc).__name__})")
    names = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    bad = [n for n, v in zip(names, uids, strict=True) if not valid_uid(str(v) if v is not None else None)]
    if bad:
        return Received(DOES_NOT_MATCH_SOP_CLASS, sop, error=f"missing or invalid {', '.join(bad)}")
    study, series, sop = (str(v) for v in uids)
    path = series_folder(storage, series) / f"{sop}.dcm"
    try:
        with atomic_write(path) as fh:
            fh.write(event.encoded_dataset())
    except OSError as exc:
        return Received(OUT_OF_RESOURCES, sop, series, study, error=f"cannot write ({exc.strerror})")
    return Received(SUCCESS, sop, series, study, path)


def set_no_delay(assoc: Any) -> None:
    """TCP_NODELAY on an association's socket. Each C-STORE is a few small writes (PDU headers,
    command, response) that Nagle's algorithm holds until the peer's delayed ACK: ~40 ms per
    instance on Linux, where the transfer itself takes a few ms."""
    with contextlib.suppress(AttributeError, OSError):
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_c_store(path: Path, dest: Destination, calling_ae: str, timeout: float = 30.0) -> None:
    """C-STORE one file to a destination; raises NodeError unless it answered success."""
    from pynetdicom import AE

    ds = dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise NodeError(where, "association rejected or no answer")
    set_no_delay(assoc)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    # 0xB000, 0xB007, 0xB006: stored with a warning (coercion, elements discarded)
    if code is None or not (code == SUCCESS or code in (0xB000, 0xB006, 0xB007)):
        raise NodeError(where, "no C-STORE response" if code is None else f"C-STORE status 0x{code:04X}")


def send_stow(paths: list[Path], url: str, timeout: float = 60.0) -> None:
    """STOW-RS the files to a DICOMweb service root; raises NodeError when it refuses."""
    from dicomweb_client.api import DICOMwebClient
    from requests import RequestException

    datasets = [dcmread(p) for p in paths]
    try:
        DICOMwebClient(url, timeout=timeout).store_instances(datasets)
    except (RequestException, OSError) as exc:
        raise NodeError(url, f"STOW-RS failed ({type(exc).__name__}: {exc})") from None
