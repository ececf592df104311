"""The planner on small real datasets: HU chest phantoms, 0-255 images, binary masks, mixed spacings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ctsparse.config import Config, load_config, to_dict
from ctsparse.plan import Budget, Fingerprint, Measurements, fingerprint, make_plan, resolve_config
from ctsparse.plan.intensity import kind_of, otsu
from ctsparse.plan.measure import StepFigure
from ctsparse.plan.rules import (
    BLOB_CANDIDATES,
    CROSS_SPEEDUP,
    FOCAL_AUROC,
    blob_separation,
    measure_candidates,
)
from tests.plan_helpers import write_dataset

BUDGET = Budget(device="cpu", memory_bytes=8 << 30, train_minutes=10.0, site_budget=40_000)


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctsparse.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("chest")
    generate_phantoms(root, 6, seed=5, shape=(48, 48, 32), spacing=(7.3, 7.3, 10.0), nodule_mm=(20.0, 30.0))
    return root


@pytest.fixture(scope="module")
def chest_fp(chest: Path) -> Fingerprint:
    return fingerprint(chest, max_scans=6)


def test_hu_chest_phantoms_plan_hu_defaults_and_the_lung_region(chest_fp: Fingerprint) -> None:
    fp = dataclasses.replace(chest_fp, findings={})  # scan labels only: per-ball training is below
    assert fp.kind == "hu" and fp.n_read == 6
    assert all(s.lungs_found and (s.lung_ml or 0) > 1000 for s in fp.scans)
    assert fp.site_threshold == -500.0
    plan = make_plan(fp, None, BUDGET)
    v = plan.values
    # HU data inside the lung region: keep what is denser than aerated lung, on a lung window
    assert v["preprocess.threshold"].value == -700.0
    assert "lung region" in v["preprocess.threshold"].reason
    assert (v["preprocess.hu_center"].value, v["preprocess.hu_scale"].value) == (-400.0, 500.0)
    assert "values are HU" in v["preprocess.window"].reason
    assert v["preprocess.window"].value == [-1000.0, 1000.0]
    assert v["preprocess.region"].value == "lungs"
    assert (
        "lungs found in 6/6" in v["preprocess.region"].reason
        and "region=body" in v["preprocess.region"].reason
    )
    assert v["preprocess.blob_channel"].value is True and v["model.input_pooling"].value is True
    # every scan with lungs has its strongest blob measured; the candidate stage follows it
    assert all(s.blob_max is not None and s.blob_max > 0 for s in fp.scans)
    sep = blob_separation(fp)
    assert sep is not None and sep[2] == 6
    focal = sep[0] >= FOCAL_AUROC
    assert v["preprocess.blob_candidates"].value == (BLOB_CANDIDATES if focal else 0)
    assert f"AUROC {sep[0]:.2f} on 6 read scans" in v["preprocess.blob_candidates"].reason
    assert v["preprocess.body_mask"].value is True
    assert v["model.kernel"].value == "cross" and "not measured" in v["model.kernel"].reason
    assert not plan.measured and not plan.notes
    assert all(p.reason for p in v.values())
    cfg = resolve_config(v)  # every planned value is a valid config value
    assert cfg.preprocess.region == "lungs"


@pytest.mark.parametrize(
    ("labels", "blob", "planned", "said"),
    [
        # the nodule scans hold the three strongest blobs: AUROC 1
        (
            ["normal"] * 3 + ["nodule"] * 3,
            [0.1, 0.2, 0.3, 0.9, 1.0, 1.1],
            BLOB_CANDIDATES,
            "(AUROC 1.00 on 6",
        ),
        # interleaved: nodule 5 of 9 pairs, normal 4 of 9
        (
            ["normal", "nodule", "nodule", "normal", "normal", "nodule"],
            [1, 2, 3, 4, 5, 6],
            0,
            "(AUROC 0.56 on 6",
        ),
        # a class with only two measured scans (no lungs in the third): nothing to compare
        (["normal"] * 3 + ["nodule"] * 3, [0.1, 0.2, 0.3, 0.9, 1.0, None], 0, "fewer than 3 scans per class"),
    ],
)
def test_the_candidate_stage_is_planned_for_a_focal_finding_only(
    chest_fp: Fingerprint, labels: list[str], blob: list[float | None], planned: int, said: str
) -> None:
    scans = tuple(
        dataclasses.replace(s, label=lab, blob_max=b)
        for s, lab, b in zip(chest_fp.scans, labels, blob, strict=True)
    )
    v = make_plan(dataclasses.replace(chest_fp, scans=scans), None, BUDGET).values
    assert v["preprocess.blob_candidates"].value == planned
    assert said in v["preprocess.blob_candidates"].reason
    assert ("preprocess.blob_candidate_mm" in v) == (planned > 0)
    resolve_config(v)  # valid either way


def test_findings_with_one_background_class_plan_per_ball_training(chest_fp: Fingerprint) -> None:
    # generate_phantoms writes findings.csv with the nodule of every nodule scan
    n_nodule = chest_fp.class_counts["nodule"]
    assert chest_fp.findings == {"nodule": n_nodule}
    focal = tuple(
        dataclasses.replace(s, blob_max=3.0 if s.label == "nodule" else 1.0 + 0.1 * i)
        for i, s in enumerate(chest_fp.scans)
    )
    fp = dataclasses.replace(chest_fp, scans=focal)
    v = make_plan(fp, None, BUDGET).values
    assert v["preprocess.blob_candidates"].value == BLOB_CANDIDATES
    assert v["model.candidates"].value == BLOB_CANDIDATES
    said = v["model.candidates"].reason
    assert f"findings.csv marks {n_nodule} of {n_nodule} 'nodule' scans" in said
    assert "'normal' as the background" in said and "--set model.candidates=0" in said
    # each ball on sites of at least 2.5 mm (these phantoms are coarser: kept), every voxel a site,
    # air at 0 with the kept-site channel, the 27-neighbour kernel, balls drawn across scans
    assert v["preprocess.spacing"].value == [max(2.5, a) for a in fp.analysis_spacing]
    assert (v["preprocess.features"].value, v["preprocess.patch_size"].value) == ("hu", 1)
    assert v["preprocess.occupancy_channel"].value is True and v["preprocess.hu_center"].value == -1000.0
    assert v["model.kernel"].value == "cube" and v["model.input_pooling"].value is False
    assert v["augment.orient_balls"].value is True and v["augment.rotate_deg"].value == 0.0
    assert (v["train.balance"].value, v["train.batch_size"].value) == ("balls", 64)
    assert "estimated (not measured)" in v["train.epochs"].reason
    cfg = resolve_config(v)
    assert cfg.model.candidates == cfg.preprocess.blob_candidates == BLOB_CANDIDATES
    # the device measurement times the cube kernel on the ball grid; the epochs follow it
    assert measure_candidates(fp, BUDGET) == [("cube", 1)]
    for step_s, epochs in ((0.001, 100), (60.0, 10)):
        steps = [StepFigure("cube", 1, 3000, 3, step_s, [step_s] * 3, 10 << 20)]
        meas = Measurements("cpu", 2, "s0.nii.gz", None, "lungs", "RSS", 3.0, steps)
        timed = make_plan(fp, meas, BUDGET).values["train.epochs"]
        assert timed.value == epochs and "measured on cpu" in timed.reason
    others = (
        ({}, "no readable findings.csv"),
        ({"nodule": 2, "normal": 1}, "no one class without findings"),
        ({"nodule": 2}, "findings.csv marks only 2 of"),
    )
    for findings, why in others:
        v = make_plan(dataclasses.replace(fp, findings=findings), None, BUDGET).values
        assert v["model.candidates"].value == 0 and why in v["model.candidates"].reason
        assert "train.balance" not in v and v["preprocess.hu_center"].value == -400.0
    # `train --set model.candidates=0`: the whole plan follows the scan labels asked for
    v = make_plan(fp, None, dataclasses.replace(BUDGET, per_ball=False)).values
    assert v["model.candidates"].value == 0 and "as the command line asked" in v["model.candidates"].reason
    assert "train.balance" not in v and "preprocess.occupancy_channel" not in v
    # no candidate stage: nothing to say about balls
    flat = tuple(dataclasses.replace(s, blob_max=1.0) for s in chest_fp.scans)
    v = make_plan(dataclasses.replace(chest_fp, scans=flat), None, BUDGET).values
    assert "model.candidates" not in v and resolve_config(v).model.candidates == 0


def test_uint8_volumes_get_a_histogram_threshold_and_say_they_are_not_hu(tmp_path: Path) -> None:
    fp = fingerprint(write_dataset(tmp_path, "uint8"))
    assert fp.kind == "uint8"
    assert not any(s.lungs_found for s in fp.scans)
    v = make_plan(fp, None, BUDGET).values
    thr = v["preprocess.threshold"].value
    assert 20 < thr < 120, thr  # between the zero background and the ~150 body
    reason = v["preprocess.threshold"].reason
    assert "not HU" in reason and "0-255" in reason and "instead of the HU body threshold" in reason
    assert 130 < v["preprocess.hu_center"].value < 170
    assert 5 < v["preprocess.hu_scale"].value < 40
    lo, hi = v["preprocess.window"].value
    assert lo == 0 and 180 < hi <= 255
    assert v["preprocess.region"].value == "body" and v["preprocess.body_mask"].value is False
    assert v["augment.hu_jitter"].value < 5  # not 20 "HU" on a 0-255 scale
    assert any("not HU" in n for n in make_plan(fp, None, BUDGET).notes)


def test_binary_masks_are_thresholded_at_one_half(tmp_path: Path) -> None:
    fp = fingerprint(write_dataset(tmp_path, "mask"))
    assert fp.kind == "mask"
    v = make_plan(fp, None, BUDGET).values
    assert v["preprocess.threshold"].value == 0.5
    assert (
        "midpoint" in v["preprocess.threshold"].reason and "binary mask" in v["preprocess.threshold"].reason
    )
    assert v["preprocess.window"].value == [0.0, 1.0]
    assert (v["preprocess.hu_center"].value, v["preprocess.hu_scale"].value) == (0.5, 0.5)
    assert v["augment.hu_jitter"].value == 0.0
    assert v["preprocess.region"].value == "body"


def test_mixed_spacings_are_resampled_to_the_median(tmp_path: Path) -> None:
    spacings = [(0.8, 0.8, 1.0), (1.0, 1.0, 2.0), (1.2, 1.2, 3.0)]
    fp = fingerprint(write_dataset(tmp_path, "uint8", spacings))
    v = make_plan(fp, None, BUDGET).values
    assert v["preprocess.spacing"].value == [1.0, 1.0, 2.0]
    assert "mixed spacings are resampled to one grid" in v["preprocess.spacing"].reason
    assert "0.8-1.2" in v["preprocess.spacing"].reason


def test_site_budget_coarsens_the_grid_and_picks_the_patch(tmp_path: Path) -> None:
    fp = fingerprint(write_dataset(tmp_path, "uint8"))
    n2 = fp.scans[0].sites["body"]["2"]  # type: ignore[index]
    roomy = make_plan(fp, None, BUDGET).values
    assert roomy["preprocess.features"].value == "patch" and roomy["preprocess.patch_size"].value == 2
    tight = make_plan(fp, None, Budget(site_budget=max(n2 // 40, 10))).values
    assert tight["preprocess.patch_size"].value == 4  # 4 x 1 mm is within the 8 mm limit
    assert tight["preprocess.spacing"].value[0] > 1.0 and "coarsened" in tight["preprocess.spacing"].reason


def test_thick_slices_get_no_patch_and_a_coarser_in_plane_grid_instead(tmp_path: Path) -> None:
    # 0.8 x 0.8 x 5 mm: a 2^3 patch would make 1.6 x 1.6 x 10 mm sites, deeper than the 8 mm limit
    fp = fingerprint(write_dataset(tmp_path, "uint8", [(0.8, 0.8, 5.0)]))
    n1 = fp.scans[0].sites["body"]["1"]  # type: ignore[index]
    roomy = make_plan(fp, None, BUDGET).values
    assert roomy["preprocess.patch_size"].value == 1 and roomy["preprocess.features"].value == "hu"
    assert roomy["preprocess.spacing"].value == [0.8, 0.8, 5.0]
    tight = make_plan(fp, None, Budget(site_budget=int(n1 // 4))).values
    assert tight["preprocess.patch_size"].value == 1
    assert "1.6 x 1.6 x 10.0 mm sites" in tight["preprocess.patch_size"].reason
    # about a quarter of the sites: about twice the in-plane spacing, the slices kept
    sp = tight["preprocess.spacing"].value
    assert sp[0] == sp[1] and 1.5 < sp[0] < 1.7 and sp[2] == 5.0
    assert "in-plane coarsened from 0.8" in tight["preprocess.spacing"].reason


def _measured(fp: Fingerprint, cube_s: float, cross_s: float, k: int) -> Measurements:
    steps = [
        StepFigure(kernel, k, 5000, k**3, t, [t] * 3, 50 << 20)
        for kernel, t in (("cube", cube_s), ("cross", cross_s))
    ]
    return Measurements("cpu", 2, "s0.nii.gz", None, "body", "RSS", 3.0, steps)


def test_a_patch_size_that_leaves_too_few_epochs_gives_way_to_a_measured_coarser_one(tmp_path: Path) -> None:
    fp = fingerprint(write_dataset(tmp_path, "uint8"))  # 1 mm voxels: 2^3 and 4^3 within 8 mm
    assert make_plan(fp, None, BUDGET).values["preprocess.patch_size"].value == 2
    slow2, fast4 = _measured(fp, 10.0, 10.0, 2), _measured(fp, 0.01, 0.01, 4)
    both = Measurements("cpu", 2, "s0.nii.gz", None, "body", "RSS", 3.0, [*slow2.steps, *fast4.steps])
    v = make_plan(fp, both, BUDGET).values
    assert v["preprocess.patch_size"].value == 4
    assert "epochs" in v["preprocess.patch_size"].reason and "4^3 fits" in v["preprocess.patch_size"].reason
    fast2 = _measured(fp, 0.01, 0.01, 2)
    roomy = Measurements("cpu", 2, "s0.nii.gz", None, "body", "RSS", 3.0, [*fast2.steps, *fast4.steps])
    assert make_plan(fp, roomy, BUDGET).values["preprocess.patch_size"].value == 2  # enough epochs at 2


def test_make_plan_is_pure_and_survives_json(tmp_path: Path) -> None:
    fp = fingerprint(write_dataset(tmp_path, "uint8"))
    meas = _measured(fp, 0.3, 0.1, 2)
    first = make_plan(fp, meas, BUDGET)
    assert first == make_plan(fp, meas, BUDGET)
    again = Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict())))
    meas2 = Measurements.from_dict(json.loads(json.dumps(meas.to_dict())))
    assert make_plan(again, meas2, BUDGET).to_dict() == first.to_dict()
    assert first.values["model.kernel"].value == "cross"
    assert f"{3.0:.2f}x faster" in first.values["model.kernel"].reason
    slow = make_plan(fp, _measured(fp, 0.3, 0.3 / (CROSS_SPEEDUP - 0.1), 2), BUDGET)
    assert slow.values["model.kernel"].value == "cube"


def test_batch_and_epochs_follow_the_measurement(tmp_path: Path) -> None:
    fp = fingerprint(write_dataset(tmp_path, "uint8", n_per_class=40))
    assert fp.n_train == 64
    fast = make_plan(fp, _measured(fp, 0.01, 0.01, 2), BUDGET).values
    assert fast["train.batch_size"].value == 4  # capped by 64 train scans / 16 steps per epoch
    assert fast["train.lr"].value == pytest.approx(0.0025)  # 0.005 at batch 8, scaled
    assert fast["train.epochs"].value == 100 and fast["train.max_minutes"].value == 10.0
    slow = make_plan(fp, _measured(fp, 10.0, 10.0, 2), BUDGET).values
    assert slow["train.epochs"].value == 10 and "after about" in slow["train.max_minutes"].reason
    assert 5 <= slow["train.patience"].value <= 10
    tiny_ram = make_plan(fp, _measured(fp, 0.01, 0.01, 2), Budget(memory_bytes=600 << 20)).values
    assert tiny_ram["train.batch_size"].value == 2  # 50 MiB per scan x 4 > 25 % of 600 MiB


def test_set_overrides_a_planned_key(tmp_path: Path) -> None:
    fp = fingerprint(write_dataset(tmp_path, "mask"))
    plan = make_plan(fp, None, BUDGET)
    cfg = resolve_config(plan.values, ["preprocess.threshold=0.25", "train.epochs=3"])
    assert cfg.preprocess.threshold == 0.25 and cfg.train.epochs == 3
    assert cfg.preprocess.hu_scale == plan.values["preprocess.hu_scale"].value  # the rest is planned
    assert to_dict(resolve_config({})) == to_dict(Config())


def test_value_kinds_and_otsu() -> None:
    assert kind_of(-1024, 3071, -500, 500, True, False) == "hu"
    assert kind_of(0, 255, 60, 70, True, False) == "uint8"
    assert kind_of(0, 1, 0.3, 0.2, False, False) == "unit"
    assert kind_of(-4, 5, 0.01, 1.0, False, False) == "zscore"
    assert kind_of(0, 1, 0.2, 0.4, True, True) == "mask"
    assert kind_of(0, 4095, 900, 600, True, False) == "other"
    two_modes = np.r_[np.full(700, 10.0), np.full(300, 200.0)]
    assert 10 < otsu(two_modes) < 200


def test_plan_yaml_loads_as_a_config(tmp_path: Path) -> None:
    from ctsparse.plan import Planning, plan_yaml

    fp = fingerprint(write_dataset(tmp_path, "uint8"))
    planning = Planning(fp, None, BUDGET, make_plan(fp, None, BUDGET))
    (tmp_path / "plan.yaml").write_text(plan_yaml(planning))
    cfg = load_config(tmp_path / "plan.yaml")
    assert cfg.preprocess.threshold == planning.plan.values["preprocess.threshold"].value
    assert "# values are not HU" in (tmp_path / "plan.yaml").read_text()
    full = resolve_config(planning.plan.values, ["train.lr=0.01"])
    (tmp_path / "full.yaml").write_text(plan_yaml(planning, full))
    assert to_dict(load_config(tmp_path / "full.yaml")) == to_dict(full)


def test_preprocessing_workers_follow_the_cpus_the_ram_and_the_dataset_size(chest_fp: Fingerprint) -> None:
    from dataclasses import replace

    # 6 small scans: a second's work, which workers would not repay
    few = make_plan(chest_fp, None, replace(BUDGET, cpus=8)).values["data.workers"]
    assert few.value == 0 and "would not repay" in few.reason
    many = replace(chest_fp, n_scans=2000)
    v = make_plan(many, None, replace(BUDGET, cpus=8, ram_bytes=64 << 30)).values["data.workers"]
    assert v.value == 4 and "8 CPUs" in v.reason and "--workers" in v.reason  # at most 4
    assert (
        make_plan(many, None, replace(BUDGET, cpus=2, ram_bytes=64 << 30)).values["data.workers"].value == 2
    )
    one_cpu = make_plan(many, None, replace(BUDGET, cpus=1)).values["data.workers"]
    assert one_cpu.value == 0 and "one CPU" in one_cpu.reason
    # RAM for 3.5 scans of the median size (24 bytes per voxel while sparsified) in a quarter of it
    voxels = sorted(int(np.prod(s.shape)) for s in chest_fp.scans)[len(chest_fp.scans) // 2]
    tight = replace(BUDGET, cpus=8, ram_bytes=int(voxels * 24 * 3.5 / 0.25))
    assert make_plan(many, None, tight).values["data.workers"].value == 3
    assert resolve_config(make_plan(many, None, replace(BUDGET, cpus=2)).values).data.workers == 2


def test_site_counts_match_a_site_by_site_count(chest: Path) -> None:
    """The dense-grid counts equal counting the distinct coords // k of every site, in the body
    and inside the coarse lung mask mapped site by site."""
    from ctsparse.config import PreprocessConfig
    from ctsparse.io import read_volume
    from ctsparse.plan.fingerprint import PATCH_SIZES, _lung_check, _site_counts
    from ctsparse.sparsify import sparsify

    for path in sorted(chest.glob("*.nii.gz"))[:2]:
        vol = read_volume(path)
        _, lungs = _lung_check(vol)
        assert lungs is not None
        got = _site_counts(vol, -500.0, True, lungs)
        sv = sparsify(vol, PreprocessConfig(features="hu", threshold=-500.0, window=None))
        mask, aff = lungs
        t = np.linalg.inv(aff) @ sv.affine
        idx = np.rint(sv.coords @ t[:3, :3].T + t[:3, 3]).astype(int)
        ok = np.all((idx >= 0) & (idx < mask.shape), axis=1)
        inside = np.zeros(len(idx), dtype=bool)
        inside[ok] = mask[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        for region, coords in (("body", sv.coords), ("lungs", sv.coords[inside])):
            want = {str(k): len(np.unique(coords // k, axis=0)) for k in PATCH_SIZES}
            assert got[region] == want, region
        assert 0 < got["lungs"]["1"] < got["body"]["1"]


def test_grids_map_per_axis_and_a_rotation_is_refused() -> None:
    from ctsparse.io.geometry import axis_index_maps, inside_grid

    half = np.diag([0.5, 0.5, 0.5, 1.0])  # a grid twice as fine; cell i reads voxel rint(i / 2)
    maps = axis_index_maps(half, (8, 8, 8), (4, 4, 4))
    assert maps is not None
    idx, inside = maps
    # rint rounds halves to even, as a site-by-site map does: 0 0 1 2 2 2 3 4 -> the last is outside
    assert idx[0].tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    assert inside[0].tolist() == [True] * 7 + [False]
    assert inside_grid(inside).sum() == 7**3
    rot = np.eye(4)
    rot[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    assert axis_index_maps(rot, (4, 4, 4), (4, 4, 4)) is None
