"""DICOM headers without pixels: sniff files, read headers, and turn each image (or frame) into a Slice.

Only headers are read here: values longer than ``DEFER_BYTES`` (the pixel data) are skipped and
only their file offset is kept, so grouping and sorting a folder of 1,000 files costs a fraction of
decoding it, and the decoder later reads the pixels at that offset without parsing the file
again. Enhanced multi-frame CT contributes one Slice per frame, with its geometry and rescale
taken from the per-frame functional groups (shared groups as fallback), so both kinds of file go
through the same series assembly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

F64 = npt.NDArray[np.float64]
_IGNORED_NAMES = {"dicomdir"}
# Values longer than this stay on disk (pixel data, large private blobs); headers are far below it.
DEFER_BYTES = 64 * 1024


@dataclass
class Slice:
    """One 2D image of a series: a classic file, or one frame of an enhanced multi-frame file."""

    path: Path
    frame: int | None
    header: Dataset
    ipp: F64 | None
    iop: F64 | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    cols: int
    slope: float
    intercept: float
    instance: int
    localizer: bool

    @property
    def label(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name}[frame {self.frame}]"


def looks_like_dicom(path: Path) -> bool:
    """Cheap sniff: the 'DICM' magic at byte 128, or a raw (preamble-less) group 0002/0008 tag."""
    if path.name.lower() in _IGNORED_NAMES or path.name.startswith("."):
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    little = head[:2] in (b"\x08\x00", b"\x02\x00") and head[3:4] == b"\x00"
    big = head[:2] in (b"\x00\x08", b"\x00\x02") and head[2:3] == b"\x00"
    return len(head) >= 8 and (little or big)


def read_header(path: Path) -> Dataset | str:
    """The header of an image file, or a one-line reason why the file is not a usable DICOM image."""
    if path.name.lower() in _IGNORED_NAMES:
        return "DICOMDIR index, not an image"
    try:
        ds = dcmread(path, defer_size=DEFER_BYTES)
    except InvalidDicomError:
        # Old ACR-NEMA style files have no preamble; force only when the bytes look like tags,
        # because force=True happily "parses" any text file into garbage elements.
        if not looks_like_dicom(path):
            return "not a DICOM file"
        try:
            ds = dcmread(path, defer_size=DEFER_BYTES, force=True)
        except Exception as exc:
            return f"unreadable DICOM header ({type(exc).__name__})"
    except Exception as exc:
        return f"unreadable DICOM header ({type(exc).__name__})"
    if "Rows" not in ds or "Columns" not in ds:
        sop = ds.get("SOPClassUID")
        kind = getattr(sop, "name", None) or "no image attributes"
        return f"not an image ({kind})"
    return ds


def _floats(value: Any, n: int) -> F64 | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _spacing(value: Any) -> tuple[float, float] | None:
    arr = _floats(value, 2) if value is not None else None
    if arr is None or np.any(arr <= 0):
        return None
    return float(arr[0]), float(arr[1])


def _number(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _first_number(value: Any, fallback: Any, default: float) -> float:
    return _number(value if value is not None else fallback, default)


def _is_localizer(image_type: Any) -> bool:
    if image_type is None:
        return False
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).upper() == "LOCALIZER" for v in values)


def _valid_iop(iop: F64 | None) -> F64 | None:
    if iop is None:
        return None
    row, col = iop[:3], iop[3:]
    if np.linalg.norm(row) < 0.5 or np.linalg.norm(col) < 0.5:
        return None
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    if np.linalg.norm(np.cross(row, col)) < 0.5:
        return None
    return np.concatenate([row, col])


def slices_from_header(path: Path, ds: Dataset) -> list[Slice]:
    """Slices of one file: one for a classic image, one per frame for enhanced multi-frame."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(_number(ds.get("NumberOfFrames"), 1.0))
    if n_frames > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_slices(path, ds, n_frames)
    if n_frames > 1:
        raise ValueError(f"multi-frame file ({n_frames} frames) without per-frame geometry")
    return [
        Slice(
            path=path,
            frame=None,
            header=ds,
            ipp=_floats(ds.get("ImagePositionPatient"), 3),
            iop=_valid_iop(_floats(ds.get("ImageOrientationPatient"), 6)),
            pixel_spacing=_spacing(ds.get("PixelSpacing")),
            rows=rows,
            cols=cols,
            slope=_number(ds.get("RescaleSlope"), 1.0),
            intercept=_number(ds.get("RescaleIntercept"), 0.0),
            instance=int(_number(ds.get("InstanceNumber"), 0.0)),
            localizer=_is_localizer(ds.get("ImageType")),
        )
    ]


def _group_item(groups: list[Dataset | None], sequence: str, keyword: str) -> Any:
    """First value of ``keyword`` inside ``sequence`` of the per-frame group, then the shared one."""
    for group in groups:
        if group is not None and sequence in group and len(group[sequence].value) > 0:
            item = group[sequence].value[0]
            if keyword in item:
                return item[keyword].value
    return None


def _enhanced_slices(path: Path, ds: Dataset, n_frames: int) -> list[Slice]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != n_frames:
        raise ValueError(f"{len(per_frame)} per-frame functional groups for {n_frames} frames")
    top_localizer = _is_localizer(ds.get("ImageType"))
    out = []
    for k in range(n_frames):
        groups = [per_frame[k], shared]
        frame_type = _group_item(groups, "CTImageFrameTypeSequence", "FrameType")
        out.append(
            Slice(
                path=path,
                frame=k,
                header=ds,
                ipp=_floats(_group_item(groups, "PlanePositionSequence", "ImagePositionPatient"), 3),
                iop=_valid_iop(
                    _floats(_group_item(groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
                ),
                pixel_spacing=_spacing(_group_item(groups, "PixelMeasuresSequence", "PixelSpacing")),
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                slope=_first_number(
                    _group_item(groups, "PixelValueTransformationSequence", "RescaleSlope"),
                    ds.get("RescaleSlope"),
                    1.0,
                ),
                intercept=_first_number(
                    _group_item(groups, "PixelValueTransformationSequence", "RescaleIntercept"),
                    ds.get("RescaleIntercept"),
                    0.0,
                ),
                instance=k + 1,
                localizer=_is_localizer(frame_type) if frame_type is not None else top_localizer,
            )
        )
    return out


def _frame_groups(s: Slice) -> list[Dataset | None]:
    if s.frame is None:
        return []
    shared = s.header.get("SharedFunctionalGroupsSequence")
    return [s.header.PerFrameFunctionalGroupsSequence[s.frame], shared[0] if shared else None]


def slice_thickness(s: Slice) -> float | None:
    """SpacingBetweenSlices or SliceThickness, only for a lone slice where positions cannot tell."""
    groups = _frame_groups(s)
    candidates = [
        _group_item(groups, "PixelMeasuresSequence", "SpacingBetweenSlices"),
        _group_item(groups, "PixelMeasuresSequence", "SliceThickness"),
        s.header.get("SpacingBetweenSlices"),
        s.header.get("SliceThickness"),
    ]
    for candidate in candidates:
        number = _number(candidate, 0.0)
        if number > 0:
            return number
    return None
