"""Typed errors. The CLI turns each into one line naming the file (or key) and the problem."""

from __future__ import annotations

from pathlib import Path


class CtsparseError(Exception):
    """Base class for every error the CLI reports as one line without a traceback."""


class ScanError(CtsparseError):
    """A scan that cannot be read or used: missing, corrupt, wrong modality, empty after threshold."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# The words every "wrong modality" message carries: the library does not know which option the
# calling command offers to accept it anyway, so the CLI adds that hint where it has one.
NOT_CT = "is not CT"


class NotCTError(ScanError):
    """A DICOM series whose Modality is not CT (the reader's allow_non_ct accepts it)."""

    def __init__(self, path: str | Path, modality: str) -> None:
        self.modality = modality
        super().__init__(path, f"modality {modality} {NOT_CT}")


class ConfigError(CtsparseError):
    """A bad config file, key or value."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"config key '{key}': {reason}")


class CheckpointError(CtsparseError):
    """A checkpoint that is missing, unreadable or incompatible with what was asked."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NodeError(CtsparseError):
    """A DICOM network peer (C-STORE destination, DICOMweb service) that refused or did not answer."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"{peer}: {reason}")


class DatasetError(CtsparseError):
    """A dataset folder, labels.csv or datalist that cannot be used."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
