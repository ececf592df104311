"""`ctsparse benchmark` and its library: kernels, resolution sweep, memory probe, summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from ctsparse.cli.main import app
from ctsparse.config import ModelConfig, PreprocessConfig
from ctsparse.io import write_nifti

TINY = ["--set", "model.widths=[4,8]", "--set", "model.depths=[1,1]", "--set", "preprocess.features=patch"]


def _scan(tmp_path: Path) -> Path:
    from ctsparse.data.phantoms import case_rng, make_phantom

    vol = make_phantom("nodule", case_rng(0, 0), shape=(24, 24, 16), spacing=(14.0, 14.0, 20.0))
    return write_nifti(vol, tmp_path / "scan.nii.gz")


def test_cli_compares_kernels_over_occupancy_and_resolution(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # --threads sets it: restored afterwards
    out = tmp_path / "bench.json"
    args = ["benchmark", str(_scan(tmp_path)), *TINY, "--runs", "1", "--threads", "1", "--no-train-step",
            "--thresholds=-500,100", "--fills", "0.1", "--spacings", "20", "--kernels", "cube,cross",
            "--memory", "inprocess", "--json", str(out), "--plot", str(tmp_path / "bench.png")]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    rows = [r for r in report["rows"] if "layers" not in r]
    assert {r["kernel"] for r in rows} == {"cube", "cross"}
    assert sorted(r["case"] for r in rows if r["kernel"] == "cube") == sorted(
        [
            "threshold -500 HU",
            "threshold 100 HU",
            "fill 10%",
            "20 mm, threshold -500 HU",
            "20 mm, threshold 200 HU",
        ]
    )
    spaced = [r for r in rows if r["case"].startswith("20 mm") and r["kernel"] == "cube"]
    assert spaced[0]["grid"] == spaced[1]["grid"] != rows[0]["grid"]  # one dense grid per spacing
    assert spaced[1]["occupancy"] < spaced[0]["occupancy"]
    for r in rows:
        assert r["sparse_forward_s"] > 0 and r["dense_forward_s"] > 0
        assert r["sparse_over_ideal"] == r["sparse_forward_s"] / (r["occupancy"] * r["dense_forward_s"])
        assert r["memory_method"] == "inprocess" and "sparse_forward_mb" in r
    summary = report["summary_5_20_pct"]  # the 10 % fill is in range
    assert {key.split(" ")[0] for key in summary} == {"cube", "cross"}
    assert any("fill 10%" in v["cases"] for v in summary.values())
    assert all(v["median_sparse_over_ideal"] > 0 for v in summary.values())
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "5-20 % occupancy" in res.output


def test_forward_memory_is_measured_in_a_fresh_process() -> None:
    import torch

    from ctsparse.benchmark import forward_memory
    from ctsparse.sparse_volume import SparseVolume

    rng = np.random.default_rng(0)
    flat = np.sort(rng.choice(16**3, size=400, replace=False))
    coords = np.ascontiguousarray(np.stack(np.unravel_index(flat, (16, 16, 16)), 1), dtype=np.int32)
    sv = SparseVolume(coords, rng.normal(size=(400, 2)).astype(np.float32), (16, 16, 16), np.eye(4))
    torch.set_num_threads(1)
    for backend in ("sparse", "dense"):
        mem = forward_memory(sv, ModelConfig(widths=[4, 8], depths=[1, 1]), backend)
        assert mem["memory_probe"] in ("VmHWM", "sampling")
        assert mem["base_rss_mb"] > 50  # interpreter + torch at least
        assert mem["peak_rss_mb"] >= mem["base_rss_mb"] and mem["forward_mb"] >= 0


def test_phantom_at_renders_the_same_patient_on_finer_grids() -> None:
    from ctsparse.benchmark_sweep import phantom_at
    from ctsparse.sparsify import sparsify

    coarse, fine = phantom_at(12.0), phantom_at(8.0)
    assert fine.array.size > coarse.array.size
    np.testing.assert_allclose(coarse.spacing, (12.0, 12.0, 12.0))
    cfg = PreprocessConfig(threshold=-500.0)
    a, b = sparsify(coarse, cfg), sparsify(fine, cfg)
    # the body occupies about the same volume in mm^3 at both resolutions
    assert abs(a.n_sites * 12.0**3 - b.n_sites * 8.0**3) < 0.15 * b.n_sites * 8.0**3
