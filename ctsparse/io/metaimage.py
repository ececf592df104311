"""MetaImage reader (.mhd header + data file, or .mha with the data inside): ITK's own format,
in which LUNA16 and many challenge datasets ship their CTs.

The header is `Key = Value` lines. The keys read here:
- `NDims` and `DimSize`;
- `ElementType` (MET_CHAR ... MET_DOUBLE);
- `ElementSpacing` (or `ElementSize`);
- `Offset` (or `Position`, `Origin`);
- `TransformMatrix` (or `Rotation`, `Orientation`): each row is the direction of one array axis,
  as ITK reads it;
- `BinaryDataByteOrderMSB` (or `ElementByteOrderMSB`);
- `CompressedData` (zlib);
- `HeaderSize`, for a data file with a header of its own (-1: the data are its last bytes);
- `ElementDataFile`: LOCAL (the data follow the header) or a file beside the header.

World coordinates are LPS millimetres, as in DICOM and ITK, and become the Volume's RAS+ frame.
Files are read whole; ElementDataFile LIST (one file per slice) is refused.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctsparse.errors import NotCTError, ScanError
from ctsparse.io.geometry import LPS_RAS
from ctsparse.io.nifti import oriented_volume, value_warnings
from ctsparse.volume import Volume

METAIMAGE_SUFFIXES = (".mhd", ".mha")
# the data files .mhd headers point to: never a scan of their own
METAIMAGE_DATA_SUFFIXES = (".raw", ".zraw")
_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",  # MetaIO's LONG is 32 bits; LONG_LONG is 64
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
_ALIASES = {
    "ElementSize": "ElementSpacing",
    "Position": "Offset",
    "Origin": "Offset",
    "Rotation": "TransformMatrix",
    "Orientation": "TransformMatrix",
    "ElementByteOrderMSB": "BinaryDataByteOrderMSB",
}
_MAX_HEADER = 64 * 1024  # a MetaImage header is a few hundred bytes


def is_metaimage_name(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(METAIMAGE_SUFFIXES)


def _header(path: Path) -> tuple[dict[str, str], int]:
    """The header's keys and the byte offset after it (where LOCAL data start)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_MAX_HEADER)
    except OSError as exc:
        raise ScanError(path, f"cannot read: {exc.strerror or exc}") from None
    keys: dict[str, str] = {}
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        if end < 0:
            end = len(head)
        line = head[pos:end].decode("latin-1").strip()
        pos = end + 1
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ScanError(path, f"not a MetaImage header (line {line[:40]!r} has no '=')")
        key = _ALIASES.get(key.strip(), key.strip())
        keys[key] = value.strip()
        if key == "ElementDataFile":  # always the last key: the data (or nothing) follow
            return keys, pos
    raise ScanError(path, "not a MetaImage header (no ElementDataFile line)")


def _external(path: Path, keys: dict[str, str]) -> Path | None:
    """The data file the header names, None for LOCAL data (after the header); ScanError for a
    list of files or a slice pattern."""
    source = keys["ElementDataFile"]
    if source.upper().startswith("LIST") or "%" in source:
        raise ScanError(path, f"MetaImage ElementDataFile {source!r} (one file per slice) is not supported")
    return None if source.upper() == "LOCAL" else path.parent / source


def data_file(path: str | Path) -> Path | None:
    """The file beside a .mhd header that holds its voxels (None for LOCAL data or an unreadable
    header): the scan's content is both files."""
    try:
        return _external(Path(path), _header(Path(path))[0])
    except ScanError:
        return None


def _numbers(keys: dict[str, str], key: str, n: int, default: Sequence[float], path: Path) -> list[float]:
    if key not in keys:
        return list(default)
    try:
        values = [float(v) for v in keys[key].split()]
    except ValueError:
        raise ScanError(path, f"MetaImage {key} {keys[key]!r} is not a list of numbers") from None
    if len(values) != n:
        raise ScanError(path, f"MetaImage {key} has {len(values)} values, expected {n}")
    return values


def _is_true(keys: dict[str, str], key: str) -> bool:
    return keys.get(key, "False").strip().lower() in ("true", "1", "yes")


def _raw_bytes(path: Path, keys: dict[str, str], external: Path | None, data_at: int, n_bytes: int) -> bytes:
    local = external is None
    data_path = external or path
    compressed = _is_true(keys, "CompressedData")
    skip = data_at if local else int(float(keys.get("HeaderSize", "0")))
    try:
        with open(data_path, "rb") as fh:
            if skip < 0:  # the data are the file's last bytes
                if compressed:
                    raise ScanError(path, "MetaImage HeaderSize -1 with CompressedData is not supported")
                fh.seek(0, 2)
                skip = max(fh.tell() - n_bytes, 0)
            fh.seek(skip)
            blob = fh.read()
    except FileNotFoundError:
        raise ScanError(path, f"MetaImage data file {data_path.name} is missing") from None
    except OSError as exc:
        raise ScanError(path, f"cannot read {data_path.name}: {exc.strerror or exc}") from None
    if compressed:
        try:
            blob = zlib.decompress(blob)
        except zlib.error as exc:
            raise ScanError(path, f"corrupt compressed MetaImage data ({exc})") from None
    if len(blob) < n_bytes:
        raise ScanError(path, f"truncated MetaImage data: {len(blob)} of {n_bytes} bytes in {data_path.name}")
    return blob[:n_bytes]


def read_metaimage(
    path: str | Path, spacing: Sequence[float] | None = None, allow_non_ct: bool = False
) -> Volume:
    """Read a .mhd/.mha CT volume (values as stored: HU for CT exports such as LUNA16's),
    resampled to `spacing` (mm per RAS+ axis) if given. A header whose Modality names another
    modality than CT is refused (NotCTError) unless allow_non_ct; most headers name none."""
    path = Path(path)
    keys, data_at = _header(path)
    modality = keys.get("Modality", "").removeprefix("MET_MOD_").upper()
    if modality not in ("", "CT", "UNKNOWN") and not allow_non_ct:
        raise NotCTError(path, modality)
    ndims = int(_numbers(keys, "NDims", 1, [0], path)[0])
    if ndims not in (2, 3):
        raise ScanError(path, f"expected a 3D MetaImage, got NDims = {ndims}")
    dims = [int(v) for v in _numbers(keys, "DimSize", ndims, [], path)]
    if min(dims) < 1:
        raise ScanError(path, f"MetaImage DimSize {dims} has an empty axis")
    channels = int(float(keys.get("ElementNumberOfChannels", "1")))
    if channels != 1:
        raise ScanError(path, f"MetaImage with {channels} channels per voxel; a CT has one")
    kind = keys.get("ElementType", "")
    if kind not in _TYPES:
        raise ScanError(path, f"unsupported MetaImage ElementType {kind or '(none)'}")
    dtype = np.dtype(_TYPES[kind]).newbyteorder(">" if _is_true(keys, "BinaryDataByteOrderMSB") else "<")
    n = int(np.prod(dims))
    external = _external(path, keys)
    blob = _raw_bytes(path, keys, external, data_at, n * dtype.itemsize)
    # x varies fastest in the file: read as (z, y, x), then view as (x, y, z)
    data = np.frombuffer(blob, dtype=dtype).reshape(dims[::-1]).T.astype(np.float32)
    if ndims == 2:
        data = data[:, :, None]
    warnings = value_warnings(data, path)

    size = _numbers(keys, "ElementSpacing", ndims, [1.0] * ndims, path)
    origin = _numbers(keys, "Offset", ndims, [0.0] * ndims, path)
    rows = np.array(_numbers(keys, "TransformMatrix", ndims * ndims, np.eye(ndims).ravel().tolist(), path))
    lps = np.eye(4)
    lps[:ndims, :ndims] = (rows.reshape(ndims, ndims) * np.array(size)[:, None]).T
    lps[:ndims, 3] = origin
    if ndims == 2:  # one slice: its own normal, one spacing deep
        lps[:3, 2] = np.cross(lps[:3, 0], lps[:3, 1]) / (size[0] * size[1]) * min(size)
    affine = LPS_RAS @ lps
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(path, "the MetaImage geometry (spacing, TransformMatrix) is singular or not finite")
    meta: dict[str, Any] = {
        "format": "metaimage",
        "modality": modality or "unknown",
        "n_files": 1 if external is None else 2,
        "warnings": warnings,
        "skipped": [],
    }
    return oriented_volume(data, affine, path, meta, spacing)
