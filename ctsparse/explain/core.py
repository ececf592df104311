"""One scan -> an Explanation: saliency on the sites, mapped back onto the scan's own voxel grid.

Geometry: every voxel of the volume takes the value of the site that covers it, found through
the affines alone (volume voxel -> RAS+ mm -> site index, rounded), so resampling, cropping and
patch blocks are undone exactly as `sparsify` made them: a patch site covers its k^3 block, a
resampled voxel the old voxels nearest its centre. Voxels outside every site are 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ctsparse.calibration import Decision
from ctsparse.errors import CtsparseError
from ctsparse.explain.methods import site_saliency
from ctsparse.io.geometry import axis_index_maps
from ctsparse.sparse_volume import SparseVolume
from ctsparse.volume import Volume

if TYPE_CHECKING:
    import torch

    from ctsparse.models.checkpoint import LoadedCheckpoint

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Explanation:
    """Saliency of one class on one scan.

    Attributes:
        method: gradcam | inputxgrad | occlusion.
        target: the class explained; label: the class predicted (the checkpoint's decision rule).
        probabilities: calibrated probability of every class.
        sites: what the network saw (coordinates, features, the input grid's affine).
        site_values: (N,) saliency per site, scaled so that the peak is 1 (all 0 when nothing
            speaks for the class); `raw_max` is the peak before scaling.
        volume_shape, volume_affine: the volume's grid (X, Y, Z) and its voxel -> RAS+ mm affine;
            `volume_map` is the map on it (made on first use: 4 bytes a voxel).
        peak_site: index of the peak site on the input grid; peak_mm its centre (RAS+ mm);
            peak_voxel the volume voxel nearest to it.
    """

    method: str
    target: str
    label: str
    probabilities: dict[str, float]
    sites: SparseVolume
    site_values: F32
    raw_max: float
    volume_shape: tuple[int, int, int]
    volume_affine: F64
    peak_site: tuple[int, int, int]
    peak_mm: tuple[float, float, float]
    peak_voxel: tuple[int, int, int]
    info: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def volume_map(self) -> F32:
        """float32 (X, Y, Z) on the volume's grid: each voxel the value of the site covering it."""
        grid: F32 = sites_to_grid(self.sites, self.site_values, self.volume_shape, self.volume_affine)
        return grid


def class_index(classes: list[str], name: str | None, predicted: int) -> int:
    """The class to explain: `name`, else the predicted one; an unknown name lists the classes."""
    if name is None:
        return predicted
    if name not in classes:
        raise CtsparseError(f"unknown class {name!r}; the checkpoint's classes are: {', '.join(classes)}")
    return classes.index(name)


def explain_volume(
    model: torch.nn.Module,
    volume: Volume,
    ckpt: LoadedCheckpoint,
    *,
    method: str = "gradcam",
    target: str | None = None,
    device: torch.device | None = None,
    sv: SparseVolume | None = None,
) -> Explanation:
    """Explain the model's answer on `volume` (read at its own resolution: the map lives on its
    grid). `model` is in eval mode on `device`; `sv` is `sparsify(volume, ckpt.config.preprocess)`
    when already computed.

    The class explained is `target`, or else the predicted one, read off the logits of the same
    pass that explains it.
    """
    import torch

    from ctsparse.models.registry import get_engine
    from ctsparse.sparsify import sparsify

    cfg = ckpt.config
    device = device or torch.device("cpu")
    engine = get_engine(cfg.model.backend)
    if sv is None:
        sv = sparsify(volume, cfg.preprocess)
    t1 = time.perf_counter()
    decision = Decision.from_dict(ckpt.extra.get("decision"))

    def choose(logits: F64) -> int:
        return class_index(
            ckpt.classes, target, int(decision.labels(decision.probabilities(logits[None]), ckpt.classes)[0])
        )

    result = site_saliency(model, engine, cfg.model, sv, choose, method, device)
    probs = decision.probabilities(result.logits[None])
    predicted, k = int(decision.labels(probs, ckpt.classes)[0]), result.target
    t2 = time.perf_counter()
    raw_max = float(result.values.max()) if result.values.size else 0.0
    values = (result.values / raw_max if raw_max > 0 else np.zeros_like(result.values)).astype(np.float32)
    peak = result.peak
    peak_site = tuple(int(v) for v in sv.coords[peak])
    peak_mm = site_mm(sv, peak)
    voxel = nearest_voxel(volume.affine, peak_mm, volume.shape)
    info = {
        **result.info,
        "score": f"logit of {ckpt.classes[k]!r}",
        "time_saliency_s": round(t2 - t1, 6),
    }
    if "last_stage_peak" in info:  # where Grad-CAM of the last stage alone would point
        info["last_stage_peak_mm"] = [round(float(v), 3) for v in site_mm(sv, info["last_stage_peak"])]
    return Explanation(
        method=method,
        target=ckpt.classes[k],
        label=ckpt.classes[predicted],
        probabilities={c: float(p) for c, p in zip(ckpt.classes, probs[0], strict=True)},
        sites=sv,
        site_values=values,
        raw_max=raw_max,
        volume_shape=volume.shape,
        volume_affine=np.asarray(volume.affine, dtype=np.float64),
        peak_site=(peak_site[0], peak_site[1], peak_site[2]),
        peak_mm=(float(peak_mm[0]), float(peak_mm[1]), float(peak_mm[2])),
        peak_voxel=(int(voxel[0]), int(voxel[1]), int(voxel[2])),
        info=info,
    )


def site_mm(sv: SparseVolume, site: int) -> F64:
    """The centre of site `site` of `sv`, RAS+ mm."""
    return (sv.affine @ np.array([*sv.coords[site], 1.0]))[:3]  # type: ignore[no-any-return]


def nearest_voxel(affine: F64, mm: Any, shape: Any) -> tuple[int, int, int]:
    """The voxel of a grid (voxel -> RAS+ mm `affine`) nearest to a RAS+ position, inside it.

    A patch site's centre lies between voxels: a tie goes to the lower index, with a tolerance,
    so that the same scan read from NIfTI and from DICOM (whose affines differ in the last bits)
    names the same voxel.
    """
    v = np.linalg.solve(affine, np.array([*mm[:3], 1.0]))[:3]
    i = np.clip(np.floor(v + 0.5 - 1e-4).astype(int), 0, np.array(shape[:3]) - 1)
    return (int(i[0]), int(i[1]), int(i[2]))


def sites_to_grid(sv: SparseVolume, values: Any, shape: tuple[int, int, int], affine: F64) -> Any:
    """`values` (one per site) on a voxel grid of `shape` whose voxel -> RAS+ mm is `affine`: each
    voxel takes the value of the site covering it, 0 where no site does. The grid has the dtype
    of `values` (uint8 values make a grid a quarter the size of float32)."""
    dense = np.zeros(sv.grid_shape, dtype=values.dtype)
    dense[sv.coords[:, 0], sv.coords[:, 1], sv.coords[:, 2]] = values
    to_site = np.linalg.solve(sv.affine, affine)  # voxel index -> continuous site index
    out = np.zeros(shape, dtype=values.dtype)
    lin = to_site[:3, :3]
    maps = axis_index_maps(to_site, shape, sv.grid_shape)
    if maps is not None:
        # axis-aligned (resampling, crop and patches never rotate): one index vector per axis
        idx, inside = maps
        if all(m.any() for m in inside):
            src = np.ix_(*(i[m] for i, m in zip(idx, inside, strict=True)))
            out[np.ix_(*(np.flatnonzero(m) for m in inside))] = dense[src]
        return out
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for k in range(shape[2]):  # a general affine, one slice at a time to bound the temporaries
        pts = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)], axis=0).astype(np.float64)
        s = np.rint(lin @ pts + to_site[:3, 3:4]).astype(np.int64)
        ok = np.all((s >= 0) & (s < np.array(sv.grid_shape)[:, None]), axis=0)
        plane = np.zeros(ii.size, dtype=values.dtype)
        plane[ok] = dense[s[0, ok], s[1, ok], s[2, ok]]
        out[:, :, k] = plane.reshape(ii.shape)
    return out
