"""preprocess.region = lungs: hand-built chests whose answers are known, and a real phantom."""

from __future__ import annotations

import numpy as np
import pytest

from ctsparse.config import PreprocessConfig
from ctsparse.data.phantoms import case_rng, make_phantom
from ctsparse.errors import ConfigError, ScanError
from ctsparse.sparsify import sparsify
from ctsparse.volume import Volume


def _chest(nodule_at_wall: bool = False) -> Volume:
    """Body 40 HU in air, two air lungs, a vessel and a nodule in the right one, a bone outside
    the lungs; 2 mm voxels. The tests read sites as voxels, so they ask for HU features."""
    hu = np.full((60, 50, 30), -1000.0, dtype=np.float32)
    hu[5:55, 5:45, 2:28] = 40.0  # body
    hu[10:24, 10:40, 5:25] = -850.0  # right lung (low x)
    hu[36:50, 10:40, 5:25] = -850.0  # left lung; 24 mm of mediastinum between them
    hu[15:18, 12:38, 14:16] = 40.0  # a vessel crossing the right lung
    if nodule_at_wall:
        hu[10:14, 20:24, 10:14] = 40.0  # touches the lung's lateral wall
    else:
        hu[20:24, 20:24, 10:14] = 40.0  # floating nodule
    hu[28:32, 46:48, 10:20] = 700.0  # spine-like bone behind the lungs, outside them
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    return Volume(hu, a, "chest.nii.gz")


def _kept_voxels(sv) -> set[tuple[int, int, int]]:
    off = np.array(sv.stats["crop_offset"])
    return {tuple(int(v) for v in c + off) for c in sv.coords}


def test_lungs_keep_what_is_inside_them_and_drop_the_rest():
    vol = _chest()
    body = sparsify(vol, PreprocessConfig(threshold=-500, features="hu"))
    lungs = sparsify(vol, PreprocessConfig(threshold=-500, region="lungs", features="hu"))
    kept = _kept_voxels(lungs)
    assert (21, 21, 11) in kept  # nodule
    assert (16, 20, 14) in kept  # vessel
    assert (30, 47, 15) not in kept  # bone outside the lungs
    assert (7, 7, 3) not in kept  # body wall corner far from the lungs
    assert (30, 25, 15) not in kept  # mediastinum between the lungs
    assert lungs.n_sites < body.n_sites / 2
    assert lungs.stats["dropped_region"] == body.n_sites - lungs.n_sites


def test_closing_pulls_a_juxta_pleural_nodule_into_the_region():
    vol = _chest(nodule_at_wall=True)
    closed = _kept_voxels(sparsify(vol, PreprocessConfig(threshold=-500, region="lungs", features="hu")))
    assert {(10, 21, 11), (12, 22, 12)} <= closed
    open_ = _kept_voxels(
        sparsify(vol, PreprocessConfig(threshold=-500, region="lungs", lung_closing_mm=0.0, features="hu"))
    )
    # without the closing only the one-voxel rim next to the air is kept
    assert (10, 21, 11) not in open_ and (13, 21, 11) in open_


def _fine(vol: Volume, k: int) -> Volume:
    """`vol` on voxels k times finer along each axis (every voxel repeated k^3 times)."""
    hu = vol.array.repeat(k, 0).repeat(k, 1).repeat(k, 2)
    return Volume(hu, np.diag([*(np.asarray(vol.spacing) / k), 1.0]), vol.source)


def test_on_a_fine_grid_the_region_runs_on_blocks_and_matches_the_full_resolution_one():
    from ctsparse.regions import block_factors

    vol = _fine(_chest(nodule_at_wall=True), 2)  # 1 mm voxels: blocks of 2^3 at lung_grid_mm 2
    assert block_factors(vol.spacing, 2.0) == [2, 2, 2]
    assert block_factors((2.0, 2.0, 2.5), 2.0) == [1, 1, 1]
    cfg = PreprocessConfig(threshold=-500, region="lungs", features="hu")
    assert cfg.lung_grid_mm == 2.0
    blocks = _kept_voxels(sparsify(vol, cfg))
    full_cfg = PreprocessConfig(threshold=-500, region="lungs", features="hu", lung_grid_mm=None)
    full = _kept_voxels(sparsify(vol, full_cfg))
    # the juxta-pleural nodule (2 mm voxels 10..13, 20..23, 10..13 above) is pulled in on blocks too
    nodule = {(x, y, z) for x in range(20, 28) for y in range(40, 48) for z in range(20, 28)}
    assert nodule <= blocks and nodule <= full
    assert len(blocks ^ full) <= 0.02 * len(full)


def test_scan_without_lungs_is_refused_with_one_line():
    hu = np.full((30, 30, 20), -1000.0, dtype=np.float32)
    hu[5:25, 5:25, 2:18] = 40.0  # solid body, e.g. a head or a limb
    with pytest.raises(ScanError, match=r"no (air inside the body|lungs found).*region is 'lungs'"):
        sparsify(Volume(hu, np.eye(4), "head.nii.gz"), PreprocessConfig(region="lungs"))


def test_lungs_need_the_body_mask():
    with pytest.raises(ConfigError, match=r"preprocess\.region"):
        sparsify(_chest(), PreprocessConfig(region="lungs", body_mask=False))


def test_phantom_nodule_survives_and_most_of_the_body_goes():
    label = "nodule"
    vol = make_phantom(label, case_rng(3, 0))
    cfg = PreprocessConfig(threshold=-700, region="lungs", features="hu")
    lungs = sparsify(vol, cfg)
    body = sparsify(vol, PreprocessConfig(threshold=-700, features="hu"))
    centre = tuple(round(v) for v in vol.meta["nodule_center_voxel"])  # type: ignore[union-attr]
    assert centre in _kept_voxels(lungs)
    assert lungs.n_sites < body.n_sites / 3


def _ellipsoid(x, y, z, centre, semi):
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + (
        (z - centre[2]) / semi[2]
    ) ** 2 <= 1.0


def _head(spacing: tuple[float, float, float], holder: bool = True) -> Volume:
    """A head CT: scalp, a +700 HU skull and brain in air, with a 14 mL frontal sinus, two 19 mL
    maxillary sinuses opening into the nasal cavity and pharynx (~65 mL of air together, open to
    the outside only at the nostrils), a sphenoid sinus, mastoid air cells of ~1.4 mL a side and
    (holder=True) a head holder whose side pads touch the head, so the 15 mm of air between them
    lies inside the body outline (~0.4 L)."""
    fov = ((-100.0, 100.0), (-120.0, 120.0), (-70.0, 90.0))
    axes = [np.arange(lo + s / 2, hi, s, dtype=np.float32) for (lo, hi), s in zip(fov, spacing, strict=True)]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    a, b, c = 72.0, 92.0, 105.0
    hu = np.full((len(axes[0]), len(axes[1]), len(axes[2])), -1000.0, dtype=np.float32)
    outer = _ellipsoid(x, y, z, (0, 0, 0), (a, b, c))
    hu[outer] = 40.0  # scalp
    hu[_ellipsoid(x, y, z, (0, 0, 0), (a - 5, b - 5, c - 5))] = 700.0  # skull
    hu[_ellipsoid(x, y, z, (0, 0, 0), (a - 12, b - 12, c - 12))] = 35.0  # brain, face soft tissue
    hu[_ellipsoid(x, y, z, (0, 75, 15), (26, 15, 24)) & outer] = 700.0  # frontal bone
    air = _ellipsoid(x, y, z, (0, 75, 15), (20, 9, 18))  # frontal sinus, 14 mL
    for side in (-1, 1):
        air |= _ellipsoid(x, y, z, (30 * side, 50, -50), (14, 18, 18))  # maxillary sinus, 19 mL
        ostium = (np.abs(x) > 8) & (np.abs(x) < 24) & (np.abs(y - 50) < 2) & (np.abs(z + 40) < 3)
        air |= ostium & (x * side > 0)
    air |= (np.abs(x) < 9) & (y > 40) & (y < 70) & (z < -30)  # nasal cavity
    air |= (np.abs(x) < 9) & (y > 60) & (z < -62)  # nostrils: the cavity opens to the outside
    air |= ((x**2 + (y - 25) ** 2) < 100) & (z < -35)  # pharynx
    air |= (np.abs(x) < 9) & (y > 20) & (y < 41) & (z > -45) & (z < -35)  # choanae
    air |= _ellipsoid(x, y, z, (0, 25, -25), (12, 10, 9))  # sphenoid sinus
    rng = np.random.default_rng(0)
    for side in (-1, 1):
        for cx, cy, cz in rng.uniform(-7, 7, size=(12, 3)):  # mastoid air cells, 3 mm radius
            air |= _ellipsoid(x, y, z, (55 * side + cx, -15 + cy, -35 + cz), (3, 3, 3))
    hu[air] = -1000.0
    if holder:
        scale = np.sqrt(np.clip(1 - (z / c) ** 2, 0, None))
        q_in = (x / (a * scale + 15)) ** 2 + (y / (b * scale + 15)) ** 2
        q_out = (x / (a * scale + 19)) ** 2 + (y / (b * scale + 19)) ** 2
        shell = (q_in > 1) & (q_out <= 1) & (y < -20) & (z < 60)
        pads = (q_out <= 1) & ~outer & (np.abs(y + 22) < 2) & (z < 60)
        hu[np.broadcast_to(shell | pads, hu.shape)] = 150.0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [fov[0][0] + spacing[0] / 2, fov[1][0] + spacing[1] / 2, fov[2][0] + spacing[2] / 2]
    return Volume(hu, affine, "head.nii.gz")


@pytest.mark.parametrize(
    ("geometry", "grid", "holder"),
    [
        ((0.5, 0.5, 5.0), None, True),
        ((0.5, 0.5, 5.0), None, False),
        ((1.0, 1.0, 1.0), [3.0, 3.0, 3.0], True),
        ((0.5, 0.5, 5.0), [4.0, 4.0, 5.0], False),
    ],
)
def test_head_ct_is_refused_for_a_lung_region(geometry, grid, holder):
    vol = _head(geometry, holder)
    body = sparsify(vol, PreprocessConfig(spacing=grid))  # the head itself is a fine scan
    assert body.n_sites > 0
    with pytest.raises(ScanError, match=r"no lungs found.*region is 'lungs'") as err:
        sparsify(vol, PreprocessConfig(spacing=grid, region="lungs"))
    assert "\n" not in str(err.value)


def test_air_caught_by_a_head_holder_is_not_a_lung():
    from ctsparse.masks import body_region
    from ctsparse.regions import NoRegionError, lung_region

    vol = _head((1.0, 1.0, 2.0))
    hu = vol.array
    body = body_region(hu >= -500)
    trapped_ml = float(np.count_nonzero(body & (hu < -400))) * 2.0 / 1000.0
    assert trapped_ml > 400  # the gap between head and holder is inside the outline
    with pytest.raises(NoRegionError, match="outline"):
        lung_region(hu, body, (1.0, 1.0, 2.0))


@pytest.fixture(scope="module")
def head_airway():
    """The head without a holder: its largest air inside the outline is the nasal airway with
    the maxillary sinuses (53 mL), which the former single rule (>= 50 mL) took for a lung."""
    from ctsparse.masks import body_region

    vol = _head((0.5, 0.5, 5.0), holder=False)
    return vol.array, body_region(vol.array >= -500), vol.spacing


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("size", "too small for a lung of a body 13 cm across"),
        ("outline", "lies along the body's outline"),
        ("fraction", r"fill \d+\.\d% of the body in their slices"),
    ],
)
def test_each_lung_rule_alone_refuses_the_head_airway(head_airway, monkeypatch, rule, message):
    from ctsparse import regions

    off = {"size": ("LUNG_WIDTH_FRACTION", 0.0), "outline": ("NEAR_OUTLINE_MAX", 1.0)}
    off["fraction"] = ("MIN_LUNG_FRACTION", 0.0)
    for name, (constant, value) in off.items():
        if name != rule:
            monkeypatch.setattr(regions, constant, value)
    with pytest.raises(regions.NoRegionError, match=message):
        regions.lung_region(*head_airway)
    for constant, value in off.values():
        monkeypatch.setattr(regions, constant, value)
    # with every rule off the airway passes (no closing: a 10 mm ball at 0.5 mm is slow)
    assert regions.lung_region(*head_airway, closing_mm=0.0).any()


@pytest.mark.parametrize("grid", [None, [8.0, 8.0, 10.0]])
def test_phantom_chests_are_accepted_at_native_and_coarse_grids(grid):
    for seed in range(3):
        vol = make_phantom("normal", case_rng(seed, 1), vary_geometry=True)
        sv = sparsify(vol, PreprocessConfig(threshold=-700, region="lungs", spacing=grid))
        assert sv.stats["dropped_region"] > 0 and sv.n_sites > 0


def test_pydicom_ct_small_is_refused():
    from ctsparse.io import read_volume
    from tests.io_helpers import PYDICOM_DATA

    vol = read_volume(PYDICOM_DATA / "CT_small.dcm")  # one 128 x 128 slice, 85 mm across
    assert sparsify(vol, PreprocessConfig()).n_sites > 0
    with pytest.raises(ScanError, match=r"no lungs found: the largest air region .* mL\)"):
        sparsify(vol, PreprocessConfig(region="lungs"))
