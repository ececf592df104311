"""Build a classifier by backend name, timm-style: create_model(cfg, in_channels, num_classes)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ctsparse.config import ModelConfig

Builder = Callable[[ModelConfig, int, int], torch.nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # imported here so that the dense twin never needs MinkowskiEngine and vice versa
    if "dense" not in _REGISTRY:
        from ctsparse.models import dense  # noqa: F401
    if "sparse" not in _REGISTRY:
        from ctsparse.models import sparse  # noqa: F401


def create_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> torch.nn.Module:
    if cfg.backend not in _REGISTRY:
        from importlib import import_module

        import_module(f"ctsparse.models.{cfg.backend}")
    return _REGISTRY[cfg.backend](cfg, in_channels, num_classes)
