"""Checkpoints: weights + resolved config + class names + preprocessing + versions.

Loaded with torch.load(weights_only=True): only tensors, dicts, lists and scalars are unpickled,
never arbitrary objects, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import platform
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctsparse import __version__
from ctsparse.config import Config, from_dict, to_dict
from ctsparse.errors import CheckpointError, ConfigError
from ctsparse.fileio import atomic_write
from ctsparse.models.engine import Engine
from ctsparse.models.registry import create_model, get_engine

FORMAT = "ctsparse-checkpoint"
FORMAT_VERSION = 1


@dataclass
class LoadedCheckpoint:
    config: Config
    classes: list[str]
    in_channels: int
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any]
    # which kernels ran the engine that wrote it (Engine.implementation), "" in older checkpoints
    implementation: str = ""


def versions(engine: Engine) -> dict[str, str]:
    base = {"ctsparse": __version__, "torch": str(torch.__version__), "python": platform.python_version()}
    return {**base, **engine.versions()}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    cfg: Config,
    classes: list[str],
    in_channels: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Atomic write: a temp file in the same folder, fsync, rename. A crash leaves the old file."""
    path = Path(path)
    engine = get_engine(cfg.model.backend)
    payload = {
        # what the engine needs to know about these weights later (e.g. ME's cross-kernel order)
        **engine.checkpoint_fields(),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": to_dict(cfg),
        "classes": list(classes),
        "in_channels": int(in_channels),
        "versions": versions(engine),
        "implementation": engine.implementation(next(model.parameters()).device),
        "extra": extra or {},
    }
    with atomic_write(path) as fh:
        torch.save(payload, fh)


# Keys added to the config after checkpoints were already written, with the value those older
# checkpoints were trained with (not today's default): their scans must be preprocessed as before.
LEGACY_DEFAULTS = {"preprocess": {"blob_hu_max": 200.0, "lung_grid_mm": None, "blob_grid": "resampled"}}


def _with_legacy_defaults(config: Any) -> Any:
    if not isinstance(config, dict):
        return config
    out = dict(config)
    for section, keys in LEGACY_DEFAULTS.items():
        if isinstance(out.get(section), dict):
            out[section] = {**keys, **out[section]}
    return out


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(
            path, "not a readable checkpoint (not a torch zip archive: truncated or another format)"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", msg)
        if found or "Weights only load failed" in msg:
            what = (
                f"it references {found.group(1)}"
                if found
                else "it holds data the safe (weights-only) loader rejects"
            )
            raise CheckpointError(
                path, f"refused to load: {what}; only tensors and plain data are unpickled"
            ) from exc
        raise CheckpointError(path, "not a readable checkpoint (corrupt or not a torch file)") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            path, f"not a readable checkpoint (truncated or not a torch file): {exc}"
        ) from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(path, "not a ctsparse checkpoint (no 'format' marker)")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            path, f"checkpoint format {raw.get('format_version')}, this ctsparse reads {FORMAT_VERSION}"
        )
    try:
        cfg = from_dict(_with_legacy_defaults(raw["config"]))
    except ConfigError as exc:
        raise CheckpointError(path, f"its config does not match this ctsparse version: {exc}") from exc
    try:
        reason = get_engine(cfg.model.backend).refuse_checkpoint(cfg.model, raw)
    except ImportError as exc:
        raise CheckpointError(path, f"its engine {cfg.model.backend!r} cannot run here: {exc}") from exc
    if reason:
        raise CheckpointError(path, reason)
    return LoadedCheckpoint(
        cfg,
        list(raw["classes"]),
        int(raw["in_channels"]),
        raw["state_dict"],
        raw.get("extra", {}),
        str(raw.get("implementation", "")),
    )


def describe_model(path: str | Path, ckpt: LoadedCheckpoint) -> dict[str, Any]:
    """What a report names the model by: the checkpoint file and its hash, a hash of the resolved
    config (two checkpoints with the same one preprocess and build alike), this ctsparse version
    and the engine that runs it, the classes and the decision rule."""
    path = Path(path)
    engine = get_engine(ckpt.config.model.backend)
    config_json = json.dumps(to_dict(ckpt.config), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    engine_versions = ", ".join(f"{k} {v}" for k, v in versions(engine).items() if k != "python")
    return {
        "name": f"ctsparse {ckpt.config.model.backend} classifier",
        "checkpoint": f"{path.parent.name}/{path.name}",
        "checkpoint_sha256": digest.hexdigest(),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "ctsparse_version": __version__,
        "engine": f"{ckpt.config.model.backend} ({engine_versions})",
        "classes": list(ckpt.classes),
        "decision": ckpt.extra.get("decision") or {},
    }


def build_from_checkpoint(
    path: str | Path, ckpt: LoadedCheckpoint | None = None, backend: str | None = None
) -> tuple[torch.nn.Module, LoadedCheckpoint]:
    """Model with the checkpoint's weights; a mismatch names the differing tensors.

    `backend` builds another engine's model than the one that wrote the checkpoint (e.g. a
    `sparse` checkpoint on `minkowski`: the same network and weights); the weights must fit it.
    """
    ckpt = ckpt or load_checkpoint(path)
    if backend is not None and backend != ckpt.config.model.backend:
        model_cfg = dataclasses.replace(ckpt.config.model, backend=backend)
        ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, model=model_cfg))
    model = create_model(ckpt.config.model, ckpt.in_channels, len(ckpt.classes))
    own = model.state_dict()
    missing = [k for k in own if k not in ckpt.state_dict]
    unexpected = [k for k in ckpt.state_dict if k not in own]
    shapes = [
        f"{k} {tuple(ckpt.state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in ckpt.state_dict and ckpt.state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"shape mismatch: {shapes[0]}")
        raise CheckpointError(path, f"weights do not fit the model its config describes: {'; '.join(parts)}")
    model.load_state_dict(ckpt.state_dict)
    return model, ckpt
