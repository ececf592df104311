"""Checkpoints: identical predictions after a round trip, safe loading, one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ctsparse.collate import collate
from ctsparse.config import load_config
from ctsparse.errors import CheckpointError
from ctsparse.models import create_model
from ctsparse.models.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from ctsparse.sparse_volume import SparseVolume

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")


def _svs(n: int = 3) -> list[SparseVolume]:
    rng = np.random.default_rng(5)
    out = []
    for _ in range(n):
        coords = np.ascontiguousarray(np.argwhere(rng.random((10, 9, 8)) < 0.3), dtype=np.int32)
        out.append(
            SparseVolume(
                coords, rng.standard_normal((len(coords), 1)).astype(np.float32), (10, 9, 8), np.eye(4)
            )
        )
    return out


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_round_trip_gives_identical_predictions(tmp_path: Path, backend: str) -> None:
    cfg = load_config(None, [f"model.backend={backend}", "model.widths=[4, 8]", "model.depths=[1, 1]"])
    model = create_model(cfg.model, 1, 2).eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, cfg, ["a", "b"], 1)
    loaded, ckpt = build_from_checkpoint(path)
    loaded.eval()
    batch = collate(_svs(), None, cfg.model, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(batch.inputs), loaded(batch.inputs))
    assert ckpt.classes == ["a", "b"] and ckpt.config.model.backend == backend
    assert not list(tmp_path.glob("*.tmp")), "atomic save must leave no temp file"


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "ctsparse-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_bad_checkpoints_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a ctsparse checkpoint"):
        load_checkpoint(other)

    cfg = load_config(None, ["model.widths=[4, 8]", "model.depths=[1, 1]"])
    good = tmp_path / "good.pt"
    save_checkpoint(good, create_model(cfg.model, 1, 2), cfg, ["a", "b"], 1)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(truncated)

    # a checkpoint whose config no longer matches the weights (e.g. edited widths)
    raw = torch.load(good, weights_only=True)
    raw["config"]["model"]["widths"] = [4, 16]
    edited = tmp_path / "edited.pt"
    torch.save(raw, edited)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        build_from_checkpoint(edited)
    # a checkpoint from a config schema this version does not know
    raw["config"]["model"]["width_multiplier"] = 2
    torch.save(raw, edited)
    with pytest.raises(CheckpointError, match=r"model\.width_multiplier"):
        load_checkpoint(edited)


def test_cross_checkpoint_from_the_unpatched_cross_kernel_is_refused(tmp_path: Path) -> None:
    """A sparse cross model saved before ctsparse patched ME's cross kernel has weights for other
    offsets: loading it must fail with the reason, not silently predict with shuffled weights."""
    cfg = load_config(None, ["model.kernel=cross", "model.widths=[4, 8]", "model.depths=[1, 1]"])
    path = tmp_path / "cross.pt"
    save_checkpoint(path, create_model(cfg.model, 1, 2), cfg, ["a", "b"], 1)
    assert load_checkpoint(path).config.model.kernel == "cross"  # this build's checkpoints load
    raw = torch.load(path, weights_only=True)
    del raw["kernel_order"]  # as every checkpoint written before the patch
    old = tmp_path / "old_cross.pt"
    torch.save(raw, old)
    with pytest.raises(CheckpointError, match=r"unpatched cross kernel.*retrain"):
        load_checkpoint(old)
    # the dense twin's cross (a masked Conv3d) never depended on ME: still loads
    raw["config"]["model"]["backend"] = "dense"
    torch.save(raw, old)
    assert load_checkpoint(old).config.model.backend == "dense"


def test_a_checkpoint_older_than_a_config_key_keeps_the_value_it_was_trained_with(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.widths=[4, 8]", "model.depths=[1, 1]"])
    path = tmp_path / "m.pt"
    save_checkpoint(path, create_model(cfg.model, 1, 2), cfg, ["a", "b"], 1)
    raw = torch.load(path, weights_only=True)
    assert raw["config"]["preprocess"]["blob_hu_max"] == -100.0  # today's defaults are written
    assert raw["config"]["preprocess"]["lung_grid_mm"] == 2.0
    assert raw["config"]["preprocess"]["blob_grid"] == "scan"
    assert raw["config"]["preprocess"]["blob_candidates"] == 0
    for key in ("blob_hu_max", "lung_grid_mm", "blob_grid", "blob_candidates"):
        del raw["config"]["preprocess"][key]
    torch.save(raw, path)
    old = load_checkpoint(path).config.preprocess
    assert old.blob_hu_max == 200.0
    assert old.lung_grid_mm is None  # the lung region on the scan's own grid, as it was computed
    assert old.blob_grid == "resampled"  # the blob filter after resampling, as it was computed
    assert old.blob_candidates == 0  # every site, as before the candidate stage existed
