"""DICOMweb in and out: `dicomweb:URL` inputs retrieved with WADO-RS, result SRs sent with STOW-RS.

``predict`` reads files, so a study on a DICOMweb server is first retrieved into a folder (one
subfolder per series, files named by SOP Instance UID) and then read like any DICOM export.

>>> remote = RemoteInputs.fetch(["dicomweb:http://pacs/dicom-web"], "1.2.3", None, True)  # doctest: +SKIP
>>> remote.inputs  # doctest: +SKIP
['/tmp/ctsparse-dicomweb-x1y2/input0']
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from ctsparse.dicom_node.store import send_stow, valid_uid
from ctsparse.errors import NodeError
from ctsparse.fileio import atomic_write

PREFIX = "dicomweb:"


def is_dicomweb(text: str) -> bool:
    return text.startswith(PREFIX)


def service_url(text: str) -> str:
    """`dicomweb:http://host/dicom-web` -> the service root URL."""
    url = text.removeprefix(PREFIX)
    if not url.startswith(("http://", "https://")):
        raise NodeError(text, "expected dicomweb:http://HOST[:PORT]/PATH (the DICOMweb service root)")
    return url.rstrip("/")


def _client(url: str) -> Any:
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url, timeout=60)


def _save(ds: Dataset, root: Path) -> Path:
    series, sop = str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
    if not (valid_uid(series) and valid_uid(sop)):
        raise NodeError("WADO-RS", "an instance without a valid SeriesInstanceUID/SOPInstanceUID")
    path = root / series / f"{sop}.dcm"
    with atomic_write(path) as fh:
        ds.save_as(fh, enforce_file_format=True)
    return path


def retrieve(url: str, study_uid: str, series_uid: str | None, dest: Path) -> list[Path]:
    """WADO-RS retrieve of one series (or every series of the study) into ``dest/<series UID>/``.

    Instances are streamed to disk one by one, so a large study is never held in memory.

    Returns:
        The series folders, in retrieval order.

    Raises:
        NodeError: the service cannot be reached, or holds nothing for these UIDs.
    """
    from requests import RequestException

    for name, uid in (("--study", study_uid), ("--series", series_uid)):
        if uid is not None and not valid_uid(uid):
            raise NodeError(url, f"{name} {uid!r} is not a DICOM UID")
    client = _client(url)
    folders: dict[str, None] = {}
    what = f"series {series_uid}" if series_uid else f"study {study_uid}"
    try:
        if series_uid is None:
            instances = client.iter_study(study_uid)
        else:
            instances = client.iter_series(study_uid, series_uid)
        for ds in instances:
            folders[str(_save(ds, dest).parent)] = None
    except RequestException as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 404:
            raise NodeError(url, f"{what} not found") from None
        raise NodeError(url, f"WADO-RS retrieve of {what} failed ({type(exc).__name__}: {exc})") from None
    if not folders:
        raise NodeError(url, f"{what}: no instance retrieved")
    return [Path(f) for f in folders]


@dataclass
class RemoteInputs:
    """`predict` inputs with every `dicomweb:URL` replaced by the folder its study was retrieved
    into (under a temporary folder that ``cleanup`` removes)."""

    inputs: list[str]
    origins: dict[Path, str] = field(default_factory=dict)  # retrieved folder -> service root
    root: Path | None = None
    sr_folder: Path | None = None  # where the SRs wait for STOW-RS (``store=True``)

    @classmethod
    def fetch(
        cls, inputs: Sequence[str], study_uid: str | None, series_uid: str | None, store: bool
    ) -> RemoteInputs:
        """Retrieve every `dicomweb:URL` input (the study, or only ``series_uid``).

        Raises:
            NodeError: a dicomweb input without a study, a study without a dicomweb input,
                ``store`` without a dicomweb input, or a failed retrieve.
        """
        remote = [text for text in inputs if is_dicomweb(text)]
        if not remote:
            if study_uid is not None or store:
                raise NodeError("--study/--store", "need a dicomweb:URL input to retrieve from / store to")
            return cls(list(inputs))
        if study_uid is None:
            raise NodeError(remote[0], "a dicomweb input needs --study UID (and optionally --series UID)")
        out = cls([], root=Path(tempfile.mkdtemp(prefix="ctsparse-dicomweb-")))
        assert out.root is not None
        try:
            for k, text in enumerate(inputs):
                if not is_dicomweb(text):
                    out.inputs.append(text)
                    continue
                url, folder = service_url(text), out.root / f"input{k}"
                retrieve(url, study_uid, series_uid, folder)
                out.origins[folder] = url
                out.inputs.append(str(folder))
        except BaseException:
            out.cleanup()
            raise
        if store:
            out.sr_folder = out.root / "sr"
        return out

    def origin(self, scan: str | Path) -> str | None:
        """The service a scan was retrieved from (None for a local input)."""
        path = Path(scan)
        return next((url for folder, url in self.origins.items() if path.is_relative_to(folder)), None)

    def store(self, results: Sequence[tuple[str | Path, Path | None]]) -> list[tuple[Path, str]]:
        """STOW-RS each (scan, SR file) whose scan came from a DICOMweb service back to it.

        Returns the (SR file, service) pairs stored.
        """
        stored: list[tuple[Path, str]] = []
        for scan, sr in results:
            url = self.origin(scan)
            if sr is not None and url is not None:
                send_stow([sr], url)
                stored.append((sr, url))
        return stored

    def cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
