"""Typed config: defaults, YAML files, --set overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctsparse.config import Config, check_overrides, from_dict, load_config, to_dict
from ctsparse.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# training configs; node.yaml configures `ctsparse serve` (tests/test_node_config.py)
TRAINING_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "node.yaml")


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)


def test_default_yaml_is_the_dataclass_defaults_key_for_key() -> None:
    """One source of defaults: configs/default.yaml documents Config() and lists every key."""
    assert to_dict(load_config(CONFIGS / "default.yaml")) == to_dict(Config())
    raw = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    for section, values in to_dict(Config()).items():
        assert set(raw[section]) == set(values), f"configs/default.yaml [{section}]"


@pytest.fixture(scope="module")
def two_phantoms() -> list[object]:
    from ctsparse.data.phantoms import case_rng, make_phantom

    small = {"shape": (48, 48, 32), "spacing": (7.3, 7.3, 10.0)}
    return [make_phantom(label, case_rng(1, i), **small) for i, label in enumerate(("normal", "nodule"))]  # type: ignore[arg-type]


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_shipped_configs_build_a_model_that_runs_on_their_features(
    name: str, two_phantoms: list[object]
) -> None:
    """Each config's preprocessing and model fit together: the scans it sparsifies go through the
    network it builds (channels, strides, kernel, pooled inputs) to one finite logit row per scan."""
    pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")
    import dataclasses

    import numpy as np
    import torch

    from ctsparse.models import create_model
    from ctsparse.sparsify import sparsify
    from ctsparse.training.epoch import predict_logits

    cfg = load_config(CONFIGS / name)
    # the phantoms' own coarse grid: resampling them to a 2 mm config would only cost time
    prep = dataclasses.replace(cfg.preprocess, spacing=None)
    svs = [sparsify(vol, prep) for vol in two_phantoms]  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = create_model(cfg.model, svs[0].n_channels, 2)
    logits = predict_logits(model, svs, cfg, torch.device("cpu"))
    assert logits.shape == (2, 2) and np.isfinite(logits).all()


def test_overrides_are_typed_and_applied() -> None:
    cfg = load_config(
        None, ["train.lr=1e-3", "model.widths=[8, 16]", "model.depths=[2, 2]", "preprocess.threshold=200"]
    )
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.widths == [8, 16]
    assert cfg.preprocess.threshold == 200.0 and isinstance(cfg.preprocess.threshold, float)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.lrr=1"], "train.lrr"),
        (["trian.lr=1"], "trian"),
        (["train.epochs=ten"], "train.epochs"),
        (["train.epochs=1.5"], "train.epochs"),
        (["model.backend=conv"], "model.backend"),
        (["model.widths=[8, x]"], "model.widths[1]"),
        (["preprocess.body_mask=3"], "preprocess.body_mask"),
        (["preprocess.threshold_max=-900"], "preprocess.threshold_max"),
        (["model.widths=[8]"], "model.widths"),
        (["preprocess.blob_candidates=8"], "preprocess.blob_candidates"),  # without the blob channel
        (["preprocess.blob_channel=true", "preprocess.blob_candidates=-1"], "preprocess.blob_candidates"),
        (["preprocess.blob_candidate_mm=0"], "preprocess.blob_candidate_mm"),
        (["train.ema_epochs=0"], "train.ema_epochs"),
        (["noequals"], "noequals"),
    ],
)
def test_bad_keys_and_values_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    assert key in str(info.value)


def test_overrides_checked_one_by_one_leave_the_checks_between_keys_to_the_whole() -> None:
    """Before a plan exists, each --set item is checked alone (key, type); widths without their
    depths wait for the config the plan completes."""
    alone = ["model.widths=[32, 64, 128]", "preprocess.blob_candidates=8", "train.max_minutes=5"]
    assert check_overrides(alone) == {
        "model.widths": [32, 64, 128],
        "preprocess.blob_candidates": 8,
        "train.max_minutes": 5.0,
    }
    with pytest.raises(ConfigError, match=r"model\.widths"):
        load_config(None, alone)  # the default depths have four stages
    for item, key in [
        ("train.lrr=1", "train.lrr"),
        ("trian.lr=1", "trian"),
        ("train.epochs=ten", "train.epochs"),
        ("model.widths=[8, x]", "model.widths[1]"),
        ("train.lr.x=1", "train.lr.x"),
        ("noequals", "noequals"),
    ]:
        with pytest.raises(ConfigError) as info:
            check_overrides([item])
        assert info.value.key == key, item


def test_bad_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widths: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  depth: [1]\n")
    with pytest.raises(ConfigError, match=r"model\.depth"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict() -> None:
    cfg = load_config(CONFIGS / "default.yaml", ["train.seed=7"])
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
    assert cfg.train.seed == 7
