"""How separable are the phantom classes by a simple non-deep cue?

For each phantom: kept voxels (>= -700 HU inside the filled body region), 26-connected
components, and the size of the largest component other than the body (an "island": a nodule not
touching vessels or pleura). Prints percentiles per class.

    python benchmarks/phantom_separability.py [--n 60] [--seed 7]
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from ctsparse.data.phantoms import case_rng, make_phantom, phantom_labels
from ctsparse.masks import body_region


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threshold", type=float, default=-700.0)
    args = ap.parse_args()
    islands: dict[str, list[int]] = {}
    for i, label in enumerate(phantom_labels(args.n, args.seed)):
        hu = make_phantom(label, case_rng(args.seed, i), vary_geometry=True).array
        keep = (hu >= args.threshold) & body_region(hu >= -500)
        lab, _ = ndimage.label(keep, structure=np.ones((3, 3, 3)))
        sizes = np.sort(np.bincount(lab.ravel())[1:])[::-1]
        islands.setdefault(label, []).append(int(sizes[1]) if len(sizes) > 1 else 0)
    for label, sizes in islands.items():
        p10, p50, p90 = np.percentile(sizes, [10, 50, 90])
        print(
            f"{label:>8}: largest island (voxels) p10 {p10:.0f}  median {p50:.0f}  "
            f"p90 {p90:.0f}  (n={len(sizes)})"
        )


if __name__ == "__main__":
    main()
