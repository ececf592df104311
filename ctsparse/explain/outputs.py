"""An Explanation -> files: the map on the scan's grid (NIfTI), on the sites (.npz), a PNG, a JSON.

The NIfTI map of a NIfTI input is written in that file's own voxel order with its header's sform
and qform (codes included), so it opens aligned on the input in any viewer; a DICOM input has no
NIfTI of its own, and its map is in the frame `read_volume` returns (RAS+ voxel order, affine to
RAS+ mm). Values are 0..1 stored as uint8 with scl_slope 1/255: a quarter of float32 on a
512x512x400 scan and a plenty fine step for an overlay; the exact values are in the .npz.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as _nib
import numpy as np
import numpy.typing as npt

from ctsparse.explain.core import Explanation, nearest_voxel, sites_to_grid
from ctsparse.fileio import atomic_write, atomic_write_text
from ctsparse.io.nifti import is_nifti_name
from ctsparse.volume import Volume

nib: Any = _nib  # nibabel ships no type hints

# Display windows (min, max HU): lung (level -600, width 1500) and soft tissue (level 40, width 400)
LUNG_WINDOW = (-1350.0, 150.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def quantized_map(expl: Explanation) -> npt.NDArray[np.uint8]:
    """The map on the volume's grid as uint8 (0..255 for 0..1), made from the sites directly so
    that no float32 grid of the whole scan is ever allocated."""
    q = np.rint(np.clip(expl.site_values, 0.0, 1.0) * 255).astype(np.uint8)
    out: npt.NDArray[np.uint8] = sites_to_grid(expl.sites, q, expl.volume_shape, expl.volume_affine)
    return out


def _map_image(expl: Explanation, grid: npt.NDArray[np.uint8], reference: Path | None) -> Any:
    """The map as a NIfTI image on the reference NIfTI's grid, or on the Volume's grid."""
    if reference is not None and is_nifti_name(reference):
        ref = nib.load(str(reference))  # header only: the voxel data are never read here
        ornt = nib.orientations.io_orientation(ref.affine)
        # back from the RAS+ order read_nifti put it in to the file's own axis order
        data = nib.orientations.apply_orientation(grid, nib.orientations.ornt_transform(_RAS, ornt))
        img = nib.Nifti1Image(np.ascontiguousarray(data), ref.affine)
        img.set_sform(*ref.header.get_sform(coded=True))
        img.set_qform(*ref.header.get_qform(coded=True))
        img.header.set_xyzt_units(*ref.header.get_xyzt_units())
    else:
        img = nib.Nifti1Image(grid, expl.volume_affine)
        img.set_sform(expl.volume_affine, code=1)
        img.set_qform(expl.volume_affine, code=1)
        img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    img.header["descrip"] = f"ctsparse {expl.method} {expl.target}"[:79].encode()
    return img


def peak_voxel_of(img: Any, peak_mm: tuple[float, float, float], units_to_mm: float = 1.0) -> list[int]:
    """The voxel of `img` nearest to a RAS+ mm position (in the image's own index order)."""
    aff = np.array(img.affine, dtype=np.float64)
    aff[:3, :] *= units_to_mm
    return list(nearest_voxel(aff, peak_mm, img.shape))


def write_map_nifti(
    expl: Explanation, grid: npt.NDArray[np.uint8], path: Path, reference: Path | None = None
) -> list[int]:
    """Write the map (`quantized_map`); returns the peak's voxel index in the written file's order."""
    img = _map_image(expl, grid, reference)
    with atomic_write(path) as fh:
        fh.write(img.to_bytes() if path.suffix == ".nii" else _gzip(img.to_bytes()))
    units = img.header.get_xyzt_units()[0]
    return peak_voxel_of(img, expl.peak_mm, {"meter": 1000.0, "micron": 1e-3}.get(units, 1.0))


def _gzip(raw: bytes) -> bytes:
    import gzip

    # level 1: the map is mostly zeros, which any level squeezes; higher levels only cost time
    return gzip.compress(raw, compresslevel=1, mtime=0)


def write_sites_npz(expl: Explanation, path: Path) -> None:
    """The map on the sites alone, as the network saw them: coords (N, 3) int32 on the input
    grid, values (N,) float32 in 0..1, affine (site index -> RAS+ mm of the site's centre),
    grid_shape, and the method and class as strings."""
    sv = expl.sites
    with atomic_write(path) as fh:
        np.savez_compressed(
            fh,
            coords=sv.coords,
            values=expl.site_values,
            affine=sv.affine,
            grid_shape=np.array(sv.grid_shape, dtype=np.int32),
            method=np.array(expl.method),
            target=np.array(expl.target),
        )


def display_window(params: dict[str, Any]) -> tuple[float, float]:
    """The lung window for a lung-region model, else soft tissue."""
    return LUNG_WINDOW if params.get("region") == "lungs" else SOFT_TISSUE_WINDOW


@dataclass(frozen=True)
class CtViews:
    """The CT slices through a voxel (axial, coronal, sagittal), kept so that the volume itself
    can be freed before the map is written."""

    voxel: tuple[int, int, int]
    slices: tuple[npt.NDArray[np.float32], ...]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]


def ct_views(volume: Volume, voxel: tuple[int, int, int]) -> CtViews:
    i, j, k = voxel
    a = volume.array
    slices = (a[:, :, k].copy(), a[:, j, :].copy(), a[i, :, :].copy())
    return CtViews(voxel, slices, volume.spacing, volume.shape)


def write_png(expl: Explanation, views: CtViews, grid: npt.NDArray[np.uint8], path: Path) -> None:
    """Axial, coronal and sagittal slices through the peak: CT in grey, saliency overlaid
    (ctsparse/explain/png.py). The title names the class, probability and method only."""
    from ctsparse.explain.png import write_overlay_png

    lo, hi = display_window(expl.sites.params)
    i, j, k = views.voxel
    maps = (grid[:, :, k], grid[:, j, :], grid[i, :, :])
    p = expl.probabilities[expl.label]
    where = ", ".join(f"{v:.0f}" for v in expl.peak_mm)
    title = (
        f"predicted {expl.label} (p = {p:.2f}); {expl.method} map of {expl.target}\n"
        f"peak (+) at ({where}) mm RAS+; window {lo:g}..{hi:g} HU"
    )
    write_overlay_png(path, views.slices, maps, views.voxel, views.spacing, (lo, hi), title)


def report(expl: Explanation, peak_voxel: list[int], figures: dict[str, Any]) -> dict[str, Any]:
    """The JSON content: class, method, peak in voxels and mm, time and memory."""
    sv = expl.sites
    peak_site_mm = [round(float(v), 3) for v in expl.peak_mm]
    return {
        "method": expl.method,
        "class_explained": expl.target,
        "predicted": expl.label,
        "probabilities": expl.probabilities,
        "peak": {
            "voxel": peak_voxel,  # index into the written NIfTI map (the input file's own order)
            "mm_ras": peak_site_mm,  # the centre of the peak site
            "site": list(expl.peak_site),
            "raw_value": expl.raw_max,
        },
        "input_grid": {
            "shape": list(sv.grid_shape),
            "spacing_mm": [round(v, 4) for v in sv.spacing],
            "sites": sv.n_sites,
        },
        "method_info": expl.info,
        **figures,
    }


def write_json(path: Path, content: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(content, indent=2, default=_builtin) + "\n")


def _builtin(obj: Any) -> Any:
    """numpy scalars and arrays, which json cannot write, as Python numbers and lists."""
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
