"""Per-candidate classification (model.candidates): balls, their labels, the scan's answer, and
findings.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ctsparse.candidates import IGNORE, ball_labels, expand, most_abnormal, split_balls
from ctsparse.config import AugmentConfig
from ctsparse.data import augment
from ctsparse.data.datasets import read_findings
from ctsparse.errors import DatasetError
from ctsparse.sparse_volume import SparseVolume


def _two_blobs(spacing: float = 2.0) -> SparseVolume:
    """Sites on a 30^3 grid: a strong blob at (8, 8, 8), a weaker one at (22, 22, 22), and a
    faint background everywhere else (score = last feature channel)."""
    idx = np.indices((30, 30, 30)).reshape(3, -1).T.astype(np.int32)
    d1 = np.linalg.norm(idx - 8, axis=1)
    d2 = np.linalg.norm(idx - 22, axis=1)
    score = np.maximum(2.0 * np.exp(-d1), np.exp(-d2)).astype(np.float32)
    feats = np.c_[np.zeros(len(idx), np.float32), score]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-30.0, 10.0, 5.0]
    return SparseVolume(idx, feats, (30, 30, 30), affine, params={"blob_candidate_mm": 6.0})


def test_balls_start_at_their_maximum_hold_the_sites_within_the_radius_and_are_padded():
    sv = _two_blobs()
    balls = split_balls(sv, 5)
    assert len(balls) == 5
    assert balls[0].coords[0].tolist() == [8, 8, 8] and balls[1].coords[0].tolist() == [22, 22, 22]
    for ball in balls[:2]:
        dist_mm = np.linalg.norm((ball.coords - ball.coords[0]) * 2.0, axis=1)
        assert dist_mm.max() <= 6.0
        # every site of the scan within 6 mm of the centre is in the ball
        assert len(ball.coords) == int(
            (np.linalg.norm((sv.coords - ball.coords[0]) * 2.0, axis=1) <= 6.0).sum()
        )
    # far fewer maxima than asked would leave balls missing: here all five are real balls
    assert len({tuple(b.coords[0]) for b in balls}) == 5
    few = split_balls(SparseVolume(sv.coords[:3], sv.feats[:3], sv.grid_shape, sv.affine, sv.params), 4)
    assert [b.n_sites for b in few] == [3, 3, 3, 3]  # one ball (3 sites within 6 mm), repeated


def test_a_ball_takes_the_scan_class_only_when_its_centre_lies_in_a_finding():
    sv = _two_blobs()
    centre_world = sv.affine @ np.array([22.0, 22.0, 21.0, 1.0])  # 2 mm from the weaker blob's peak
    marked = sv.with_findings(np.array([[*centre_world[:3], 3.0]]))
    np.testing.assert_allclose(marked.marks, [[22.0, 22.0, 21.0, 3.0]], atol=1e-9)
    balls = split_balls(marked, 3)
    assert ball_labels(marked, balls, label=0, background=1) == [1, 0, 1]
    assert ball_labels(marked, balls, label=1, background=1) == [1, 1, 1]  # a background scan
    assert ball_labels(sv, balls, label=0, background=1) == [IGNORE] * 3  # findings unknown
    _, classes = expand([marked, sv], 3, labels=[0, 1], background=1)
    assert classes == [1, 0, 1, 1, 1, 1]


def test_the_scan_answers_with_its_ball_of_highest_odds_against_the_background():
    # two scans of three balls, three classes, background = class 1
    logits = torch.tensor(
        [
            [0.0, 3.0, 0.0],  # background-like
            [2.0, 1.0, -5.0],  # log-odds vs background: log(e^2 + e^-5) - 1 ~ 1.0
            [-5.0, 1.0, 2.5],  # ~ 1.5: the most abnormal
            [0.0, 5.0, 0.0],
            [0.0, 4.0, 0.0],  # ~ -3.3: the least background-like of an all-background scan
            [0.0, 6.0, 0.0],
        ]
    )
    out = most_abnormal(logits, 3, background=1)
    torch.testing.assert_close(out, logits[[2, 4]])


def test_augmentation_moves_the_findings_with_the_sites():
    sv = _two_blobs()
    ids = np.arange(sv.n_sites, dtype=np.float32)  # the HU channel carries each site's id
    peak = int(np.flatnonzero((sv.coords == 22).all(axis=1))[0])
    mark = np.array([[22.0, 22.0, 22.0, 3.0]])
    marked = SparseVolume(
        sv.coords, np.c_[ids, sv.feats[:, 1]], sv.grid_shape, sv.affine, sv.params, marks=mark
    )
    cfg = AugmentConfig(rotate_deg=10.0, scale=[0.9, 1.1], hu_jitter=0.0)
    followed = 0
    for seed in range(8):
        p = augment.make_params(cfg, np.random.default_rng(seed))
        out = augment.apply(marked, p)
        assert out.marks is not None and out.marks[0, 3] == 3.0
        rows = np.flatnonzero(out.feats[:, 0] == peak)
        if len(rows):  # the cells resampled from the peak site lie around the moved mark
            followed += 1
            reach = 0.5 * p.scale * (abs(np.cos(p.angle_rad)) + abs(np.sin(p.angle_rad)))
            assert np.abs(out.coords[rows] - out.marks[0, :3]).max() <= reach + 1e-9
    assert followed >= 6


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_findings_csv_takes_radius_or_diameter_and_names_the_file_and_line_it_refuses(tmp_path: Path):
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    _write(
        tmp_path / "findings.csv",
        "path,finding,x_mm,y_mm,z_mm,radius_mm\na.nii.gz,nodule,1,2,3,4\na.nii.gz,nodule,5,6,7,2\n",
    )
    got = read_findings(tmp_path)
    assert list(got) == [(tmp_path / "a.nii.gz").resolve()]
    np.testing.assert_array_equal(got[(tmp_path / "a.nii.gz").resolve()], [[1, 2, 3, 4], [5, 6, 7, 2]])
    _write(tmp_path / "findings.csv", "path,x_mm,y_mm,z_mm,diameter_mm\nb.nii.gz,1,2,3,10\n")
    _write(tmp_path / "labels.csv", "path,label\na.nii.gz,nodule\nb.nii.gz,normal\n")  # DATA given as its CSV
    np.testing.assert_array_equal(
        read_findings(tmp_path / "labels.csv")[(tmp_path / "b.nii.gz").resolve()], [[1, 2, 3, 5]]
    )
    # LPS rows (DICOM/ITK world coordinates, as LUNA16's annotations) come out in RAS+
    _write(
        tmp_path / "findings.csv",
        "path,x_mm,y_mm,z_mm,radius_mm,frame\nb.nii.gz,1,2,3,4,lps\na.nii.gz,1,2,3,4,\n",
    )
    got = read_findings(tmp_path)
    np.testing.assert_array_equal(got[(tmp_path / "b.nii.gz").resolve()], [[-1, -2, 3, 4]])
    np.testing.assert_array_equal(got[(tmp_path / "a.nii.gz").resolve()], [[1, 2, 3, 4]])
    _write(tmp_path / "findings.csv", "path,x_mm,y_mm,z_mm,radius_mm,frame\nb.nii.gz,1,2,3,4,xyz\n")
    with pytest.raises(DatasetError, match="line 2: frame 'xyz'"):
        read_findings(tmp_path)
    _write(tmp_path / "findings.csv", "path,x_mm,y_mm,radius_mm\nb.nii.gz,1,2,3\n")
    with pytest.raises(DatasetError, match=r"findings.csv.*missing z_mm"):
        read_findings(tmp_path)
    _write(tmp_path / "findings.csv", "path,x_mm,y_mm,z_mm,radius_mm\nb.nii.gz,1,two,3,4\n")
    with pytest.raises(DatasetError, match="line 2"):
        read_findings(tmp_path)
    _write(tmp_path / "findings.csv", "path,x_mm,y_mm,z_mm,radius_mm\nc.nii.gz,1,2,3,4\n")
    with pytest.raises(DatasetError, match=r"c\.nii\.gz"):
        read_findings(tmp_path)
    (tmp_path / "findings.csv").unlink()
    assert read_findings(tmp_path) == {}


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["loss", "balls"])
def test_a_per_candidate_model_trains_from_findings_and_predict_and_explain_use_its_chosen_ball(
    tmp_path: Path, balance: str
) -> None:
    pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")
    from ctsparse.calibration import Decision
    from ctsparse.config import load_config
    from ctsparse.data.phantoms import generate_phantoms
    from ctsparse.explain.methods import site_saliency
    from ctsparse.io import read_volume
    from ctsparse.models.checkpoint import build_from_checkpoint
    from ctsparse.models.registry import get_engine
    from ctsparse.predict import predict
    from ctsparse.sparsify import sparsify
    from ctsparse.training.loop import train

    data = tmp_path / "data"
    generate_phantoms(data, 8, seed=21)
    assert (data / "findings.csv").is_file()
    sets = [
        "preprocess.spacing=[2.5, 2.5, 2.5]",
        "preprocess.region=lungs",
        "preprocess.threshold=-700",
        "preprocess.blob_channel=true",
        "preprocess.blob_candidates=6",
        "preprocess.features=patch",
        "preprocess.patch_size=2",
        "model.candidates=6",
        "model.widths=[8, 16]",
        "model.depths=[1, 1]",
        "model.input_pooling=true",
        "train.epochs=2",
        "train.batch_size=4",
        "augment.orient_balls=true",
        f"train.balance={balance}",
    ]
    result = train(data, tmp_path / "run", load_config(None, sets), device="cpu")
    assert result.epochs_run == 2
    model, ckpt = build_from_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt.config.model.background == ckpt.classes.index("normal")
    model.eval()
    engine = get_engine(ckpt.config.model.backend)
    scan = data / "case_0000.nii.gz"
    sv = sparsify(read_volume(scan), ckpt.config.preprocess)
    balls = split_balls(sv, 6)
    with torch.no_grad():
        by_ball = model(
            engine.collate([augment.aligned(b) for b in balls], torch.device("cpu"), 1), per_ball=True
        )
        whole = model(engine.inputs([sv], torch.device("cpu"), ckpt.config.model))
    torch.testing.assert_close(whole, most_abnormal(by_ball, 6, ckpt.config.model.background))
    (row,) = predict(tmp_path / "run" / "best.pt", [scan])
    expected = Decision.from_dict(ckpt.extra.get("decision")).probabilities(whole.double().numpy())[0]
    np.testing.assert_allclose([row[f"p_{c}"] for c in ckpt.classes], expected, atol=1e-5)
    saliency = site_saliency(
        model, engine, ckpt.config.model, sv, lambda z: 0, "gradcam", torch.device("cpu")
    )
    chosen = balls[saliency.info["candidate_ball"]]
    inside = np.isin(
        np.ravel_multi_index(sv.coords.T, sv.grid_shape), np.ravel_multi_index(chosen.coords.T, sv.grid_shape)
    )
    assert saliency.values[~inside].max(initial=0.0) == 0.0 and saliency.values[inside].max() > 0
    assert inside[saliency.peak]


def test_training_per_candidate_refuses_before_reading_a_scan_without_findings_or_with_other_balls(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    from ctsparse.config import load_config
    from ctsparse.errors import ConfigError
    from ctsparse.training.loop import train

    bare = tmp_path / "bare"
    bare.mkdir()
    rows = (tiny_dataset / "labels.csv").read_text().splitlines()
    header, body = rows[0], [r.split(",", 1) for r in rows[1:]]
    (bare / "labels.csv").write_text(
        "\n".join([header] + [f"{tiny_dataset / p},{rest}" for p, rest in body]) + "\n"
    )
    sets = ["preprocess.blob_channel=true", "preprocess.blob_candidates=4"]
    with pytest.raises(DatasetError, match=r"needs the findings' positions in findings\.csv"):
        train(bare, tmp_path / "run1", load_config(None, [*sets, "model.candidates=4"]), device="cpu")
    with pytest.raises(ConfigError, match=r"is 8 but preprocess\.blob_candidates is 4"):
        train(tiny_dataset, tmp_path / "run2", load_config(None, [*sets, "model.candidates=8"]), device="cpu")
    with pytest.raises(ConfigError, match=r"train\.balance.*is 'balls', which needs model\.candidates > 0"):
        balls = load_config(None, [*sets, "train.balance=balls"])
        train(tiny_dataset, tmp_path / "run3", balls, device="cpu")
    assert not any((tmp_path / f"run{i}" / "split.json").exists() for i in (1, 2, 3))


def _voxels(sv: SparseVolume, k: int) -> dict[tuple[int, int, int], float]:
    """Voxel (relative to the first site's block) -> value, from k^3 patch features."""
    out = {}
    offsets = np.indices((k, k, k)).reshape(3, -1).T
    for site, values in zip(sv.coords - sv.coords[0], sv.feats[:, : k**3], strict=True):
        for off, v in zip(offsets, values, strict=True):
            out[tuple(int(a) for a in site * k + off)] = float(v)
    return out


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (2, 0, 1)])
@pytest.mark.parametrize("flips", [(False, False, False), (True, False, True), (False, True, False)])
def test_orienting_a_ball_moves_each_patch_value_with_its_voxel(order, flips) -> None:
    rng = np.random.default_rng(0)
    k = 2
    coords = np.unique(rng.integers(0, 5, (40, 3)), axis=0).astype(np.int32)
    feats = rng.normal(size=(len(coords), k**3 + 1)).astype(np.float32)
    sv = SparseVolume(coords, feats, (5, 5, 5), np.eye(4), {"features": "patch", "patch_size": k})
    out = augment.orient(sv, flips, order)
    assert out.coords.min() == 0 and out.n_sites == sv.n_sites
    np.testing.assert_array_equal(out.feats[:, -1], sv.feats[:, -1])  # the blob channel stays
    want = {}
    for v, value in _voxels(sv, k).items():
        w = [v[a] for a in order]
        w = [(k - 1) - w[i] if flips[i] else w[i] for i in range(3)]
        want[tuple(w)] = value
    assert _voxels(out, k) == want


def test_random_orientations_swap_only_axes_of_equal_site_size() -> None:
    rng = np.random.default_rng(1)
    coords = np.unique(rng.integers(0, 6, (60, 3)) // [1, 1, 3], axis=0).astype(np.int32)  # z: 0..1
    feats = rng.normal(size=(len(coords), 2)).astype(np.float32)
    thick = SparseVolume(coords, feats, (6, 6, 6), np.diag([2.5, 2.5, 5.0, 1.0]))
    z_extent = {int(np.ptp(augment.random_orientation(thick, rng).coords[:, 2])) for _ in range(30)}
    assert z_extent == {int(np.ptp(coords[:, 2]))}  # the slice axis never moves in-plane
    iso = SparseVolume(coords, feats, (6, 6, 6), np.diag([2.5, 2.5, 2.5, 1.0]))
    seen = {augment.random_orientation(iso, rng).coords.tobytes() for _ in range(200)}
    assert len(seen) > 24  # most of the 48 orientations of the cube


def test_a_findings_csv_without_positions_stops_neither_planning_nor_scan_label_training(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    import shutil

    from ctsparse.config import load_config
    from ctsparse.plan import fingerprint
    from ctsparse.training.loop import train

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "findings.csv").write_text("path,report\ncase_0000.nii.gz,small nodule right upper lobe\n")
    assert fingerprint(data, max_scans=2).findings == {}
    sets = ["model.widths=[8, 16]", "model.depths=[1, 1]", "train.epochs=1"]
    result = train(data, tmp_path / "run", load_config(None, sets), device="cpu")
    assert (tmp_path / "run" / "best.pt").is_file() and result is not None
    with pytest.raises(DatasetError, match="missing x_mm"):
        read_findings(data)  # asking for the positions still names what is wrong


def test_a_rank_whose_balls_are_all_of_unknown_class_still_joins_the_loss_all_reduce() -> None:
    from ctsparse.training.distributed import Dist
    from ctsparse.training.epoch import batch_loss

    class TwoRanks(Dist):  # the other rank brings known balls of total weight 4
        calls = 0

        def sum(self, values: list[float]) -> list[float]:
            TwoRanks.calls += 1
            return [v + 4.0 for v in values]

    d = TwoRanks(world=2)
    logits = torch.randn(6, 2, requires_grad=True)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([2.0, 1.0]), ignore_index=IGNORE)
    unknown = torch.full((6,), IGNORE)
    loss = batch_loss(logits, unknown, loss_fn, d)
    assert TwoRanks.calls == 1 and float(loss.detach()) == 0.0
    loss.backward()  # no gradient from this rank, but a graph to reduce
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
    labels = torch.tensor([0, 1, IGNORE, 1, IGNORE, 0])
    expected = (
        torch.nn.functional.cross_entropy(
            logits, labels, weight=loss_fn.weight, reduction="sum", ignore_index=IGNORE
        )
        * 2
        / (2.0 + 1.0 + 1.0 + 2.0 + 4.0)
    )
    torch.testing.assert_close(batch_loss(logits, labels, loss_fn, d), expected)
    assert TwoRanks.calls == 2


def _pool_scans() -> list[tuple[SparseVolume, int]]:
    """Three 3-ball scans (background = class 1): a finding scan marked at its weaker blob, a
    background scan, and a finding scan without positions (its balls' class is unknown)."""
    sv = _two_blobs()
    centre_world = sv.affine @ np.array([22.0, 22.0, 22.0, 1.0])
    return [(sv.with_findings(np.array([[*centre_world[:3], 3.0]])), 0), (sv, 1), (sv, 0)]


def test_a_ball_pool_holds_the_known_balls_and_draws_a_quarter_of_each_batch_from_the_findings():
    from ctsparse.config import load_config
    from ctsparse.training.epoch import BallPool

    cfg = load_config(None, ["model.candidates=3", "model.background=1", "train.balance=balls"])
    pool = BallPool.of(_pool_scans(), cfg)
    assert pool.labels.tolist() == [1, 0, 1, 1, 1, 1]  # the unmarked finding scan's balls left out
    assert pool.balls[1].coords[0].tolist() == [22, 22, 22]
    assert pool.n_batches(2) == 2 and pool.n_batches(64) == 1  # four balls per finding ball
    rng = np.random.default_rng(0)
    for n in (1, 4, 7, 64):
        picks = pool.draw(rng, n)
        assert len(picks) == n and int(np.sum(pool.labels[picks] == 0)) == max(1, n // 4)
    # several finding classes, one ball of class 0 and three of class 2: each class gets half
    # of the finding draws
    pool3 = BallPool([pool.balls[0]] * 5, np.array([0, 2, 2, 2, 1]), background=1)
    drawn = pool3.labels[np.concatenate([pool3.draw(rng, 64) for _ in range(200)])]
    assert np.mean(drawn != 1) == 0.25
    assert 0.45 < np.mean(drawn[drawn != 1] == 0) < 0.55


def test_a_ball_pool_needs_finding_and_background_balls() -> None:
    from ctsparse.config import load_config
    from ctsparse.training.epoch import BallPool

    cfg = load_config(None, ["model.candidates=3", "model.background=1", "train.balance=balls"])
    with pytest.raises(DatasetError, match=r"^DATA: .*0 finding and 3 background balls"):
        BallPool.of(_pool_scans()[1:], cfg, "DATA")


def test_a_ball_meets_the_network_aligned_on_its_strides_wherever_its_scan_put_it() -> None:
    sv = _two_blobs()
    centre_world = sv.affine @ np.array([22.0, 22.0, 21.0, 1.0])
    marked = sv.with_findings(np.array([[*centre_world[:3], 3.0]]))
    ball = split_balls(marked, 2)[1]
    out = augment.aligned(ball)
    assert out.coords.min() >= 0 and np.all(out.coords[0] % augment.ALIGN == 0)
    np.testing.assert_array_equal(out.coords - out.coords[0], ball.coords - ball.coords[0])
    np.testing.assert_array_equal(out.feats, ball.feats)
    assert out.marks is not None and ball.marks is not None
    np.testing.assert_allclose(out.marks[:, :3] - out.coords[0], ball.marks[:, :3] - ball.coords[0])
    for shift in ([1, 0, 0], [5, 3, 7], [15, 15, 15]):
        moved = SparseVolume(ball.coords + np.int32(shift), ball.feats, (40, 40, 40), ball.affine)
        np.testing.assert_array_equal(augment.aligned(moved).coords, out.coords)
