"""The engine registry: a third engine is one module plus its registry entry, and the whole
learning path (config, train, checkpoint, predict) runs on it without MinkowskiEngine."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ctsparse.config import load_config
from ctsparse.errors import CheckpointError, ConfigError
from ctsparse.models.registry import available, register, unregister
from tests import fake_engine


@pytest.fixture
def pooled() -> Iterator[str]:
    register(fake_engine.ENGINE)
    try:
        yield fake_engine.NAME
    finally:
        unregister(fake_engine.NAME)


def test_the_config_accepts_exactly_the_registered_engines(pooled: str) -> None:
    assert pooled in available()
    assert load_config(None, [f"model.backend={pooled}"]).model.backend == pooled
    unregister(pooled)
    known = r"unknown backend 'pooled' \(known: dense, minkowski, sparse\)"
    with pytest.raises(ConfigError, match=rf"model\.backend.*{known}"):
        load_config(None, [f"model.backend={pooled}"])


def test_a_fake_engine_trains_and_predicts_end_to_end(
    pooled: str, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctsparse.models.checkpoint import load_checkpoint
    from ctsparse.predict import predict
    from ctsparse.training.loop import train

    # any `import MinkowskiEngine` on this path would now fail: the engine alone decides
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)
    cfg = load_config(
        None,
        [f"model.backend={pooled}", "train.epochs=2", "train.batch_size=4", "train.val_fraction=0.25"],
    )
    before = dict(fake_engine.calls)
    result = train(tiny_dataset, tmp_path / "run", cfg, device="auto")
    assert result.epochs_run == 2 and result.metrics["evaluated_on"] == "validation"
    assert fake_engine.calls["collate"] > before["collate"] and fake_engine.calls["build"] > before["build"]

    best = tmp_path / "run" / "best.pt"
    raw = torch.load(best, weights_only=True)
    assert raw["pooled_layout"] == "mean,max"  # the engine's own checkpoint field
    assert "MinkowskiEngine" not in raw["versions"]
    assert load_checkpoint(best).config.model.backend == pooled

    scans = sorted(tiny_dataset.rglob("*.nii.gz"))
    rows = predict(best, scans, device="auto", batch_size=3)
    assert [r["path"] for r in rows] == [str(p) for p in scans]
    classes = load_checkpoint(best).classes
    for r in rows:
        assert r["error"] is None and r["label"] in classes
        assert sum(r[f"p_{c}"] for c in classes) == pytest.approx(1.0)

    del raw["pooled_layout"]  # the engine refuses weights it cannot read
    torch.save(raw, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pooled checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
