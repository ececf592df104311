"""Mask helpers shared by sparsify and regions, on small readable masks, in both memory orders."""

from __future__ import annotations

import numpy as np
import pytest

from ctsparse.masks import body_region, bounding_box, largest_component


def _two_blobs() -> np.ndarray:
    mask = np.zeros((8, 7, 5), dtype=bool)
    mask[1:5, 1:5, 1:4] = True  # 48 voxels
    mask[6:8, 5:7, 0:2] = True  # 8 voxels, not 26-connected to the first
    return mask


@pytest.mark.parametrize("order", ["C", "F"])
def test_largest_component_keeps_the_bigger_blob(order: str) -> None:
    mask = np.asarray(_two_blobs(), order=order)
    out = largest_component(mask)
    assert int(out.sum()) == 48 and not out[6:8, 5:7, 0:2].any()
    assert bounding_box(out) == [(1, 5), (1, 5), (1, 4)]


@pytest.mark.parametrize("order", ["C", "F"])
def test_body_region_fills_in_plane_holes_only(order: str) -> None:
    mask = np.zeros((7, 7, 3), dtype=bool)
    mask[1:6, 1:6, :] = True
    mask[3, 3, 1] = False  # a hole inside one axial slice: filled
    mask[3, 3, 0] = False  # a dent open to the bottom face of the block, yet enclosed in its slice
    out = body_region(np.asarray(mask, order=order))
    assert out[3, 3, 1] and out[3, 3, 0]
    assert int(out.sum()) == 75


def test_bounding_box_of_nothing_is_none() -> None:
    assert bounding_box(np.zeros((3, 3, 3), dtype=bool)) is None
