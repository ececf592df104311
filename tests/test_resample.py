"""Resampling geometry on real files: grid, spacing and world positions, read-time vs in-memory."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctsparse.config import PreprocessConfig
from ctsparse.io import read_volume, write_dicom_series
from ctsparse.io.resample import axis_weights, new_length
from ctsparse.sparsify import resample, sparsify
from ctsparse.volume import Volume


def ball_volume(
    shape: tuple[int, int, int] = (40, 36, 24),
    spacing: tuple[float, float, float] = (0.7, 0.8, 1.5),
    centre_mm: tuple[float, float, float] = (3.3, -4.1, 2.2),
    radius_mm: float = 6.0,
) -> Volume:
    """A 600 HU ball in soft tissue (40 HU), drawn with sub-voxel accuracy (8^3 supersampling)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing) + [1.0, -2.0, 0.5]
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    occ = np.zeros(shape)
    axes = [np.arange(n) for n in shape]
    for dx in sub:
        for dy in sub:
            for dz in sub:
                i, j, k = np.meshgrid(axes[0] + dx, axes[1] + dy, axes[2] + dz, indexing="ij", sparse=True)
                x = affine[0, 0] * i + affine[0, 3] - centre_mm[0]
                y = affine[1, 1] * j + affine[1, 3] - centre_mm[1]
                z = affine[2, 2] * k + affine[2, 3] - centre_mm[2]
                occ += (x**2 + y**2 + z**2) <= radius_mm**2
    hu = 40.0 + 560.0 * occ / 512
    return Volume(np.round(hu).astype(np.float32), affine, "ball")


def centroid_mm(vol: Volume | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """World centroid of the excess over soft tissue (HU - 40)."""
    arr, aff = (vol.array, vol.affine) if isinstance(vol, Volume) else vol
    w = np.clip(arr.astype(np.float64) - 40.0, 0.0, None)
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in arr.shape), indexing="ij"), -1)
    c = (idx * w[..., None]).reshape(-1, 3).sum(0) / w.sum()
    return np.asarray(aff[:3, :3] @ c + aff[:3, 3])


def test_grid_is_centred_and_spacing_exact() -> None:
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    aff[:3, 3] = [5.0, 6.0, 7.0]
    arr = np.zeros((10, 10, 9), dtype=np.float32)
    out, new = resample(arr, aff, (2.0, 0.5, 1.0))
    assert out.shape == (5, 20, 27)  # floor(n * old / new)
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), (2.0, 0.5, 1.0))
    # the centre of the grid keeps its world position
    np.testing.assert_allclose(new @ [2, 9.5, 13, 1], aff @ [4.5, 4.5, 4, 1])
    # first and last voxels stay inside the old field of view (old voxel -0.5 .. n-0.5)
    first = np.linalg.solve(aff, new @ [0, 0, 0, 1])[:3]
    last = np.linalg.solve(aff, new @ [4, 19, 26, 1])[:3]
    assert np.all(first - np.array([1.0, 0.25, 1 / 6]) >= -0.5 - 1e-9)
    assert np.all(last + np.array([1.0, 0.25, 1 / 6]) <= np.array([9.5, 9.5, 8.5]) + 1e-9)


def test_integer_factor_is_a_block_mean_and_weights_sum_to_one() -> None:
    arr = np.random.default_rng(0).normal(size=(6, 4, 9)).astype(np.float32)
    out, _ = resample(arr, np.diag([1.0, 2.0, 1.0, 1.0]), (2.0, 4.0, 3.0))
    expected = arr.reshape(3, 2, 2, 2, 3, 3).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    for n, r in [(512, 3.65 / 0.7), (7, 1.3), (5, 0.4), (1, 2.0)]:
        w, _ = axis_weights(n, r)
        assert w.shape == (new_length(n, r), n)
        np.testing.assert_allclose(np.asarray(w.sum(axis=1)).ravel(), 1.0, atol=1e-6)


def test_downsampling_is_anti_aliased() -> None:
    # 1-voxel stripes of +-1000 HU: point sampling at a 5.2x coarser grid keeps +-1000, an area
    # average leaves at most one unmatched stripe per new voxel: |value| <= 1000 / 5.2
    stripes = np.where(np.arange(104) % 2 == 0, 1000.0, -1000.0).astype(np.float32)
    arr = np.broadcast_to(stripes[:, None, None], (104, 2, 2)).copy()
    out, _ = resample(arr, np.eye(4), (5.2, 1.0, 1.0))
    assert out.shape[0] == 20
    assert np.abs(out).max() <= 1000.0 / 5.2 + 1e-3


def test_upsampling_a_ramp_is_exact_inside() -> None:
    ramp = np.broadcast_to(np.arange(9, dtype=np.float32) * 10, (2, 2, 9)).copy()
    out, new = resample(ramp, np.diag([1.0, 1.0, 3.0, 1.0]), (1.0, 1.0, 1.0))
    assert out.shape[2] == 27
    k = np.arange(27)
    old_index = np.linalg.solve(np.diag([1.0, 1.0, 3.0, 1.0]), new @ np.stack([0 * k, 0 * k, k, 0 * k + 1]))[
        2
    ]
    inside = (old_index >= 0) & (old_index <= 8)
    np.testing.assert_allclose(out[0, 0, inside], 10 * old_index[inside], atol=1e-4)


def test_nifti_resampled_on_read_keeps_world_positions(tmp_path: Path) -> None:
    vol = ball_volume()
    # stored the way many converters write it: x and y reversed (LPS-like), z reversed too
    affine = vol.affine.copy()
    stored = vol.array[::-1, ::-1, ::-1]
    for axis in range(3):
        affine[:3, 3] += vol.affine[:3, axis] * (vol.shape[axis] - 1)
        affine[:3, axis] = -vol.affine[:3, axis]
    path = tmp_path / "ball.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored).astype(np.int16), affine), str(path))
    spacing = (2.1, 1.9, 3.7)
    full = read_volume(path)
    small = read_volume(path, spacing=spacing)
    np.testing.assert_allclose(small.spacing, spacing)
    assert small.meta["resampled_from"] == {"shape": [40, 36, 24], "spacing": pytest.approx([0.7, 0.8, 1.5])}
    in_memory = resample(full.array, full.affine, spacing)
    np.testing.assert_allclose(small.affine, in_memory[1], atol=1e-9)
    np.testing.assert_allclose(small.array, in_memory[0], atol=1e-3)
    # the ball's world centroid moves by far less than a voxel of either grid
    np.testing.assert_allclose(centroid_mm(full), (3.3, -4.1, 2.2), atol=0.02)
    np.testing.assert_allclose(centroid_mm(small), (3.3, -4.1, 2.2), atol=0.1)


@pytest.mark.parametrize("slice_axis", [2, 1])
def test_dicom_resampled_on_read_equals_read_then_resample(tmp_path: Path, slice_axis: int) -> None:
    vol = ball_volume()
    write_dicom_series(vol, tmp_path / "dcm", slice_axis=slice_axis)  # in-plane axes to +L/+P
    spacing = (2.1, 1.9, 3.7)
    full = read_volume(tmp_path / "dcm")
    small = read_volume(tmp_path / "dcm", spacing=spacing)
    expected, expected_affine = resample(full.array, full.affine, spacing)
    assert small.shape == expected.shape == (13, 15, 9)
    np.testing.assert_allclose(small.affine, expected_affine, atol=1e-6)
    np.testing.assert_allclose(small.array, expected, atol=1e-3)
    np.testing.assert_allclose(small.spacing, spacing, rtol=1e-9)
    assert small.meta["resampled_from"]["shape"] == [40, 36, 24]
    np.testing.assert_allclose(centroid_mm(small), (3.3, -4.1, 2.2), atol=0.1)
    # sparsify sees the target spacing and does not resample again: the same sites either way
    cfg = PreprocessConfig(features="hu", spacing=list(spacing), threshold=300.0, body_mask=False)
    a, b = sparsify(full, cfg), sparsify(small, cfg)
    assert b.stats["grid_shape_in"] == a.stats["grid_shape_in"] == [40, 36, 24]
    assert b.stats["grid_shape_resampled"] == a.stats["grid_shape_resampled"] == [13, 15, 9]
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)


def test_dicom_padding_is_air_before_resampling(tmp_path: Path) -> None:
    vol = ball_volume((20, 20, 4), (1.0, 1.0, 2.0))
    arr = vol.array.copy()
    arr[:4] = -3024.0  # outside the reconstruction circle: stored -2000 with intercept -1024
    write_dicom_series(Volume(arr, vol.affine, "x"), tmp_path, PixelPaddingValue=-2000)
    out = read_volume(tmp_path, spacing=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(out.array[:2], -1024.0)  # padding averaged as air, not -3024
    np.testing.assert_allclose(out.array[2:], resample(arr, vol.affine, (2.0, 2.0, 2.0))[0][2:], atol=1e-3)


def test_resampled_sites_keep_world_positions() -> None:
    """Site coordinates through the SparseVolume affine land on the ball, whatever the spacing."""
    vol = ball_volume()
    for spacing in ([0.7, 0.8, 1.5], [2.0, 2.0, 2.0], [3.65, 3.65, 5.0]):
        sv = sparsify(vol, PreprocessConfig(features="hu", spacing=spacing, threshold=250.0, body_mask=False))
        world = sv.affine[:3, :3] @ sv.coords.T.astype(float) + sv.affine[:3, 3:4]
        np.testing.assert_allclose(world.mean(axis=1), (3.3, -4.1, 2.2), atol=max(spacing) / 2)
        np.testing.assert_allclose(sv.spacing, spacing)
