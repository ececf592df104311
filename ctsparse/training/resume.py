"""Which settings a resumed run may change, and applying them to the checkpoint's config.

A resumed run continues under the config its checkpoint carries: the weights, optimizer state,
split and random streams were made with it, and any key that shaped them cannot change without
making the run something else. The keys below only decide how long it goes on, when it stops or
how its data is loaded, so they may change; any other key the caller sets explicitly (--set,
--config, --epochs, ...) must keep the checkpoint's value, or the resume is refused naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ctsparse.config import Config, parse_override
from ctsparse.errors import ConfigError

# key -> why it can change without altering what the run has learned so far
RESUMABLE: Mapping[str, str] = {
    "train.epochs": "the budget: more epochs extend the run (the cosine schedule stretches to the new end)",
    "train.max_minutes": "the wall-clock budget",
    "train.patience": "when to stop early",
    "data.workers": "how many processes fill the cache",
    "data.cache_dir": "where the cache lives (same preprocessing, same content key)",
    # read only after the last epoch, to fit the decision rule on the validation split
    "train.positive_class": "which class the operating threshold is set for",
    "train.target_sensitivity": "how the operating threshold is chosen",
}


def explicit_keys(config_file: str | Path | None, overrides: Iterable[str]) -> list[str]:
    """The dotted keys a command line set explicitly: every leaf of the YAML file, then --set."""
    keys: list[str] = []

    def leaves(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                leaves(v, f"{prefix}.{k}" if prefix else str(k))
        elif prefix:
            keys.append(prefix)

    if config_file is not None and Path(config_file).is_file():
        leaves(yaml.safe_load(Path(config_file).read_text()) or {}, "")
    keys += [parse_override(item)[0] for item in overrides]
    return list(dict.fromkeys(keys))


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _set(cfg: Any, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = cfg
    for part in sections:
        node = getattr(node, part)
    setattr(node, leaf, value)


def resume_config(saved: Config, requested: Config, keys: Iterable[str]) -> Config:
    """The checkpoint's config with the caller's explicit `keys` taken from `requested`.

    A key whose value equals the saved one is fine (the same command line again, plus --resume).

    Raises:
        ConfigError: a key outside RESUMABLE would change.
    """
    out = dataclasses.replace(saved)  # sections are replaced below, never mutated in place
    for section in dataclasses.fields(Config):
        setattr(out, section.name, dataclasses.replace(getattr(saved, section.name)))
    for key in keys:
        old, new = _get(saved, key), _get(requested, key)
        if old == new:
            continue
        if key not in RESUMABLE:
            allowed = ", ".join(RESUMABLE)
            raise ConfigError(
                key, f"cannot change on --resume (the run used {old!r}, asked {new!r}); may change: {allowed}"
            )
        _set(out, key, new)
    return out
