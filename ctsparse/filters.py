"""Image filters that become extra sparse feature channels.

`dot_enhancement` is the multiscale Hessian "dot" filter of lung-nodule CAD (Li, Sone & Doi,
Med. Phys. 30(8), 2003): a bright blob has three strongly negative Hessian eigenvalues, a vessel
(a bright tube) only two and a wall only one, so

    dot = |lambda_small|^2 / |lambda_big|   where all three eigenvalues are negative, else 0

is large at the centre of round objects and small along vessels and walls. The eigenvalues are
scale-normalized (sigma^2 * Hessian) and the maximum over scales is kept, so blobs of radius about
sigma * sqrt(3) respond alike whatever their size.

The Gaussian derivatives run on the whole (cropped) grid; the eigenvalues are only computed at the
voxels asked for, which for a lung region is a small fraction of the grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

# HU range the filter sees: bone and contrast above soft tissue would otherwise swamp the nodule's
# contrast against lung (-850 .. +40)
CLIP_HU = (-1000.0, 200.0)
SCALE = 100.0  # a 10 mm nodule of +40 HU in lung responds ~50 .. 120 before this division


def dot_enhancement(
    hu: FloatArray, spacing: Sequence[float], scales_mm: Sequence[float], at: BoolArray
) -> npt.NDArray[np.float32]:
    """Max-over-scales dot response at the voxels of `at` (in C order of `at`), divided by SCALE."""
    from scipy import ndimage

    x = np.clip(hu, *CLIP_HU).astype(np.float32)
    idx = np.nonzero(at)
    best = np.zeros(len(idx[0]), dtype=np.float32)
    sp = [float(s) for s in spacing]
    for s in scales_mm:
        sigma = [s / v for v in sp]
        h = np.empty((len(idx[0]), 3, 3), dtype=np.float32)
        for i in range(3):
            for j in range(i, 3):
                order = [0, 0, 0]
                order[i] += 1
                order[j] += 1
                d = ndimage.gaussian_filter(x, sigma, order=order, mode="nearest", truncate=3.0)
                h[:, i, j] = h[:, j, i] = d[idx] * np.float32(s * s / (sp[i] * sp[j]))
        ev = np.linalg.eigvalsh(h)  # ascending
        mag = np.abs(ev)
        dot = np.where(ev[:, 2] < 0, mag.min(axis=1) ** 2 / np.maximum(mag.max(axis=1), 1e-3), 0.0)
        np.maximum(best, dot.astype(np.float32), out=best)
    return best / np.float32(SCALE)
