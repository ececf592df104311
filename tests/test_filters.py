"""The dot-enhancement (blob) channel: balls respond, tubes and walls much less."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctsparse.config import AugmentConfig, PreprocessConfig
from ctsparse.data import augment
from ctsparse.filters import dot_enhancement, symmetric_eigenvalues
from ctsparse.sparsify import candidate_sites, sparsify
from ctsparse.volume import Volume

HU_MAX = PreprocessConfig().blob_hu_max  # the default the pipeline passes


def _grid(shape=(40, 40, 40)):
    return np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")


def _lung_with(ball: bool, tube: bool, radius: float = 4.0) -> np.ndarray:
    x, y, z = _grid()
    hu = np.full(x.shape, -850.0, dtype=np.float32)
    if ball:
        hu[(x - 12) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 <= radius**2] = 40.0
    if tube:
        hu[(x - 28) ** 2 + (y - 20) ** 2 <= radius**2] = 40.0  # runs along z
    return hu


def test_ball_responds_far_more_than_a_tube_of_the_same_radius():
    hu = _lung_with(ball=True, tube=True)
    at = np.zeros(hu.shape, dtype=bool)
    at[12, 20, 20] = at[28, 20, 20] = True  # ball centre, then tube axis (C order)
    ball, tube = dot_enhancement(hu, (1.0, 1.0, 1.0), [2.0, 3.0], at, HU_MAX)
    assert ball > 0.3 and tube < ball / 5, (ball, tube)


def test_scale_normalization_sees_small_and_large_balls_alike():
    small = _lung_with(ball=True, tube=False, radius=3.0)
    large = _lung_with(ball=True, tube=False, radius=6.0)
    at = np.zeros(small.shape, dtype=bool)
    at[12, 20, 20] = True
    (a,) = dot_enhancement(small, (1.0, 1.0, 1.0), [1.5, 2.5, 4.0], at, HU_MAX)
    (b,) = dot_enhancement(large, (1.0, 1.0, 1.0), [1.5, 2.5, 4.0], at, HU_MAX)
    assert 0.5 < a / b < 2.0, (a, b)


def test_above_hu_max_the_response_measures_shape_not_density():
    soft, contrast = (_lung_with(ball=True, tube=False) for _ in range(2))
    contrast[contrast > 0] = 350.0  # a contrast-filled ball of the same shape
    at = np.zeros(soft.shape, dtype=bool)
    at[12, 20, 20] = True
    (a,) = dot_enhancement(soft, (1.0, 1.0, 1.0), [2.0, 3.0], at, HU_MAX)
    (b,) = dot_enhancement(contrast, (1.0, 1.0, 1.0), [2.0, 3.0], at, HU_MAX)
    assert a == b > 0.3
    (c,) = dot_enhancement(soft, (1.0, 1.0, 1.0), [2.0, 3.0], at, hu_max=400.0)
    (d,) = dot_enhancement(contrast, (1.0, 1.0, 1.0), [2.0, 3.0], at, hu_max=400.0)
    assert abs(d / c - 1200.0 / 890.0) < 0.05  # the response follows the density step


def _ball_and_tube_scan() -> tuple[Volume, PreprocessConfig]:
    """The ball-and-tube lung as a scan, and 2^3-patch preprocessing with the blob channel."""
    hu = _lung_with(ball=True, tube=True)
    hu[:, :, :2] = 40.0  # something body-like so the body mask has a largest component
    base = PreprocessConfig(
        threshold=-500, body_mask=False, features="patch", patch_size=2, blob_channel=True
    )
    return Volume(hu, np.eye(4), "blob.nii.gz"), base


def test_sparsify_appends_the_blob_channel_after_the_patch_values():
    hu = _lung_with(ball=True, tube=True)
    hu[:, :, :2] = 40.0  # something body-like so the body mask has a largest component
    vol = Volume(hu, np.eye(4), "blob.nii.gz")
    base = PreprocessConfig(threshold=-500, body_mask=False, features="patch", patch_size=2)
    plain = sparsify(vol, base)
    withblob = sparsify(vol, PreprocessConfig(**{**base.__dict__, "blob_channel": True}))
    assert withblob.n_channels == plain.n_channels + 1 == 9
    np.testing.assert_array_equal(withblob.coords, plain.coords)
    np.testing.assert_array_equal(withblob.feats[:, :8], plain.feats)
    blob = withblob.feats[:, 8]
    site_of = {tuple(c): i for i, c in enumerate(withblob.coords.tolist())}
    assert blob[site_of[(6, 10, 10)]] > 3 * blob[site_of[(14, 10, 10)]]  # ball block vs tube block


def test_the_occupancy_channel_sits_between_the_patch_values_and_the_blob_channel():
    vol, base = _ball_and_tube_scan()
    plain = sparsify(vol, base)
    marked = sparsify(vol, PreprocessConfig(**{**base.__dict__, "occupancy_channel": True}))
    assert marked.n_channels == plain.n_channels + 1 == 10
    np.testing.assert_array_equal(marked.coords, plain.coords)
    np.testing.assert_array_equal(marked.feats[:, :8], plain.feats[:, :8])
    np.testing.assert_array_equal(marked.feats[:, 8], np.ones(marked.n_sites, dtype=np.float32))
    np.testing.assert_array_equal(marked.feats[:, 9], plain.feats[:, 8])  # the blob channel stays last


def test_augment_moves_hu_channels_only():
    rng = np.random.default_rng(0)
    coords = np.array([[0, 0, 0], [3, 1, 2]], dtype=np.int32)
    feats = rng.normal(size=(2, 9)).astype(np.float32)
    from ctsparse.sparse_volume import SparseVolume

    sv = SparseVolume(
        coords, feats, (4, 2, 3), np.eye(4), {"features": "patch", "patch_size": 2, "hu_scale": 500.0}
    )
    p = augment.AugmentParams(flip_lr=True, angle_rad=0.0, scale=1.0, hu_shift=50.0)
    out = augment.apply(sv, p)
    order = np.argsort(out.coords[:, 0])[::-1]  # flipped: x reversed
    np.testing.assert_allclose(out.feats[order, 8], feats[:, 8])
    mirrored = feats[:, :8].reshape(-1, 2, 2, 2)[:, ::-1].reshape(2, 8) + 0.1
    np.testing.assert_allclose(out.feats[order, :8], mirrored, rtol=1e-6)
    assert augment.make_params(AugmentConfig(), rng).scale > 0


def test_rotation_and_scaling_resample_the_sites_without_holes_or_merges():
    from ctsparse.sparse_volume import SparseVolume

    g = np.indices((30, 30, 30)).reshape(3, -1).T
    solid = g[((g - 14.5) ** 2).sum(axis=1) <= 12**2].astype(np.int32)
    ids = np.arange(len(solid), dtype=np.float32)[:, None]  # each site carries its own row
    mark = np.array([[3.0, 4.0, 5.0, 1.0]])  # a finding's centre tells where the grid moved
    sv = SparseVolume(solid, ids, (30, 30, 30), np.eye(4), {"features": "hu"}, marks=mark)
    for angle, scale in [(0.17, 1.1), (-0.17, 0.9), (0.5, 1.0), (0.0, 1.08)]:
        out = augment.apply(sv, augment.AugmentParams(False, angle, scale, 0.0))
        assert len(np.unique(out.coords, axis=0)) == out.n_sites
        occupied = np.zeros(out.grid_shape, dtype=bool)
        occupied[tuple(out.coords.T)] = True
        assert not (ndimage.binary_fill_holes(occupied) & ~occupied).any()
        assert abs(out.n_sites / (len(solid) * scale**3) - 1) < 0.03
        # nearest neighbour: each cell, mapped back into the scan, lands in its source's cell
        c, s = np.cos(angle), np.sin(angle)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) * scale
        centre = np.full(3, 14.5)
        assert out.marks is not None
        low = (mark[0, :3] - centre) @ rot.T + centre - out.marks[0, :3]
        back = (out.coords + low - centre) @ np.linalg.inv(rot).T + centre
        src = solid[out.feats[:, 0].astype(int)]
        assert np.abs(back - src).max() <= 0.5 + 1e-6


def test_a_lone_site_survives_every_small_rotation_and_scaling():
    from ctsparse.sparse_volume import SparseVolume

    sv = SparseVolume(
        np.array([[5, 5, 5]], np.int32), np.ones((1, 2), np.float32), (10, 10, 10), np.eye(4), {}
    )
    for angle in np.linspace(-0.2, 0.2, 9):
        for scale in (0.9, 0.95, 1.0, 1.1):
            out = augment.apply(sv, augment.AugmentParams(False, float(angle), scale, 0.0))
            assert out.n_sites >= 1 and np.all(out.feats == 1.0)


def test_closed_form_eigenvalues_match_lapack_on_random_and_degenerate_matrices():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 3, 3)) * rng.uniform(1e-3, 1e3, (2000, 1, 1))
    a = (a + a.transpose(0, 2, 1)) / 2
    a[0] = 0.0  # all eigenvalues equal (zero)
    a[1] = 5.0 * np.eye(3)  # a multiple of the identity
    a[2] = np.diag([2.0, 2.0, -1.0])  # a double eigenvalue
    a[3] = np.diag([-3.0, 1.0, 1.0])
    entries = [a[:, i, j] for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))]
    got = np.stack(symmetric_eigenvalues(*entries), 1)
    want = np.linalg.eigvalsh(a)
    scale = np.maximum(np.abs(want).max(axis=1, keepdims=True), 1e-12)
    # a double eigenvalue puts arccos at +-1, where it keeps half of float64's digits: ~1e-8, far
    # below the float32 derivatives the filter feeds it
    assert np.all(np.abs(got - want) <= 1e-7 * scale)
    assert np.all(np.diff(got, axis=1) >= -1e-7 * scale)  # ascending


def _ball_in_lung(spacing: tuple[float, float, float]) -> tuple[Volume, np.ndarray]:
    """A box of soft tissue around an air-filled lung holding a 4 mm-radius ball; the ball's
    centre in world mm."""
    n, centre = (60, 60, 24), np.array([30.3, 29.6, 12.2])
    hu = np.full(n, -1000.0, dtype=np.float32)
    hu[5:55, 5:55, 2:22] = 40.0
    hu[12:48, 12:48, 5:19] = -850.0
    g = np.meshgrid(
        *((np.arange(k) - c) * s for k, c, s in zip(n, centre, spacing, strict=True)), indexing="ij"
    )
    hu[g[0] ** 2 + g[1] ** 2 + g[2] ** 2 <= 16.0] = 40.0
    return Volume(hu, np.diag([*spacing, 1.0]), "ball.nii.gz"), centre * np.array(spacing)


def _blob_near(vol: Volume, world: np.ndarray, **settings: object) -> float:
    sv = sparsify(vol, PreprocessConfig(threshold=-700, features="hu", blob_channel=True, **settings))
    xyz = (sv.affine @ np.c_[sv.coords, np.ones(len(sv.coords))].T).T[:, :3]
    return float(sv.feats[np.linalg.norm(xyz - world, axis=1) < 8.0, -1].max())


def test_the_blob_filter_runs_on_the_scans_own_grid_before_a_coarse_resampling():
    from ctsparse.sparsify import blob_on_scan_grid, read_spacing

    vol, ball = _ball_in_lung((3.3, 3.3, 5.0))
    native = _blob_near(vol, ball)
    coarse = [3.65, 3.65, 5.0]
    # the filter's maximum on the scan's grid reaches the resampled site it falls in, unchanged
    assert _blob_near(vol, ball, spacing=coarse) == native
    # filtered after resampling, the ball was blurred first
    assert _blob_near(vol, ball, spacing=coarse, blob_grid="resampled") < 0.9 * native
    cfg = PreprocessConfig(blob_channel=True, spacing=coarse)
    assert blob_on_scan_grid(cfg) and read_spacing(cfg) is None  # the reader leaves the grid alone
    # on grids finer than the smallest scale (2 mm) resampling first costs nothing: no detour
    fine = PreprocessConfig(blob_channel=True, spacing=[0.96, 0.96, 1.25])
    assert not blob_on_scan_grid(fine) and read_spacing(fine) == [0.96, 0.96, 1.25]
    assert read_spacing(PreprocessConfig(spacing=coarse)) == coarse  # no blob channel


def test_candidate_sites_keep_the_balls_around_the_strongest_separate_maxima():
    # a row of sites 1 mm apart with three peaks: 9.0 at x=10, 8.0 at x=12 (2 mm from the first:
    # the same candidate), 5.0 at x=40
    coords = np.zeros((60, 3), dtype=np.int32)
    coords[:, 0] = np.arange(60)
    score = np.zeros(60, dtype=np.float32)
    score[[10, 12, 40]] = [9.0, 8.0, 5.0]
    near = candidate_sites(coords, score, (1.0, 1.0, 1.0), k=2, radius_mm=3.0)
    assert np.flatnonzero(near).tolist() == [7, 8, 9, 10, 11, 12, 13, 37, 38, 39, 40, 41, 42, 43]
    one = candidate_sites(coords, score, (1.0, 1.0, 1.0), k=1, radius_mm=3.0)
    assert np.flatnonzero(one).tolist() == list(range(7, 14))
    # the radius is in mm: 2 mm sites along x halve the number of sites in reach
    two_mm = candidate_sites(coords, score, (2.0, 1.0, 1.0), k=1, radius_mm=3.0)
    assert np.flatnonzero(two_mm).tolist() == [9, 10, 11]


def test_sparsify_with_blob_candidates_keeps_the_ball_and_drops_the_far_tube():
    vol, base = _ball_and_tube_scan()
    every = sparsify(vol, base)
    few = sparsify(vol, PreprocessConfig(**{**base.__dict__, "blob_candidates": 1, "blob_candidate_mm": 6.0}))
    site_of = {tuple(c): i for i, c in enumerate(every.coords.tolist())}
    kept = {tuple(c) for c in few.coords.tolist()}
    assert (6, 10, 10) in kept and (14, 10, 10) not in kept  # the ball's block, not the tube's
    assert 0 < few.n_sites < every.n_sites / 4
    assert few.stats["sites"] == few.n_sites and "candidates" in few.stats["times"]
    for c, f in zip(few.coords.tolist(), few.feats, strict=True):  # kept sites keep their features
        np.testing.assert_array_equal(f, every.feats[site_of[tuple(c)]])
