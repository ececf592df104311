"""Timers, memory probes, formatting, and the histogram arithmetic behind `profile`."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ctsparse.config import PreprocessConfig
from ctsparse.meters import (
    Timer,
    current_rss_bytes,
    format_bytes,
    format_seconds,
    peak_memory,
    peak_rss_bytes,
    stage,
)
from ctsparse.profile import (
    coarse_histogram,
    hu_histogram,
    kept_slices,
    percentiles_from_hist,
    summarize,
    sweep_counts,
)
from ctsparse.sparsify import sparsify
from ctsparse.volume import Volume


def test_timer_accumulates_stages():
    t = Timer()
    with t.stage("a"):
        time.sleep(0.01)
    with t.stage("a"):
        time.sleep(0.01)
    with t.stage("b"):
        pass
    assert t.times["a"] >= 0.02
    assert t.times["b"] < t.times["a"]
    assert t.total == pytest.approx(t.times["a"] + t.times["b"])
    times: dict[str, float] = {}
    with pytest.raises(RuntimeError), stage(times, "boom"):
        raise RuntimeError
    assert "boom" in times


def test_rss_probes_are_plausible():
    cur = current_rss_bytes()
    assert 10 * 2**20 < cur < 64 * 2**30
    assert peak_rss_bytes() >= cur * 0.9


def test_peak_memory_sees_a_transient_allocation():
    n = 200 * 2**20  # 200 MiB, freed before the block ends
    with peak_memory() as outer:
        with peak_memory() as inner:
            a = np.ones(n // 8)
            del a
        small = np.ones(10)
        del small
    assert inner.delta_bytes > 0.8 * n
    assert outer.peak_bytes >= inner.peak_bytes  # the inner reset did not hide it from the outer
    with peak_memory() as quiet:
        pass
    assert quiet.delta_bytes < 0.5 * n
    assert quiet.method in ("VmHWM", "sampling")


def test_formatting():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(2.5) == "2.50 s"
    assert format_seconds(75) == "1m15s"


def test_histogram_sweep_and_percentiles_match_direct_counts():
    rng = np.random.default_rng(0)
    arr = rng.normal(-200, 500, size=(30, 20, 10)).astype(np.float32)
    arr[0, 0, :3] = np.nan
    arr[1, 0, 0] = -40000.0  # clamped into the bottom bin
    counts, n_nan = hu_histogram(arr)
    assert n_nan == 3 and counts.sum() == arr.size - 3
    ts = (-900, -500, 0, 300, 123.5)
    got = sweep_counts(counts, ts, arr)
    for t in ts:
        assert got[f"{t:g}"] == int(np.count_nonzero(arr >= t))
    assert sweep_counts(counts, [-40000, 40000])["-40000"] == arr.size - 3
    p = percentiles_from_hist(counts, (50,))
    assert abs(p["p50"] - np.nanpercentile(arr, 50)) <= 1.5
    h = coarse_histogram(counts)
    assert sum(h["counts"]) == arr.size - 3
    assert len(h["edges"]) == len(h["counts"]) + 1


def test_kept_slices_follow_crop_and_patch():
    arr = np.full((12, 10, 8), -1000.0, dtype=np.float32)
    arr[3:9, 2:6, 2:6] = 40.0
    vol = Volume(arr, np.diag([0.7, 0.7, 2.0, 1.0]), "x.nii")
    for cfg in (PreprocessConfig(features="hu"), PreprocessConfig(features="patch", patch_size=2)):
        sv = sparsify(vol, cfg)
        sx, sy, sz = kept_slices(sv, vol.affine, vol.shape)
        assert sx.shape == (10, 8) and sy.shape == (12, 8) and sz.shape == (12, 10)
        np.testing.assert_array_equal(sz, arr[:, :, 4] > -500)
        np.testing.assert_array_equal(sx, arr[6] > -500)


def test_summarize_counts_ok_and_failed():
    rows = [
        {"path": "a", "error": "bad"},
        {
            "path": "b",
            "occupancy": 0.2,
            "occupancy_cropped": 0.5,
            "site_occupancy": 0.5,
            "sites": 10,
            "kept_voxels": 10,
            "volume_bytes": 400,
            "memory": {
                "input": {"coords_bytes": 160, "feats_bytes": 40, "sparse_bytes": 200, "dense_bytes": 400},
                "first_layer": {"sparse_bytes": 100, "dense_bytes": 800},
            },
            "times": {"read": 1.0},
            "peak_rss_bytes": 5,
        },
        {
            "path": "c",
            "occupancy": 0.4,
            "occupancy_cropped": 0.6,
            "site_occupancy": 0.6,
            "sites": 30,
            "kept_voxels": 30,
            "volume_bytes": 400,
            "memory": {
                "input": {"coords_bytes": 480, "feats_bytes": 120, "sparse_bytes": 600, "dense_bytes": 400},
                "first_layer": {"sparse_bytes": 100, "dense_bytes": 800},
            },
            "times": {"read": 2.0},
            "peak_rss_bytes": 7,
        },
    ]
    s = summarize(rows)
    assert (s["n_scans"], s["n_ok"], s["n_failed"]) == (3, 2, 1)
    assert s["occupancy"] == {"median": pytest.approx(0.3), "min": 0.2, "max": 0.4}
    assert s["total"]["sites"] == 40 and s["seconds"] == pytest.approx(3.0)
    assert s["total"]["input_sparse_bytes"] == 800 and s["total"]["first_layer_dense_bytes"] == 1600
    assert s["failed"] == [{"path": "a", "error": "bad"}]
    assert summarize([])["occupancy"]["median"] is None
