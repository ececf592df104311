"""MetaImage reader on files written by ITK itself (SimpleITK): geometry against ITK's own NIfTI
export of the same image, compression, discovery beside the .raw file, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctsparse.errors import NotCTError, ScanError
from ctsparse.io import find_scans, read_volume

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (a dev dependency) writes the test files")

# a tilted, permuted and flipped grid: rows are the directions of the array's three axes
DIRECTION = (0.0, 0.0, -1.0, 0.9950042, 0.0998334, 0.0, -0.0998334, 0.9950042, 0.0)


def itk_image(dtype: str = "int16") -> tuple[object, np.ndarray]:
    rng = np.random.default_rng(0)
    zyx = rng.integers(-1000, 1500, size=(7, 6, 5)).astype(dtype)  # ITK's numpy view is z, y, x
    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-120.5, 33.0, 410.25))
    img.SetDirection(DIRECTION)
    return img, zyx


@pytest.mark.parametrize(("name", "compress"), [("ct.mhd", False), ("ct.mha", True), ("ct.mhd", True)])
def test_geometry_and_values_match_itks_own_nifti_export(tmp_path: Path, name: str, compress: bool) -> None:
    img, _ = itk_image()
    sitk.WriteImage(img, str(tmp_path / name), compress)
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    mine, reference = read_volume(tmp_path / name), read_volume(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(mine.array, reference.array)
    np.testing.assert_allclose(mine.affine, reference.affine, atol=1e-4)
    assert mine.meta["format"] == "metaimage" and mine.array.dtype == np.float32
    # a voxel's world position: ITK's (LPS) against ours (RAS+), through our canonical axes
    lps = np.array(img.TransformIndexToPhysicalPoint((4, 0, 6)))
    ras_world = lps * [-1, -1, 1]
    ijk = np.linalg.solve(mine.affine[:3, :3], ras_world - mine.affine[:3, 3])
    assert np.allclose(ijk, np.round(ijk), atol=1e-4)
    i, j, k = np.round(ijk).astype(int)
    assert mine.array[i, j, k] == sitk.GetArrayViewFromImage(img)[6, 0, 4]


@pytest.mark.parametrize("dtype", ["uint8", "int32", "float32", "float64"])
def test_element_types(tmp_path: Path, dtype: str) -> None:
    img, zyx = itk_image(dtype)
    img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp_path / "v.mhd"))
    vol = read_volume(tmp_path / "v.mhd")
    assert vol.array.shape == (5, 6, 7)  # x, y, z; identity LPS becomes x and y flipped in RAS+
    np.testing.assert_array_equal(vol.array, zyx.T[::-1, ::-1, :].astype(np.float32))
    assert vol.spacing == pytest.approx((0.7, 0.8, 2.5))


def test_resampled_while_reading_like_nifti(tmp_path: Path) -> None:
    img, _ = itk_image()
    sitk.WriteImage(img, str(tmp_path / "ct.mhd"))
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    a = read_volume(tmp_path / "ct.mhd", spacing=(1.5, 1.5, 1.5))
    b = read_volume(tmp_path / "ct.nii.gz", spacing=(1.5, 1.5, 1.5))
    np.testing.assert_allclose(a.array, b.array, atol=1e-3)
    assert a.meta["resampled_from"]["shape"] == b.meta["resampled_from"]["shape"]


def test_found_in_a_dataset_folder_without_its_raw_file(tmp_path: Path) -> None:
    img, _ = itk_image()
    (tmp_path / "sub").mkdir()
    sitk.WriteImage(img, str(tmp_path / "sub" / "a.mhd"))
    sitk.WriteImage(img, str(tmp_path / "b.mha"))
    assert (tmp_path / "sub" / "a.raw").is_file()
    assert find_scans(tmp_path) == [tmp_path / "b.mha", tmp_path / "sub" / "a.mhd"]


def test_the_cache_key_covers_the_data_file(tmp_path: Path) -> None:
    """A .raw re-exported under an unchanged header is another scan: the preprocessing cache
    must not hand back the old one."""
    from ctsparse.sparse_volume import content_key

    img, _ = itk_image()
    sitk.WriteImage(img, str(tmp_path / "ct.mhd"))
    before = content_key(tmp_path / "ct.mhd", {})
    raw = tmp_path / "ct.raw"
    blob = bytearray(raw.read_bytes())
    blob[0] ^= 1
    raw.write_bytes(bytes(blob))
    assert content_key(tmp_path / "ct.mhd", {}) != before


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    img, _ = itk_image()
    sitk.WriteImage(img, str(tmp_path / "gone.mhd"))
    (tmp_path / "gone.raw").unlink()
    sitk.WriteImage(img, str(tmp_path / "short.mhd"))
    raw = tmp_path / "short.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    sitk.WriteImage(img, str(tmp_path / "zip.mha"), True)
    blob = (tmp_path / "zip.mha").read_bytes()
    (tmp_path / "zip.mha").write_bytes(blob[: len(blob) - 40])
    (tmp_path / "text.mhd").write_text("this is not a header\n")
    header = (tmp_path / "gone.mhd").read_text()
    rgb = header.replace("ElementType", "ElementNumberOfChannels = 3\nElementType")
    (tmp_path / "rgb.mhd").write_text(rgb)
    expected = {
        "gone.mhd": "data file gone.raw is missing",
        "short.mhd": "truncated MetaImage data",
        "zip.mha": "compressed MetaImage data",
        "text.mhd": "not a MetaImage header",
        "rgb.mhd": "3 channels",
        "short.raw": "pass the MetaImage header",
    }
    for name, reason in expected.items():
        with pytest.raises(ScanError) as info:
            read_volume(tmp_path / name)
        message = str(info.value)
        assert name in message and reason in message and "\n" not in message, message


def test_another_modality_is_refused_unless_allowed(tmp_path: Path) -> None:
    img, _ = itk_image()
    sitk.WriteImage(img, str(tmp_path / "ct.mhd"))
    header = (tmp_path / "ct.mhd").read_text()
    (tmp_path / "mr.mhd").write_text("Modality = MET_MOD_MR\n" + header)
    (tmp_path / "labelled_ct.mhd").write_text("Modality = MET_MOD_CT\n" + header)
    with pytest.raises(NotCTError, match="modality MR"):
        read_volume(tmp_path / "mr.mhd")
    assert read_volume(tmp_path / "mr.mhd", allow_non_ct=True).meta["modality"] == "MR"
    assert read_volume(tmp_path / "labelled_ct.mhd").meta["modality"] == "CT"


def test_a_luna16_shaped_dataset_marks_the_same_balls_as_its_nifti_twin(tmp_path: Path) -> None:
    """MetaImage scans written by ITK with findings in LPS world coordinates (LUNA16's layout):
    every candidate ball gets the class it gets from the same phantoms as NIfTI with RAS rows."""
    import csv

    from ctsparse.candidates import ball_labels, split_balls
    from ctsparse.config import load_config
    from ctsparse.data.datasets import discover_dataset, read_findings
    from ctsparse.data.phantoms import generate_phantoms
    from ctsparse.sparsify import sparsify

    nifti, meta = tmp_path / "nifti", tmp_path / "mhd"
    generate_phantoms(nifti, 4, seed=21)
    meta.mkdir()
    for scan in sorted(nifti.glob("*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(scan)), str(meta / scan.name.replace(".nii.gz", ".mhd")))
    labels = (nifti / "labels.csv").read_text().replace(".nii.gz", ".mhd")
    (meta / "labels.csv").write_text(labels)
    with open(nifti / "findings.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(meta / "findings.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["seriesuid", "path", "x_mm", "y_mm", "z_mm", "diameter_mm", "frame"])
        for r in rows:
            x, y, z, radius = (float(r[k]) for k in ("x_mm", "y_mm", "z_mm", "radius_mm"))
            out.writerow([r["path"][:-7], r["path"].replace(".nii.gz", ".mhd"), -x, -y, z, 2 * radius, "LPS"])
    cfg = load_config(
        None,
        [
            "preprocess.spacing=[2.5, 2.5, 2.5]",
            "preprocess.region=lungs",
            "preprocess.blob_channel=true",
            "preprocess.blob_candidates=8",
            "preprocess.features=hu",
            "preprocess.patch_size=1",
        ],
    ).preprocess
    found = {d: read_findings(d) for d in (nifti, meta)}
    samples = {d: discover_dataset(d) for d in (nifti, meta)}
    assert [s.label for s in samples[nifti]] == [s.label for s in samples[meta]]
    marked = 0
    for a, b in zip(samples[nifti], samples[meta], strict=True):
        labelled = []
        for d, s in ((nifti, a), (meta, b)):
            sv = sparsify(read_volume(s.path), cfg)
            marks = found[d].get(s.path.resolve())
            sv = sv if marks is None else sv.with_findings(marks)
            labelled.append(ball_labels(sv, split_balls(sv, 8), 0, 1))
        assert labelled[0] == labelled[1], a.path.name
        marked += labelled[0].count(0)
    assert marked >= 2  # the nodule scans' findings are on balls in both
