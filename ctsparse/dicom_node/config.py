"""The node's typed config (node.yaml): who may send, where results go, when a series is complete.

Loaded with the same rules as the training config: an unknown key or a wrong type is an error
that names the key.

>>> cfg = load_node_config("configs/node.yaml")  # doctest: +SKIP
>>> cfg.ae_title, cfg.allowed_callers
('CTSPARSE', ['ORTHANC'])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ctsparse.config import _from_dict, read_yaml_mapping
from ctsparse.errors import ConfigError

# DICOM AE titles: 1-16 characters of the default repertoire, no backslash or control characters.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


@dataclass
class Destination:
    """A DICOM peer (usually the PACS) that receives every result SR by C-STORE."""

    ae_title: str = ""
    host: str = ""
    port: int = 104


@dataclass
class NodePredict:
    # the node predicts one series at a time; on a shared 2-core host one thread leaves the other
    # core to the C-STORE receiver and the OS
    device: str = "cpu"
    threads: int | None = None


@dataclass
class NodeConfig:
    checkpoint: str = ""
    # received instances, the journal and the result SRs (one folder, so one disk decides what
    # survives a crash)
    storage: str = ""
    ae_title: str = "CTSPARSE"
    # loopback unless the operator decides otherwise: the node has no TLS and no authentication
    # beyond the allow-list of calling AE titles
    bind: str = "127.0.0.1"
    port: int = 11112
    # calling AE titles allowed to associate; every other association is rejected
    allowed_callers: list[str] = field(default_factory=list)
    destinations: list[Destination] = field(default_factory=list)
    # DICOMweb service root (e.g. http://pacs:8042/dicom-web) that receives the SRs by STOW-RS
    stow_url: str | None = None
    # C-STORE has no "end of series" message: a series is complete when nothing of it arrived
    # for this long. PACS send a series in one association within seconds; 10 s leaves margin
    quiet_seconds: float = 10.0
    # a destination that was down is tried again after this long (the SR waits on disk)
    retry_seconds: float = 30.0
    predict: NodePredict = field(default_factory=NodePredict)


def _check_ae(key: str, value: str) -> None:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(key, f"{value!r} is not an AE title (1-16 characters, no backslash)")


def validate(cfg: NodeConfig) -> NodeConfig:
    """Checks that types cannot express; returns the config."""
    if not cfg.checkpoint:
        raise ConfigError("checkpoint", "required: a best.pt written by `ctsparse train`")
    if not cfg.storage:
        raise ConfigError("storage", "required: the folder for received instances and results")
    _check_ae("ae_title", cfg.ae_title)
    if not 0 <= cfg.port <= 65535:
        raise ConfigError("port", "must be 0-65535 (0: any free port)")
    if not cfg.allowed_callers:
        raise ConfigError(
            "allowed_callers", "list at least one calling AE title (everything else is rejected)"
        )
    for i, ae in enumerate(cfg.allowed_callers):
        _check_ae(f"allowed_callers[{i}]", ae)
    for i, d in enumerate(cfg.destinations):
        _check_ae(f"destinations[{i}].ae_title", d.ae_title)
        if not d.host:
            raise ConfigError(f"destinations[{i}].host", "required")
        if not 1 <= d.port <= 65535:
            raise ConfigError(f"destinations[{i}].port", "must be 1-65535")
    if cfg.stow_url is not None and not cfg.stow_url.startswith(("http://", "https://")):
        raise ConfigError("stow_url", "must start with http:// or https://")
    if cfg.quiet_seconds < 0 or cfg.retry_seconds <= 0:
        raise ConfigError("quiet_seconds", "quiet_seconds must be >= 0 and retry_seconds > 0")
    if cfg.predict.threads is not None and cfg.predict.threads < 1:
        raise ConfigError("predict.threads", "must be >= 1 or null")
    return cfg


def load_node_config(path: str | Path) -> NodeConfig:
    """node.yaml -> a validated NodeConfig (relative paths are from the current folder, as elsewhere)."""
    return validate(_from_dict(NodeConfig, read_yaml_mapping(path)))
