"""sparsify on small synthetic volumes whose answers can be counted by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ctsparse.config import PreprocessConfig
from ctsparse.errors import ScanError
from ctsparse.masks import fill_holes_in_plane
from ctsparse.sparsify import sparsify
from ctsparse.volume import Volume


def _affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def cube_in_air(shape=(12, 10, 8), lo=(3, 2, 1), hi=(7, 6, 5), hu=40.0, **kw) -> Volume:
    arr = np.full(shape, -1000.0, dtype=np.float32)
    arr[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = hu
    return Volume(arr, _affine(**kw), "cube.nii.gz")


def test_cube_exact_count_crop_and_affine():
    vol = cube_in_air(spacing=(0.5, 1.0, 2.0), origin=(10.0, -5.0, 3.0))
    sv = sparsify(vol, PreprocessConfig(features="hu"))
    assert sv.n_sites == 4 * 4 * 4
    assert sv.grid_shape == (4, 4, 4)
    assert sv.stats["crop_offset"] == [3, 2, 1]
    # site (0,0,0) is native voxel (3,2,1)
    np.testing.assert_allclose(sv.affine @ [0, 0, 0, 1], vol.affine @ [3, 2, 1, 1])
    np.testing.assert_allclose(sv.spacing, (0.5, 1.0, 2.0))
    assert sv.coords.dtype == np.int32 and sv.coords.flags.c_contiguous
    assert sv.feats.dtype == np.float32 and sv.feats.flags.c_contiguous
    assert sv.feats.shape == (64, 1)
    np.testing.assert_allclose(sv.feats, 0.04)  # 40 HU / 1000
    # Fortran order: sorted by z, then y, then x
    order = np.lexsort(sv.coords.T)
    assert np.array_equal(order, np.arange(sv.n_sites))
    st = sv.stats
    assert st["voxels_in"] == 960 and st["kept"] == 64
    assert st["dropped_threshold"] == 960 - 64 and st["dropped_body_mask"] == 0
    assert st["occupancy_input"] == pytest.approx(64 / 960)
    assert st["occupancy_cropped"] == pytest.approx(1.0)
    assert set(st["times"]) == {"resample", "threshold", "mask", "encode"}


def test_no_crop_keeps_grid_and_affine():
    vol = cube_in_air()
    sv = sparsify(vol, PreprocessConfig(features="hu", crop=False))
    assert sv.grid_shape == vol.shape
    np.testing.assert_array_equal(sv.affine, vol.affine)
    assert sv.coords.min(axis=0).tolist() == [3, 2, 1]


def test_window_clips_features():
    vol = cube_in_air(hu=3000.0)
    sv = sparsify(
        vol, PreprocessConfig(features="hu", window=[-1000.0, 1000.0], hu_center=0.0, hu_scale=1000.0)
    )
    np.testing.assert_allclose(sv.feats, 1.0)


def test_patch_features_k2():
    # cube 3..7 x 2..6 x 1..5 (odd start on z) -> blocks x 1..3, y 1..3, z 0..3
    vol = cube_in_air()
    sv = sparsify(vol, PreprocessConfig(features="patch", patch_size=2, crop=False))
    assert sv.feats.shape[1] == 8
    assert sv.n_sites == 3 * 2 * 3  # x blocks {1,2,3}, y {1,2}, z {0,1,2}
    assert sv.grid_shape == (6, 5, 4)
    # block (1,1,0) covers voxels x2..3, y2..3, z0..1: only x=3,z=1 voxels are tissue
    i = np.flatnonzero((sv.coords == [1, 1, 0]).all(axis=1))[0]
    block = sv.feats[i].reshape(2, 2, 2)
    assert block[1, 0, 1] == pytest.approx(0.04) and block[0, 0, 0] == pytest.approx(-1.0)
    # affine maps a site to the centre of its block
    np.testing.assert_allclose(sv.affine @ [1, 1, 0, 1], [2.5, 2.5, 0.5, 1.0])
    assert sv.coords.dtype == np.int32 and sv.coords.flags.c_contiguous


def test_patch_with_crop_pads_odd_extent():
    vol = cube_in_air(lo=(3, 2, 1), hi=(6, 5, 4))  # 3x3x3 cube: cropped then padded to 4x4x4
    sv = sparsify(vol, PreprocessConfig(features="patch", patch_size=2))
    assert sv.grid_shape == (2, 2, 2) and sv.n_sites == 8
    assert sv.feats.shape == (8, 8)
    np.testing.assert_allclose(sv.affine @ [0, 0, 0, 1], [3.5, 2.5, 1.5, 1.0])
    # padding beyond the cube counts as air
    assert sv.feats.min() == pytest.approx(-1.0)


def test_hu_range_threshold_and_body_mask_keeps_separate_bones():
    arr = np.full((20, 20, 10), -1000.0, dtype=np.float32)
    arr[2:18, 2:18, 1:9] = 40.0  # soft tissue body
    arr[4:6, 4:6, 3:5] = 700.0  # bone 1 (8 voxels)
    arr[12:15, 12:14, 3:5] = 900.0  # bone 2 (12 voxels), not touching bone 1
    arr[10, 10, 5] = 5000.0  # metal, above threshold_max
    vol = Volume(arr, _affine(), "bones.nii")
    cfg = PreprocessConfig(features="hu", threshold=200.0, threshold_max=3000.0, body_mask=True)
    sv = sparsify(vol, cfg)
    assert sv.n_sites == 20  # both bones survive: the body is found at -500
    assert sv.stats["dropped_body_mask"] == 0


def test_body_mask_drops_table():
    arr = np.full((20, 20, 10), -1000.0, dtype=np.float32)
    arr[3:15, 3:12, 1:9] = 40.0  # body: 12*9*8 = 864
    arr[3:15, 15:17, 0:10] = 300.0  # table, separated by air rows 12..14
    vol = Volume(arr, _affine(), "table.nii")
    sv = sparsify(vol, PreprocessConfig(features="hu"))
    assert sv.n_sites == 864
    assert sv.stats["dropped_body_mask"] == 12 * 2 * 10
    sv_all = sparsify(vol, PreprocessConfig(features="hu", body_mask=False))
    assert sv_all.n_sites == 864 + 240


def test_body_mask_keeps_a_nodule_floating_in_a_lung_but_drops_the_table():
    """A nodule is cut off from the chest wall by lung below the threshold: still anatomy."""
    hu = np.full((30, 30, 10), -1000.0, dtype=np.float32)
    hu[3:27, 8:27, :] = 40.0  # body
    hu[6:24, 11:24, :] = -850.0  # a lung, enclosed by the body wall in every axial slice
    hu[14:17, 16:19, 4:7] = 30.0  # a 27-voxel nodule inside it, touching nothing
    hu[3:27, 2:4, :] = 200.0  # the table, below the body, separated by air
    sv = sparsify(Volume(hu, _affine(), "lung"), PreprocessConfig(features="hu", crop=False, threshold=-500))
    kept = {tuple(c) for c in sv.coords.tolist()}
    assert (15, 17, 5) in kept
    assert (10, 3, 5) not in kept
    assert sv.n_sites == int(np.count_nonzero(hu[:, 8:, :] >= -500))


def test_diagonal_neighbours_are_connected():
    arr = np.full((6, 6, 6), -1000.0, dtype=np.float32)
    arr[1, 1, 1] = arr[2, 2, 2] = arr[3, 3, 3] = 0.0  # one 26-connected chain
    arr[5, 0, 5] = 0.0  # isolated
    sv = sparsify(Volume(arr, _affine(), "diag.nii"), PreprocessConfig(features="hu"))
    assert sv.n_sites == 3


def test_sparsify_with_spacing_records_grid():
    vol = cube_in_air(shape=(12, 10, 8), lo=(2, 2, 2), hi=(10, 8, 6))
    sv = sparsify(vol, PreprocessConfig(features="hu", spacing=[2.0, 2.0, 2.0], crop=False))
    assert sv.stats["grid_shape_resampled"] == [6, 5, 4]
    assert sv.grid_shape == (6, 5, 4)
    np.testing.assert_allclose(sv.spacing, (2.0, 2.0, 2.0))
    assert sv.n_sites == 4 * 3 * 2  # voxels 2..8 step 2 in x, 2..6 in y, 2..4 in z


@pytest.mark.parametrize("order", ["C", "F"])
def test_fill_holes_matches_scipy(order):
    from scipy import ndimage

    rng = np.random.default_rng(1)
    mask = np.asarray(rng.random((17, 13, 6)) < 0.55, order=order)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    expected = ndimage.binary_fill_holes(mask, structure=in_plane)
    np.testing.assert_array_equal(fill_holes_in_plane(mask), expected)


@pytest.mark.parametrize("features", ["hu", "patch"])
def test_same_sites_whatever_the_memory_layout(features):
    rng = np.random.default_rng(2)
    hu = np.full((21, 17, 11), -1000.0, dtype=np.float32)
    hu[3:18, 2:15, 1:10] = rng.normal(0, 300, size=(15, 13, 9)).astype(np.float32)
    cfg = PreprocessConfig(features=features, threshold=-200.0)
    a = sparsify(Volume(np.ascontiguousarray(hu), _affine(), "c"), cfg)
    b = sparsify(Volume(np.asfortranarray(hu), _affine(), "f"), cfg)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.feats, b.feats)
    assert a.grid_shape == b.grid_shape
    np.testing.assert_array_equal(np.lexsort(a.coords.T), np.arange(a.n_sites))  # (z, y, x) order


def test_nothing_survives_names_threshold_and_range():
    arr = np.full((4, 4, 4), -1000.0, dtype=np.float32)
    arr[0, 0, 0] = -800.0
    with pytest.raises(
        ScanError, match=r"no voxels survive the threshold of -500 HU \(HU range of the scan: -1000..-800\)"
    ):
        sparsify(Volume(arr, _affine(), "air.nii"), PreprocessConfig(features="hu"))


def test_nan_never_kept_and_patch_nan_becomes_air():
    vol = cube_in_air()
    arr = vol.array.copy()
    arr[3, 2, 1] = np.nan
    arr[0, 0, 0] = np.nan
    sv = sparsify(Volume(arr, vol.affine, "nan.nii"), PreprocessConfig(features="hu", crop=False))
    assert sv.n_sites == 63
    assert np.isfinite(sv.feats).all()
    # a NaN voxel inside a kept patch block takes the value of air: the same features, channel
    # for channel, as the scan with -1000 HU written there
    air = arr.copy()
    air[np.isnan(air)] = -1000.0
    cfg = PreprocessConfig(features="patch", patch_size=2)
    svp = sparsify(Volume(arr, vol.affine, "nan.nii"), cfg)
    ref = sparsify(Volume(air, vol.affine, "air.nii"), cfg)
    np.testing.assert_array_equal(svp.coords, ref.coords)
    np.testing.assert_array_equal(svp.feats, ref.feats)
    # the NaN corner (3, 2, 1) is channel 0 of the first block; the other 7 voxels are the cube
    (first,) = np.flatnonzero((svp.coords == 0).all(1))
    lo, hi = cfg.window or (-np.inf, np.inf)
    expected = (np.clip([-1000.0, 40.0], lo, hi) - cfg.hu_center) / cfg.hu_scale
    np.testing.assert_allclose(svp.feats[first], [expected[0], *[expected[1]] * 7], rtol=1e-6)
    allnan = np.full((3, 3, 3), np.nan, dtype=np.float32)
    with pytest.raises(ScanError, match="all NaN"):
        sparsify(Volume(allnan, _affine(), "nan.nii"), PreprocessConfig(features="hu"))


def test_dense_roundtrip_matches_features():
    vol = cube_in_air()
    sv = sparsify(vol, PreprocessConfig(features="patch", patch_size=2))
    dense = sv.dense()
    assert dense.shape == (8, *sv.grid_shape)
    c = sv.coords
    np.testing.assert_array_equal(dense[:, c[:, 0], c[:, 1], c[:, 2]].T, sv.feats)


# --- cache (reads real NIfTI files through ctsparse.io) ---------------------------------------


def _write_nifti(path, arr, spacing=(1.0, 1.0, 2.0)):
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr.astype(np.int16), np.diag([*spacing, 1.0])), str(path))
    return path


def test_cache_roundtrip_corrupt_file_and_key_changes(tmp_path):
    from ctsparse.sparsify import sparsify_cached

    scan = _write_nifti(tmp_path / "scan.nii.gz", cube_in_air().array)
    cache = tmp_path / "cache"
    cfg = PreprocessConfig(features="hu")
    sv1, hit1 = sparsify_cached(scan, cfg, cache)
    sv2, hit2 = sparsify_cached(scan, cfg, cache)
    assert (hit1, hit2) == (False, True)
    assert sv1.n_sites == sv2.n_sites == 64
    np.testing.assert_array_equal(sv1.coords, sv2.coords)
    np.testing.assert_array_equal(sv1.feats, sv2.feats)
    np.testing.assert_allclose(sv1.affine, sv2.affine)
    (entry,) = cache.glob("*.npz")

    entry.write_bytes(entry.read_bytes()[:100])  # truncated: ignored and rewritten
    sv3, hit3 = sparsify_cached(scan, cfg, cache)
    assert not hit3 and sv3.n_sites == 64
    assert sparsify_cached(scan, cfg, cache)[1]

    _, hit4 = sparsify_cached(scan, PreprocessConfig(features="hu", threshold=-400.0), cache)
    assert not hit4 and len(list(cache.glob("*.npz"))) == 2

    _write_nifti(scan, cube_in_air(hu=60.0).array)  # same name, new content
    sv5, hit5 = sparsify_cached(scan, cfg, cache)
    assert not hit5 and sv5.feats[0, 0] == pytest.approx(0.06)
    assert not list(cache.glob("*.tmp"))
