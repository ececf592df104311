"""Pixel decoding of the chosen slices: stored values -> HU, padding -> air.

Each slice keeps its own RescaleSlope/Intercept (they can differ within a series). A transfer
syntax without an installed decoder is refused up front with its name, rather than failing
slice by slice.

Uncompressed pixel data are decoded straight from their offset in the file, recorded when the
header was read (``defer_size``), so no file is parsed twice. Each slice is written once, already
in its final in-plane layout (`InPlane`: flipped toward RAS+ and, on request, resampled), so the
full-resolution float32 volume is never copied to reorient it, and never exists at all when the
caller asked for a coarser spacing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ctsparse.errors import ScanError
from ctsparse.io.dicom_headers import Slice

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
AIR_HU = -1024.0
PIXEL_DATA = 0x7FE00010
# Syntaxes whose pixel bytes sit unchanged at a known file offset (deflate rewrites the stream).
_NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)


@dataclass
class InPlane:
    """How each stored slice (rows x columns) becomes a row of the output array.

    Flips reverse an axis so that it points toward RAS+; weights (CSR, new x old, from
    ``ctsparse.io.resample.axis_weights``) resample it. A flip of a resampled axis reverses the
    rows of its weight matrix: the centred grid is symmetric, so this is the same grid.
    """

    rows: int
    cols: int
    flip_rows: bool = False
    flip_cols: bool = False
    row_weights: Any = None
    col_weights: Any = None
    # (ratio, offset) of each resampled axis, for the affine: see index_map
    row_map: tuple[float, float] | None = None
    col_map: tuple[float, float] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        r = self.row_weights.shape[0] if self.row_weights is not None else self.rows
        c = self.col_weights.shape[0] if self.col_weights is not None else self.cols
        return int(r), int(c)

    @property
    def resampled(self) -> bool:
        return self.row_weights is not None or self.col_weights is not None

    def index_map(self) -> F64:
        """4x4 map from output (column i, row j, slice k) indices to stored ones."""
        t = np.eye(4)
        out_rows, out_cols = self.shape
        axes = ((0, self.flip_cols, self.col_map, out_cols), (1, self.flip_rows, self.row_map, out_rows))
        for axis, flip, item, n_out in axes:
            ratio, offset = item if item is not None else (1.0, 0.0)
            if flip:  # output i is stored coordinate offset + ratio * (n_out - 1 - i)
                t[axis, axis], t[axis, 3] = -ratio, offset + ratio * (n_out - 1)
            else:
                t[axis, axis], t[axis, 3] = ratio, offset
        return t

    def apply(self, stored: npt.NDArray[Any], slope: float, intercept: float, out: F32) -> None:
        """HU (stored * slope + intercept) of one slice, laid out by this plan, into `out`."""
        if not self.resampled:
            view = stored[:: -1 if self.flip_rows else 1, :: -1 if self.flip_cols else 1]
            if slope == 1.0:
                np.add(view, np.float32(intercept), out=out, dtype=np.float32, casting="unsafe")
            else:
                np.multiply(view, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
                out += np.float32(intercept)
            return
        x: npt.NDArray[Any] = stored
        if self.row_weights is not None:
            x = self.row_weights @ x
        elif self.flip_rows:
            x = x[::-1]
        if self.col_weights is not None:
            # sparse rows times a contiguous copy of the (small) transpose: faster than x @ W.T
            x = (self.col_weights @ np.ascontiguousarray(x.T)).T
        elif self.flip_cols:
            x = x[:, ::-1]
        # weights sum to 1, so the rescale commutes with the resampling: applied on fewer pixels
        np.multiply(x, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
        out += np.float32(intercept)


@dataclass
class Notes:
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # shape and spacing (canonical axes) before resampling on read; empty when not resampled
    resampled_from: dict[str, list[Any]] = field(default_factory=dict)


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


def _deferred_pixels(s: Slice) -> npt.NDArray[Any] | None:
    """Decode an uncompressed slice from its file offset (header read with defer_size), or None
    when that does not apply (compressed, deflated, or pixels already in memory)."""
    header = s.header
    meta = getattr(header, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None or UID(uid) not in _NATIVE or PIXEL_DATA not in header:
        return None
    raw = header.get_item(PIXEL_DATA, keep_deferred=True)
    offset = getattr(raw, "value_tell", None)
    if getattr(raw, "value", b"") is not None or offset is None:
        return None
    spp = int(header.get("SamplesPerPixel", 1))
    opts: dict[str, Any] = {
        "rows": s.rows,
        "columns": s.cols,
        "samples_per_pixel": spp,
        "bits_allocated": int(header.BitsAllocated),
        "bits_stored": int(header.get("BitsStored", header.BitsAllocated)),
        "pixel_representation": int(header.get("PixelRepresentation", 0)),
        "photometric_interpretation": str(header.get("PhotometricInterpretation", "MONOCHROME2")),
        "number_of_frames": int(header.get("NumberOfFrames", 1) or 1),
        "pixel_keyword": "PixelData",
    }
    if spp > 1:
        opts["planar_configuration"] = int(header.get("PlanarConfiguration", 0))
    with open(s.path, "rb") as fh:
        fh.seek(int(offset))
        pixels, _ = get_decoder(UID(uid)).as_array(fh, index=s.frame, **opts)
    return pixels


def decode(
    slices: list[Slice], source: Path, notes: Notes, plane: InPlane | None = None
) -> tuple[list[Slice], F32]:
    """HU per slice (per-slice slope/intercept, padding -> air); undecodable slices are dropped.

    Returns the decoded slices and a (slices, rows, columns) float32 array laid out by `plane`.
    """
    for header in {id(s.header): s.header for s in slices}.values():
        _check_decodable(header, source)
    plane = plane or InPlane(slices[0].rows, slices[0].cols)
    data = np.empty((len(slices), *plane.shape), dtype=np.float32)
    cache: dict[Path, tuple[Dataset, npt.NDArray[np.generic]]] = {}
    good: list[int] = []
    for k, s in enumerate(slices):
        try:
            stored = _deferred_pixels(s)
            if stored is None:
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
        mask = _padding_mask(stored, s.header)
        if mask is None:
            plane.apply(stored, s.slope, s.intercept, data[k])
        else:
            # padding is flagged in stored values at full resolution, before any resampling
            hu = np.multiply(stored, np.float32(s.slope), dtype=np.float32, casting="unsafe")
            hu += np.float32(s.intercept)
            hu[mask] = AIR_HU
            if _padding_below_air(s.header, s.slope, s.intercept):
                np.maximum(hu, AIR_HU, out=hu)
            plane.apply(hu, 1.0, 0.0, data[k])
        good.append(k)
    if not good:
        raise ScanError(source, "no slice has readable pixel data")
    if len(good) < len(slices):
        notes.warnings.append(f"{len(slices) - len(good)} slice(s) with unreadable pixel data were dropped")
        data = data[good]
    return [slices[k] for k in good], data
