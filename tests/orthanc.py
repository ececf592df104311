"""A real Orthanc for the DICOM node tests: generated config, free loopback ports, stopped after.

Debian's `orthanc` and `orthanc-dicomweb` packages (scripts/setup.sh installs them) provide the
server and its DICOMweb plugin. Each instance gets its own storage folder and ports, so tests
never touch the system service (if one runs, it keeps its own 4242/8042).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_AET = "ORTHANC"
NODE_AET = "CTSPARSE"
NODE_MODALITY = "ctsparse"  # the node's name in Orthanc's DicomModalities
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_binary() -> str | None:
    """The Orthanc executable (Debian puts it in /usr/sbin, not always on a user's PATH)."""
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)


def missing_reason() -> str | None:
    """Why the Orthanc tests cannot run here, or None when they can."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (scripts/setup.sh installs Debian's orthanc)"
    if not DICOMWEB_PLUGIN.exists():
        return f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """One running Orthanc process and the REST calls the tests need."""

    folder: Path
    http_port: int
    dicom_port: int
    node_port: int
    nodelay: bool = True  # False: DCMTK's default, Nagle's algorithm on (see start)
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        storage = self.folder / "storage"
        return {
            "Name": "ctsparse-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {NODE_MODALITY: [NODE_AET, "127.0.0.1", self.node_port]},
            # close each outgoing association right after its job (the default keeps it open 5 s)
            "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 10,
            "SaveJobs": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 4,
            "StableAge": 3600,
        }

    def start(self, timeout: float = 20.0) -> None:
        binary = orthanc_binary()
        assert binary is not None
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        with self.log.open("wb") as log:
            # DCMTK (Orthanc's DICOM layer) leaves Nagle's algorithm on unless TCP_NODELAY=1: each
            # instance it sends then waits ~40 ms for a delayed ACK (2 s for a 40-slice series)
            env = {**os.environ, "TCP_NODELAY": "1" if self.nodelay else "0"}
            self.process = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {self.log.read_text()[-2000:]}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "", timeout: float = 60
    ) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post_json(self, path: str, payload: Any, timeout: float = 60) -> Any:
        return self.request("POST", path, json.dumps(payload).encode(), "application/json", timeout)

    def upload(self, files: list[Path]) -> list[str]:
        """POST each file to /instances; returns Orthanc's instance ids."""
        return [self.request("POST", "/instances", f.read_bytes(), "application/dicom")["ID"] for f in files]

    def series_id(self, series_uid: str) -> str:
        ids = self.request("POST", "/tools/lookup", series_uid.encode(), "text/plain")
        (match,) = [m["ID"] for m in ids if m["Type"] == "Series"]
        return str(match)

    def send_to_node(self, resources: list[str], modality: str = NODE_MODALITY) -> Any:
        """C-STORE the resources (instance/series/study ids, in this order) to the node."""
        body = {"Resources": resources, "Synchronous": True}
        return self.post_json(
            f"/modalities/{modality}/store", body, timeout=1800
        )  # returns when all are sent

    def register_node(self, port: int, ae_title: str = NODE_AET, name: str = NODE_MODALITY) -> None:
        """Point Orthanc's modality `name` at a node listening on `port` (a test's own port)."""
        body = {"AET": ae_title, "Host": "127.0.0.1", "Port": port}
        self.request("PUT", f"/modalities/{name}", json.dumps(body).encode(), "application/json")

    def sr_instances(self, study_uid: str) -> list[str]:
        """Orthanc ids of the SR instances of a study."""
        query = {"StudyInstanceUID": study_uid, "Modality": "SR"}
        return [str(i) for i in self.post_json("/tools/find", {"Level": "Instance", "Query": query})]

    def wait_for_srs(self, study_uid: str, n: int, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.sr_instances(study_uid)
            if len(found) >= n:
                return found
            time.sleep(0.1)
        raise AssertionError(f"{n} SR(s) of study {study_uid} did not reach Orthanc in {timeout:.0f} s")

    def download(self, instance_id: str, path: Path) -> Path:
        with urllib.request.urlopen(f"{self.url}/instances/{instance_id}/file", timeout=60) as resp:
            path.write_bytes(resp.read())
        return path


def start_orthanc(folder: Path, nodelay: bool = True) -> Orthanc:
    folder.mkdir(parents=True, exist_ok=True)
    server = Orthanc(folder, free_port(), free_port(), free_port(), nodelay)
    server.start()
    return server


def phantom_series(
    folder: Path, seed: int, *, label: str = "nodule", shape: tuple[int, int, int] = (64, 64, 40), **kw: Any
) -> tuple[str, str, list[Path]]:
    """A phantom chest CT written as a DICOM series (study UID, series UID, files).

    The tiny checkpoint's field of view (352 x 352 x 320 mm) at 64 x 64 x 40; `kw` goes to
    ``write_dicom_series`` (modality, overrides such as PatientName).
    """
    import numpy as np
    from pydicom.uid import generate_uid

    from ctsparse.data.phantoms import make_phantom
    from ctsparse.io import write_dicom_series

    spacing = (352.0 / shape[0], 352.0 / shape[1], 320.0 / shape[2])
    volume = make_phantom(
        label, np.random.default_rng(seed), shape=shape, spacing=spacing, nodule_mm=(25.0, 35.0)
    )
    study, series = kw.pop("study_uid", None) or generate_uid(), generate_uid()
    files = write_dicom_series(volume, folder, study_uid=study, series_uid=series, **kw)
    return study, series, files
