"""Checkpoint + scans -> explanation files for each scan, one row per scan, in input order.

Each scan is read at its own resolution (the map lives on its voxel grid), sparsified exactly as
the checkpoint's training did, explained, and written to OUT as STEM_METHOD.nii.gz (the map on
the scan's grid), STEM_METHOD_sites.npz (the map on the sites), STEM_METHOD.png and
STEM_METHOD.json. A bad scan becomes an error row and the others are still explained.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctsparse.errors import CtsparseError, ScanError
from ctsparse.explain.core import class_index, explain_volume
from ctsparse.explain.methods import METHODS
from ctsparse.inputs import InputItem, expand_inputs
from ctsparse.io.discover import scan_stem
from ctsparse.io.nifti import is_nifti_name

if TYPE_CHECKING:
    import torch

    from ctsparse.models.checkpoint import LoadedCheckpoint

Row = dict[str, Any]


def explain(
    checkpoint: str | Path,
    inputs: Iterable[str | Path | InputItem],
    out_dir: str | Path,
    *,
    method: str = "gradcam",
    target: str | None = None,
    device: str = "auto",
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Explain every scan of `inputs` (files, folders, globs, or InputItems as predict takes).

    Raises (before any scan is read): CheckpointError for a missing or incompatible checkpoint,
    CtsparseError for an unknown method or class.
    """
    from ctsparse.device import resolve_device
    from ctsparse.models.checkpoint import build_from_checkpoint
    from ctsparse.models.registry import get_engine

    if method not in METHODS:
        raise CtsparseError(f"unknown explanation method {method!r} (known: {', '.join(METHODS)})")
    model, ckpt = build_from_checkpoint(checkpoint)
    if target is not None:
        class_index(ckpt.classes, target, 0)  # an unknown class is refused before any work
    engine = get_engine(ckpt.config.model.backend)
    if method != "occlusion" and engine.explain is None:
        raise CtsparseError(f"the {engine.name!r} engine has no saliency hooks: use --method occlusion")
    dev = resolve_device(device, need_me=engine.needs_me)
    model = model.to(dev).eval()
    if on_start:
        on_start({"classes": ckpt.classes, "method": method, "device": str(dev)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = expand_inputs(inputs, series_uid=series_uid, allow_non_ct=allow_non_ct).items
    rows: list[Row] = []
    used: set[str] = set()
    for item in items:
        row: Row = {"path": str(item.path), **item.describe(), "error": item.error}
        if item.error is None:
            stem = _stem(item, used)
            try:
                row.update(explain_one(model, ckpt, item, out, stem, method, target, dev, allow_non_ct))
            except CtsparseError as exc:
                row["error"] = str(exc)
            except Exception as exc:  # one broken scan must not stop the others
                row["error"] = f"{item.path}: {type(exc).__name__}: {exc}"
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def explain_one(
    model: torch.nn.Module,
    ckpt: LoadedCheckpoint,
    item: InputItem,
    out: Path,
    stem: str,
    method: str,
    target: str | None,
    device: torch.device,
    allow_non_ct: bool = False,
) -> Row:
    """Read, explain and write one scan; returns its row (files, peak, time, memory)."""
    from ctsparse.explain import outputs
    from ctsparse.io import read_volume
    from ctsparse.meters import peak_memory
    from ctsparse.sparsify import sparsify

    with peak_memory() as mem:
        t0 = time.perf_counter()
        volume = read_volume(item.path, allow_non_ct=allow_non_ct, **item.read_kwargs())
        t1 = time.perf_counter()
        sv = sparsify(volume, ckpt.config.preprocess)
        if sv.n_channels != ckpt.in_channels:
            reason = f"{sv.n_channels} feature channels, the checkpoint expects {ckpt.in_channels}"
            raise ScanError(item.path, reason)
        t2 = time.perf_counter()
        expl = explain_volume(model, volume, ckpt, method=method, target=target, device=device, sv=sv)
        t3 = time.perf_counter()
        base = f"{stem}_{method}"
        files = {
            "map": out / f"{base}.nii.gz",
            "sites": out / f"{base}_sites.npz",
            "png": out / f"{base}.png",
            "json": out / f"{base}.json",
        }
        views = outputs.ct_views(volume, expl.peak_voxel)
        del volume  # the scan's grid holds only the map from here on: the peak stays near predict's
        grid = outputs.quantized_map(expl)
        reference = item.path if is_nifti_name(item.path) and item.path.is_file() else None
        peak_voxel = outputs.write_map_nifti(expl, grid, files["map"], reference)
        outputs.write_sites_npz(expl, files["sites"])
        outputs.write_png(expl, views, grid, files["png"])
        del grid
        t4 = time.perf_counter()
    times = {"read": t1 - t0, "preprocess": t2 - t1, "explain": t3 - t2, "write": t4 - t3, "total": t4 - t0}
    figures = {"time_s": times, "peak_rss_mb": mem.peak_bytes / 2**20}
    outputs.write_json(files["json"], outputs.report(expl, peak_voxel, figures))
    return {
        "label": expl.label,
        "class": expl.target,
        "p_class": expl.probabilities[expl.target],
        "confidence": expl.probabilities[expl.label],
        "method": method,
        "peak_mm": [round(v, 2) for v in expl.peak_mm],
        "peak_voxel": peak_voxel,
        "files": {k: str(v) for k, v in files.items()},
        "time_total_s": t4 - t0,
        "peak_rss_mb": figures["peak_rss_mb"],
        "note": expl.info.get("note", ""),
    }


def _stem(item: InputItem, used: set[str]) -> str:
    """A file-name stem for the scan's outputs, unique within the run."""
    name = scan_stem(item.path.name)
    stem, n = name, 1
    while stem in used:
        n += 1
        stem = f"{name}_{n}"
    used.add(stem)
    return stem
