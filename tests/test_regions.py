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
    the lungs; 2 mm voxels."""
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
    body = sparsify(vol, PreprocessConfig(threshold=-500))
    lungs = sparsify(vol, PreprocessConfig(threshold=-500, region="lungs"))
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
    closed = _kept_voxels(sparsify(vol, PreprocessConfig(threshold=-500, region="lungs")))
    assert {(10, 21, 11), (12, 22, 12)} <= closed
    open_ = _kept_voxels(sparsify(vol, PreprocessConfig(threshold=-500, region="lungs", lung_closing_mm=0.0)))
    # without the closing only the one-voxel rim next to the air is kept
    assert (10, 21, 11) not in open_ and (13, 21, 11) in open_


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
    cfg = PreprocessConfig(threshold=-700, region="lungs")
    lungs = sparsify(vol, cfg)
    body = sparsify(vol, PreprocessConfig(threshold=-700))
    centre = tuple(round(v) for v in vol.meta["nodule_center_voxel"])  # type: ignore[union-attr]
    assert centre in _kept_voxels(lungs)
    assert lungs.n_sites < body.n_sites / 3
