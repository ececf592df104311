"""A saliency map on a scan's voxel grid -> a DICOM Parametric Map on its source series' own frames.

The map (from ``ctsparse explain``: float values on the Volume's RAS+ grid) is sampled at the
centre of every pixel of every source image, through the affines alone (nearest voxel), so the
Parametric Map has one frame per source image, with that image's geometry, and a viewer overlays
it on the series exactly. ``ctsparse explain`` reads a scan at its own resolution, so the nearest
voxel is the very voxel the source pixel became; pixels outside the map (a slice the reader left
out) are 0.

The object is highdicom's ParametricMap in a new series of the source study (patient and study
attributes copied from the source, new UIDs), float values 0..1 with a real-world value mapping
that names the method and the class explained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ctsparse.dicom_node import codes as c
from ctsparse.dicom_node.sr import blank_patient, derived_series_number
from ctsparse.errors import CtsparseError, ScanError
from ctsparse.fileio import atomic_write
from ctsparse.io.dicom_headers import Slice, read_header, slices_from_header
from ctsparse.io.geometry import LPS_RAS

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
# The map's series sorts after the source and its SR (source + 9000)
SALIENCY_SERIES_OFFSET = 9500


def source_frames(scan: str | Path, sources: Sequence[str | Path]) -> tuple[list[Dataset], list[Slice]]:
    """Headers of the source images and their cross-sectional frames (scouts left out), in order."""
    headers: list[Dataset] = []
    slices: list[Slice] = []
    for src in sources:
        ds = read_header(Path(src))
        if isinstance(ds, str):
            raise ScanError(src, ds)
        frames = [s for s in slices_from_header(Path(src), ds) if not s.localizer]
        if frames:
            headers.append(ds)
            slices += frames
    if not slices:
        raise ScanError(scan, "no cross-sectional source image to put a map on")
    if len(headers) > 1 and any(s.frame is not None for s in slices):
        raise ScanError(scan, "a series of several multi-frame files: no Parametric Map written")
    shapes = {(s.rows, s.cols) for s in slices}
    if len(shapes) > 1 or any(s.ipp is None or s.iop is None or s.pixel_spacing is None for s in slices):
        raise ScanError(scan, "source images of several sizes or without geometry: no Parametric Map written")
    return headers, slices


def sample_on_frames(values: F32, affine: F64, slices: Sequence[Slice]) -> F32:
    """``values`` (X, Y, Z on a RAS+ grid, ``affine`` voxel -> mm) at every source pixel centre."""
    rows, cols = slices[0].rows, slices[0].cols
    out = np.zeros((len(slices), rows, cols), dtype=np.float32)
    to_voxel = np.linalg.inv(affine) @ LPS_RAS
    r, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for k, s in enumerate(slices):
        assert s.ipp is not None and s.iop is not None and s.pixel_spacing is not None
        row_step, col_step = s.pixel_spacing  # between rows, between columns (DICOM order)
        lps = (
            s.ipp[:, None, None]
            + s.iop[:3, None, None] * (col * col_step)
            + s.iop[3:, None, None] * (r * row_step)
        )
        ijk = np.rint(np.einsum("ab,bxy->axy", to_voxel[:3, :3], lps) + to_voxel[:3, 3, None, None]).astype(
            int
        )
        inside = np.all((ijk >= 0) & (ijk < np.array(values.shape)[:, None, None]), axis=0)
        out[k][inside] = values[ijk[0][inside], ijk[1][inside], ijk[2][inside]]
    return out


def write_saliency_map(
    values: npt.ArrayLike,
    affine: npt.ArrayLike,
    sources: Sequence[str | Path],
    out_dir: str | Path,
    model: Mapping[str, Any],
    *,
    scan: str | Path = "",
    method: str = "gradcam",
    target: str = "",
) -> Path:
    """Write the map as a Parametric Map of the source series; returns ``out_dir/<series UID>.saliency.dcm``.

    Args:
        values, affine: the map on the scan's voxel grid and its voxel -> RAS+ mm affine (e.g. the
            NIfTI ``ctsparse explain`` writes, read with ``ctsparse.io.read_volume``).
        sources: the series' files (``InputItem.series.files``).
        model: predict's model card (see ``sr.write_result_sr``).
        method, target: the saliency method and the class explained, named in the value mapping.
    """
    headers, slices = source_frames(scan, sources)
    frames = sample_on_frames(
        np.asarray(values, dtype=np.float32), np.asarray(affine, dtype=np.float64), slices
    )
    frames = np.clip(np.nan_to_num(frames), 0.0, 1.0)  # the map is scaled to peak 1; 0 where no site
    what = f"{method} saliency of {target}".strip()
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="saliency",
        lut_explanation=what[:64],
        unit=c.NO_UNITS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=c.SALIENCY,
    )
    series_uid = str(headers[0].SeriesInstanceUID)
    pmap = hd.pm.ParametricMap(
        source_images=[blank_patient(headers[0]), *headers[1:]],
        pixel_array=frames,
        series_instance_uid=generate_uid(),
        series_number=derived_series_number(headers[0], SALIENCY_SERIES_OFFSET),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="ctsparse",
        manufacturer_model_name=str(model.get("name", "ctsparse"))[:64],
        software_versions=str(model["ctsparse_version"]),
        device_serial_number=str(model.get("checkpoint_sha256", ""))[:16],  # the model is the device
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="SALIENCY",
        content_description=what[:64],
        series_description=f"ctsparse {what}"[:64],
    )
    pmap.copy_patient_and_study_information(headers[0])  # as they are: the map joins that study
    target_path = Path(out_dir) / f"{series_uid}.saliency.dcm"
    with atomic_write(target_path) as fh:
        pydicom.dcmwrite(fh, pmap, enforce_file_format=True)
    return target_path


@dataclass(frozen=True)
class MapResult:
    """What ``write_saliency_maps`` did for one explained DICOM series."""

    scan: str
    series_uid: str
    path: Path | None = None
    error: str | None = None


def write_saliency_maps(
    rows: Sequence[Mapping[str, Any]],
    sources: Sequence[Sequence[str | Path] | None],
    out_dir: str | Path,
    model: Mapping[str, Any],
) -> list[MapResult]:
    """A Parametric Map for every explained DICOM series; a failure is reported and the rest go on.

    Args:
        rows: ``ctsparse.explain.explain`` rows (its NIfTI map in ``files["map"]``), in input order.
        sources: per row, the series' files (``InputItem.series.files``; None for NIfTI inputs).
    """
    from ctsparse.io import read_volume

    results = []
    for row, files in zip(rows, sources, strict=True):
        if row.get("error") or not files or not row.get("series_uid"):
            continue  # a NIfTI input, or a scan explain could not explain (its row says why)
        scan, series_uid = str(row["path"]), str(row["series_uid"])
        try:
            saliency = read_volume(row["files"]["map"])
            path = write_saliency_map(
                saliency.array,
                saliency.affine,
                files,
                out_dir,
                model,
                scan=scan,
                method=str(row.get("method", "")),
                target=str(row.get("class", "")),
            )
        except CtsparseError as exc:
            results.append(MapResult(scan, series_uid, error=f"saliency map not written: {exc}"))
        except Exception as exc:  # one series' odd header must not stop the others' maps
            results.append(
                MapResult(scan, series_uid, error=f"saliency map not written: {type(exc).__name__}")
            )
        else:
            results.append(MapResult(scan, series_uid, path=path))
    return results
