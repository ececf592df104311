"""Pixel decoding of the chosen slices: stored values -> HU, padding -> air.

Each slice keeps its own RescaleSlope/Intercept (they can differ within a series). A transfer
syntax without an installed decoder is refused up front with its name, rather than failing
slice by slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from ctsparse.errors import ScanError
from ctsparse.io.dicom_headers import Slice

F32 = npt.NDArray[np.float32]
AIR_HU = -1024.0


@dataclass
class Notes:
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _check_decodable(header: Dataset, source: Path) -> None:
    meta = getattr(header, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None or not UID(uid).is_compressed:
        return
    uid = UID(uid)
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ScanError(
            source,
            f"pixel data use transfer syntax '{uid.name}' ({uid}), which no installed decoder supports",
        )


def _padding_mask(stored: npt.NDArray[np.generic], header: Dataset) -> npt.NDArray[np.bool_] | None:
    """Voxels flagged by PixelPaddingValue (and PixelPaddingRangeLimit), compared in stored values."""
    pad, limit = header.get("PixelPaddingValue"), header.get("PixelPaddingRangeLimit")
    if pad is None:
        return None
    signed = int(header.get("PixelRepresentation", 0)) == 1
    bits = int(header.get("BitsAllocated", 16))

    def as_stored(v: object) -> int:
        # US/SS is ambiguous in implicit VR; a signed image's padding may come back unsigned.
        value = int(v)  # type: ignore[call-overload]
        return int(value) - (1 << bits) if signed and value >= (1 << (bits - 1)) else value

    try:
        lo = as_stored(pad)
        hi = as_stored(limit) if limit is not None else lo
    except (TypeError, ValueError):
        return None
    lo, hi = min(lo, hi), max(lo, hi)
    return (stored >= lo) & (stored <= hi)  # type: ignore[operator,no-any-return]


def _padding_below_air(header: Dataset, slope: float, intercept: float) -> bool:
    """True when the padding value means HU below air: everything below air is then padding too,
    because lossy compression smears the padding value into a range of nearby values."""
    pad = header.get("PixelPaddingValue")
    try:
        return pad is not None and int(pad) * slope + intercept < AIR_HU
    except (TypeError, ValueError):
        return False


def decode(slices: list[Slice], source: Path, notes: Notes) -> tuple[list[Slice], F32]:
    """HU per slice (per-slice slope/intercept, padding -> air); undecodable slices are dropped."""
    for header in {id(s.header): s.header for s in slices}.values():
        _check_decodable(header, source)
    data = np.empty((len(slices), slices[0].rows, slices[0].cols), dtype=np.float32)
    cache: dict[Path, tuple[Dataset, npt.NDArray[np.generic]]] = {}
    good: list[int] = []
    for k, s in enumerate(slices):
        try:
            ds: Dataset
            if s.path not in cache:
                ds = dcmread(s.path, force=True)
                if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                    raise ValueError("no pixel data")
                pixels = ds.pixel_array
                if s.frame is not None:
                    cache.clear()  # keep one multi-frame file decoded at a time
                    cache[s.path] = (ds, pixels)
            else:
                ds, pixels = cache[s.path]
            stored = pixels[s.frame] if s.frame is not None and pixels.ndim == 3 else pixels
            if stored.shape != (s.rows, s.cols):
                raise ValueError(f"pixel array shape {stored.shape} is not Rows x Columns {s.rows}x{s.cols}")
        except Exception as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            if len(slices) == 1:
                raise ScanError(source, f"cannot read pixel data: {reason}") from None
            notes.skipped.append(f"{s.label}: unreadable pixel data ({reason})")
            continue
        out = data[k]
        if s.slope == 1.0:
            out[...] = stored
        else:
            np.multiply(stored, np.float32(s.slope), out=out, dtype=np.float32, casting="unsafe")
        out += np.float32(s.intercept)
        mask = _padding_mask(stored, s.header)
        if mask is not None:
            out[mask] = AIR_HU
            if _padding_below_air(s.header, s.slope, s.intercept):
                np.maximum(out, AIR_HU, out=out)
        good.append(k)
    if not good:
        raise ScanError(source, "no slice has readable pixel data")
    if len(good) < len(slices):
        notes.warnings.append(f"{len(slices) - len(good)} slice(s) with unreadable pixel data were dropped")
        data = data[good]
    return [slices[k] for k in good], data
