"""An Explanation -> files: the map on the scan's grid (NIfTI), on the sites (.npz), a PNG, a JSON.

The NIfTI map of a NIfTI input is written in that file's own voxel order with its header's sform
and qform (codes included), so it opens aligned on the input in any viewer; a DICOM input has no
NIfTI of its own, and its map is in the frame `read_volume` returns (RAS+ voxel order, affine to
RAS+ mm). Values are 0..1 stored as uint8 with scl_slope 1/255: a quarter of float32 on a
512x512x400 scan and a plenty fine step for an overlay; the exact values are in the .npz.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as _nib
import numpy as np

from ctsparse.explain.core import Explanation, nearest_voxel
from ctsparse.fileio import atomic_write, atomic_write_text
from ctsparse.io.nifti import is_nifti_name
from ctsparse.volume import Volume

nib: Any = _nib  # nibabel ships no type hints

# Display windows (min, max HU): lung (level -600, width 1500) and soft tissue (level 40, width 400)
LUNG_WINDOW = (-1350.0, 150.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def _map_image(expl: Explanation, reference: Path | None) -> Any:
    """The map as a NIfTI image on the reference NIfTI's grid, or on the Volume's grid."""
    q = np.rint(np.clip(expl.volume_map, 0.0, 1.0) * 255).astype(np.uint8)
    if reference is not None and is_nifti_name(reference):
        ref = nib.load(str(reference))  # header only: the voxel data are never read here
        ornt = nib.orientations.io_orientation(ref.affine)
        # back from the RAS+ order read_nifti put it in to the file's own axis order
        data = nib.orientations.apply_orientation(q, nib.orientations.ornt_transform(_RAS, ornt))
        img = nib.Nifti1Image(np.ascontiguousarray(data), ref.affine)
        img.set_sform(*ref.header.get_sform(coded=True))
        img.set_qform(*ref.header.get_qform(coded=True))
        img.header.set_xyzt_units(*ref.header.get_xyzt_units())
    else:
        img = nib.Nifti1Image(q, expl.volume_affine)
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


def write_map_nifti(expl: Explanation, path: Path, reference: Path | None = None) -> list[int]:
    """Write the map; returns the peak's voxel index in the written file's own order."""
    img = _map_image(expl, reference)
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


def write_png(expl: Explanation, volume: Volume, path: Path) -> None:
    """Axial, coronal and sagittal slices through the peak: CT in grey, saliency overlaid.

    Radiological convention: the patient's right on the image's left; anterior up (axial),
    superior up (coronal, sagittal); sagittal with anterior on the left. No patient data:
    the title names the class, its probability and the method only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = display_window(expl.sites.params)
    i, j, k = expl.peak_voxel
    sx, sy, sz = volume.spacing
    nx, ny, nz = volume.shape
    # (title, CT slice, map slice, width and height in mm, peak in mm, edge letters l/r/b/t);
    # every view's x axis is inverted: the patient's right (sagittal: anterior) on the left
    views = [
        ("axial", volume.array[:, :, k], expl.volume_map[:, :, k], (nx * sx, ny * sy), (i, j), "RLPA"),
        ("coronal", volume.array[:, j, :], expl.volume_map[:, j, :], (nx * sx, nz * sz), (i, k), "RLIS"),
        ("sagittal", volume.array[i, :, :], expl.volume_map[i, :, :], (ny * sy, nz * sz), (j, k), "APIS"),
    ]
    steps = {"axial": (sx, sy), "coronal": (sx, sz), "sagittal": (sy, sz)}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), layout="constrained", facecolor="black")
    for ax, (name, ct, sal, (w, h), (a, b), letters) in zip(axes, views, strict=True):
        extent = (0.0, w, 0.0, h)
        ax.imshow(ct.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent, interpolation="nearest")
        masked = np.ma.masked_less_equal(sal.T, 0.0)
        ax.imshow(masked, cmap="inferno", vmin=0, vmax=1, alpha=0.45, origin="lower", extent=extent)
        da, db = steps[name]
        ax.plot([(a + 0.5) * da], [(b + 0.5) * db], marker="+", color="cyan", markersize=14, mew=1.5)
        ax.invert_xaxis()
        ax.set_title(name, color="white")
        ax.set_xticks([])
        ax.set_yticks([])
        for pos, text in zip([(0.03, 0.5), (0.97, 0.5), (0.5, 0.03), (0.5, 0.97)], letters, strict=True):
            ax.text(*pos, text, color="yellow", transform=ax.transAxes, ha="center", va="center")
    p = expl.probabilities[expl.label]
    fig.suptitle(
        f"predicted {expl.label} (p = {p:.2f}); {expl.method} map of {expl.target}; "
        f"peak at ({', '.join(f'{v:.0f}' for v in expl.peak_mm)}) mm RAS+; window {lo:g}..{hi:g} HU",
        color="white",
    )
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=90, facecolor="black")
    plt.close(fig)


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
