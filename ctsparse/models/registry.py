"""Engines by name, timm-style: get_engine(name), create_model(cfg, in_channels, num_classes).

The built-in engines are imported on first use, so the dense twin never needs MinkowskiEngine and
importing the registry (the config does, to check `model.backend`) loads neither torch nor ME.
The engine modules do not import this one: each only defines its `ENGINE`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from ctsparse.errors import ConfigError
from ctsparse.models.engine import Engine

if TYPE_CHECKING:
    import torch

    from ctsparse.config import ModelConfig

# name -> the module under models/ that defines its ENGINE (or "module:NAME" for another
# attribute). A new engine is one line here.
BUILTIN: dict[str, str] = {
    # the network on the kept sites: ctsparse's kernels on the CPU, MinkowskiEngine on CUDA
    "sparse": "ctsparse.models.sparse",
    # the same network and weights on MinkowskiEngine on every device
    "minkowski": "ctsparse.models.sparse:MINKOWSKI",
    "dense": "ctsparse.models.dense",  # the same topology with Conv3d on the densified grid
}
_LOADED: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    """Add (or replace) an engine at run time, e.g. a plug-in or a test's fake engine."""
    _LOADED[engine.name] = engine
    return engine


def unregister(name: str) -> None:
    """Forget a run-time engine (a built-in one is imported again on its next use)."""
    _LOADED.pop(name, None)


def available() -> list[str]:
    """Every engine name `model.backend` accepts (without importing any engine)."""
    return sorted({*BUILTIN, *_LOADED})


def get_engine(name: str) -> Engine:
    """The engine called `name`; an unknown name is a ConfigError listing the known ones.

    Raises ImportError when the engine's own dependencies are missing (e.g. sparse without ME).
    """
    if name not in _LOADED:
        if name not in BUILTIN:
            raise ConfigError("model.backend", f"unknown backend {name!r} (known: {', '.join(available())})")
        module, _, attribute = BUILTIN[name].partition(":")
        engine = getattr(import_module(module), attribute or "ENGINE")
        _LOADED[name] = engine
    return _LOADED[name]


def create_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> torch.nn.Module:
    return get_engine(cfg.backend).build(cfg, in_channels, num_classes)
