"""`ctsparse explain`: maps aligned with their scans, peaks where a known model must put them,
one-line errors for bad input while the other scans are still explained."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctsparse.cli.main import app
from ctsparse.io import read_volume, write_dicom_series, write_nifti
from ctsparse.volume import Volume

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

CLASSES = ["none", "cube"]


@pytest.fixture(autouse=True)
def cpu_kernels_on_small_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engine `sparse` hands small CPU batches to ME: these small scans run ctsparse's kernels,
    whose hooks are the ones to test here (ME's are tested through engine `minkowski`)."""
    from ctsparse.models import sparse

    monkeypatch.setattr(sparse, "CPU_KERNEL_MIN_SITES", 0)


CUBE = (slice(6, 9), slice(4, 7), slice(3, 6))  # voxels of the bright cube


def _scan(cube: bool = True) -> Volume:
    """16x14x10 voxels of 8 mm: air around a soft-tissue box, with a bright 3-voxel cube in it."""
    hu = np.full((16, 14, 10), -1000.0, dtype=np.float32)
    hu[3:13, 3:11, 2:8] = 0.0
    if cube:
        hu[CUBE] = 800.0
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-90.0, -70.0, -50.0]
    return Volume(hu, affine, "synthetic")


def _hand_built(path: Path, backend: str) -> Path:
    """A checkpoint whose logit of 'cube' is the maximum, over the scan, of the input HU summed
    over 2x2x2 blocks (ReLU'd): every weight zero except the stem's and the downsampling's
    channel 0 and the head's weight on the max-pooled channel 0. Its answer rests on the cube."""
    import torch

    from ctsparse.config import load_config
    from ctsparse.models import create_model
    from ctsparse.models.checkpoint import save_checkpoint

    cfg = load_config(
        None,
        [
            "preprocess.features=hu",
            "model.widths=[4, 4]",
            "model.depths=[1, 1]",
            "model.kernel=cube",
            "model.stem_kernel=1",
            f"model.backend={backend}",
        ],
    )
    model = create_model(cfg.model, 1, len(CLASSES))
    state = model.state_dict()
    with torch.no_grad():
        for value in state.values():
            if value.dim() >= 2:
                value.zero_()
        for key in ("stem.0", "stages.1.0"):  # the 1x1x1 stem and the stride-2 downsampling
            if f"{key}.kernel" in state:
                kernel = state[f"{key}.kernel"]  # (offsets, in, out); (in, out) for one offset
                kernel[..., 0, 0] = 1.0
            else:
                state[f"{key}.weight"][0, 0] = 1.0  # (out, in, k, k, k)
        state["head.weight"][1, 4] = 1.0  # features are [avg of 4 channels, max of 4 channels]
    model.load_state_dict(state)
    save_checkpoint(path, model, cfg, CLASSES, 1)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hand_built(tmp_path_factory.mktemp("ck") / "cube.pt", "sparse")


def _in_cube(mm: list[float]) -> bool:
    vol = _scan()
    v = np.linalg.solve(vol.affine, np.array([*mm, 1.0]))[:3]
    return all(s.start - 0.5 <= c <= s.stop - 0.5 for c, s in zip(v, CUBE, strict=True))


# occlusion only asks the engine for forward passes, so one engine is enough; on the sparse one
# every occluded copy is a new coordinate set with its own kernel maps (slower, nothing more)
@pytest.mark.parametrize(
    ("backend", "method"),
    [
        ("sparse", "gradcam"),
        ("sparse", "inputxgrad"),
        ("minkowski", "gradcam"),
        ("minkowski", "inputxgrad"),
        ("dense", "gradcam"),
        ("dense", "inputxgrad"),
        ("dense", "occlusion"),
        pytest.param("sparse", "occlusion", marks=pytest.mark.slow),
    ],
)
def test_map_peaks_on_the_cube_the_model_reads(tmp_path: Path, backend: str, method: str) -> None:
    from ctsparse.explain import explain_volume
    from ctsparse.models.checkpoint import build_from_checkpoint

    model, ckpt = build_from_checkpoint(_hand_built(tmp_path / "ck.pt", backend))
    vol = _scan()
    expl = explain_volume(model.eval(), vol, ckpt, method=method)
    assert expl.label == expl.target == "cube"
    assert _in_cube(list(expl.peak_mm)), expl.peak_mm
    assert expl.volume_map.shape == vol.shape
    assert expl.volume_map[CUBE].max() == 1.0
    assert expl.volume_map[vol.array < -900].max() == 0.0  # air holds no site: nothing to blame
    other = explain_volume(model.eval(), vol, ckpt, method=method, target="none")
    assert other.target == "none" and other.label == "cube"


def test_nifti_map_has_the_input_affine_and_shape_in_any_orientation(
    checkpoint: Path, tmp_path: Path
) -> None:
    vol = _scan()
    canonical = write_nifti(vol, tmp_path / "ras.nii.gz")
    # the same scan stored as LPS with the slice axis first, as many converters write it:
    # file voxel (a, b, c) is scan voxel (X-1-b, Y-1-c, a)
    data = np.transpose(vol.array[::-1, ::-1, :], (2, 0, 1))
    nx, ny = vol.shape[0] - 1.0, vol.shape[1] - 1.0
    affine = vol.affine @ np.array([[0, -1, 0, nx], [0, 0, -1, ny], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(data.astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    other = tmp_path / "lps.nii"
    nib.save(img, str(other))
    np.testing.assert_array_equal(read_volume(other).array, vol.array)  # truly the same scan

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", str(checkpoint), str(canonical), str(other), "--out", str(out)])
    assert res.exit_code == 0, res.output
    maps = {}
    for name, src in (("ras", canonical), ("lps", other)):
        written, source = nib.load(str(out / f"{name}_gradcam.nii.gz")), nib.load(str(src))
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
        assert int(written.header["sform_code"]) == int(source.header["sform_code"])
        report = json.loads((out / f"{name}_gradcam.json").read_text())
        data = np.asarray(written.dataobj)
        assert data[tuple(report["peak"]["voxel"])] == pytest.approx(1.0)
        assert _in_cube(report["peak"]["mm_ras"])
        maps[name] = np.asarray(nib.as_closest_canonical(written).dataobj)
    np.testing.assert_array_equal(maps["ras"], maps["lps"])  # the same map on the same anatomy
    from PIL import Image

    rgb = np.asarray(Image.open(out / "ras_gradcam.png").convert("RGB")).astype(int)
    assert rgb.shape[1] > 2 * rgb.shape[0]  # three views side by side
    assert ((rgb[..., 0] - rgb[..., 2]) > 60).any()  # the saliency colour over the grey CT
    assert (np.abs(rgb - [0, 255, 255]).sum(axis=2) == 0).sum() >= 3 * 12  # a cyan cross per view
    sites = np.load(out / "ras_gradcam_sites.npz")
    assert sites["coords"].shape == (sites["values"].size, 3) and sites["values"].max() == 1.0


def test_dicom_input_gives_a_nifti_in_the_read_volume_frame(checkpoint: Path, tmp_path: Path) -> None:
    series = tmp_path / "series"
    write_dicom_series(_scan(), series, PatientName="Doe^Jane", PatientID="PID-4711")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", str(checkpoint), str(series), "--out", str(out)])
    assert res.exit_code == 0, res.output
    written, vol = nib.load(str(out / "series_gradcam.nii.gz")), read_volume(series)
    assert written.shape == vol.shape
    np.testing.assert_allclose(written.affine, vol.affine, atol=1e-5)
    report = json.loads((out / "series_gradcam.json").read_text())
    assert _in_cube(report["peak"]["mm_ras"]) and report["class_explained"] == "cube"
    assert report["time_s"]["total"] > 0 and report["peak_rss_mb"] > 0
    for f in out.iterdir():  # no patient identifiers in any output
        assert b"Doe" not in f.read_bytes() and b"PID-4711" not in f.read_bytes()


def test_bad_inputs_get_one_line_and_the_others_are_explained(checkpoint: Path, tmp_path: Path) -> None:
    good = write_nifti(_scan(), tmp_path / "good.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "out"
    args = [
        "explain",
        str(checkpoint),
        str(tmp_path / "missing.nii.gz"),
        str(corrupt),
        str(good),
        "-o",
        str(out),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1
    assert "no such file" in res.output and "corrupt" in res.output and "Traceback" not in res.output
    assert (out / "good_gradcam.nii.gz").is_file() and not (out / "corrupt_gradcam.json").exists()

    res = CliRunner().invoke(
        app, ["explain", str(checkpoint), str(good), "-o", str(out), "--class", "tumour"]
    )
    assert res.exit_code == 1 and "unknown class 'tumour'" in res.output and "none, cube" in res.output

    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoint.read_bytes()[:2000])
    res = CliRunner().invoke(app, ["explain", str(broken), str(good), "-o", str(out)])
    assert res.exit_code == 1 and "not a readable checkpoint" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_scan_the_checkpoint_cannot_read_is_an_error_row(tmp_path: Path) -> None:
    from ctsparse.config import load_config
    from ctsparse.explain import explain
    from ctsparse.models import create_model
    from ctsparse.models.checkpoint import save_checkpoint

    cfg = load_config(None, ["model.widths=[4, 4]", "model.depths=[1, 1]"])  # 4^3 patches: 64 channels
    ck = tmp_path / "patch.pt"
    save_checkpoint(ck, create_model(cfg.model, 8, 2), cfg, CLASSES, 8)  # claims 8 channels
    good = write_nifti(_scan(), tmp_path / "a.nii.gz")
    res = CliRunner().invoke(app, ["explain", str(ck), str(good), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "1 failed" in res.output
    (row,) = explain(ck, [good], tmp_path / "out", device="cpu")
    assert row["error"].endswith("64 feature channels, the checkpoint expects 8")


def test_predict_explain_writes_the_same_files(checkpoint: Path, tmp_path: Path) -> None:
    good = write_nifti(_scan(), tmp_path / "a.nii.gz")
    out = tmp_path / "maps"
    res = CliRunner().invoke(app, ["predict", str(checkpoint), str(good), "--explain", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "a_gradcam.json").read_text())
    assert report["predicted"] == "cube" and _in_cube(report["peak"]["mm_ras"])
    assert {p.name for p in out.iterdir()} >= {"a_gradcam.nii.gz", "a_gradcam_sites.npz", "a_gradcam.png"}


@pytest.mark.parametrize("backend", ["sparse", "minkowski", "dense"])
def test_gradcam_sees_the_input_pooling_path(tmp_path: Path, backend: str) -> None:
    """Input pooling hands the mean and max of the input channels to the head beside the last
    stage. With every weight zero but the head's on the max-pooled HU, the whole answer takes that
    path: Grad-CAM's map is the input's, the last stage's share is zero, and the peak is the cube."""
    import torch

    from ctsparse.config import load_config
    from ctsparse.explain import explain_volume
    from ctsparse.models import create_model
    from ctsparse.models.checkpoint import build_from_checkpoint, save_checkpoint

    sets = ["preprocess.features=hu", "model.widths=[4, 4]", "model.depths=[1, 1]"]
    cfg = load_config(None, [*sets, "model.input_pooling=true", f"model.backend={backend}"])
    model = create_model(cfg.model, 1, 2)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.dim() >= 2:
                value.zero_()
        model.head.weight[1, 2 * 4 + 1] = 1.0  # [avg 4, max 4, input mean 1, input max 1]
    save_checkpoint(tmp_path / "p.pt", model, cfg, CLASSES, 1)
    model, ckpt = build_from_checkpoint(tmp_path / "p.pt")
    expl = explain_volume(model.eval(), _scan(), ckpt, method="gradcam", target="cube")
    assert expl.info["maps"]["last_stage"] == 0.0 and expl.info["maps"]["input_pooling"] > 0
    assert _in_cube(list(expl.peak_mm))
