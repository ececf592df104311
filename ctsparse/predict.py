"""Checkpoint + scans -> one prediction row per scan, with per-stage time and memory.

Preprocessing comes from the checkpoint, so predict sees exactly what training saw. A bad scan
becomes an error row and the others are still predicted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctsparse.calibration import Decision
from ctsparse.collate import collate
from ctsparse.device import resolve_device
from ctsparse.errors import CtsparseError, ScanError
from ctsparse.inputs import InputItem, expand_inputs
from ctsparse.models.checkpoint import build_from_checkpoint, describe_model
from ctsparse.models.registry import get_engine
from ctsparse.ood import out_of_range, scan_quantities
from ctsparse.sparse_volume import SparseVolume

Row = dict[str, Any]


def predict(
    checkpoint: str | Path,
    inputs: Iterable[str | Path | InputItem],
    *,
    device: str = "auto",
    batch_size: int = 1,
    series_uid: str | None = None,
    on_row: Callable[[Row], None] | None = None,
    workers: int = 0,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    expand: bool = True,
    allow_non_ct: bool = False,
) -> list[Row]:
    """One row per input, in input order; a bad input becomes an error row.

    Probabilities are softmax(logits / T) and the label follows the checkpoint's decision rule
    (ctsparse/calibration.py; argmax for checkpoints without one). Each row's `warnings` lists the
    quantities outside the training ranges (ctsparse/ood.py).

    A DICOM folder holding several CT series gives one row per series (``ctsparse.inputs``);
    each row names its series (series_uid, series_description, n_slices).

    Args:
        series_uid: read only this SeriesInstanceUID of multi-series folders.
        workers: processes that read and sparsify scans ahead of the model (0: this process).
        on_start: called once the checkpoint is loaded, before any scan is read, with its
            classes, decision rule, training ranges and model card (``describe_model``: what
            ``ctsparse.dicom_node.sr`` names the model by); it may raise to stop the run.
        expand: False takes each input as one scan path (a labelled dataset's samples), without
            expanding folders or globs.
        allow_non_ct: read DICOM series of other modalities instead of refusing them.
    """
    from ctsparse.meters import peak_memory
    from ctsparse.prepare import iter_prepared

    model, ckpt = build_from_checkpoint(checkpoint)
    cfg = ckpt.config
    dev = resolve_device(device, need_me=get_engine(cfg.model.backend).needs_me)
    model = model.to(dev).eval()
    decision = Decision.from_dict(ckpt.extra.get("decision"))
    ranges = ckpt.extra.get("training_ranges")
    if on_start:
        model_card = describe_model(checkpoint, ckpt)  # what a DICOM report names the model by
        on_start(
            {"classes": ckpt.classes, "decision": decision, "training_ranges": ranges, "model": model_card}
        )
    rows: list[Row] = []
    pending: list[tuple[Row, SparseVolume]] = []

    def flush() -> None:
        if not pending:
            return
        svs = [sv for _, sv in pending]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        with peak_memory() as mem, torch.no_grad():
            batch = collate(svs, None, cfg.model, dev)
            logits = model(batch.inputs).float().cpu().numpy()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        probs = decision.probabilities(logits)
        labels = decision.labels(probs, ckpt.classes)
        seconds = time.perf_counter() - t0
        total_sites = sum(sv.n_sites for sv in svs) or 1
        for (row, sv), p, k in zip(pending, probs, labels, strict=True):
            row["label"] = ckpt.classes[int(k)]
            row["confidence"] = float(p[k])  # of the label given, which the threshold may make the lower
            row.update({f"p_{c}": float(v) for c, v in zip(ckpt.classes, p, strict=True)})
            # a batch's model time is shared out by sites, the quantity it scales with
            row["time_model_s"] = seconds * sv.n_sites / total_sites
            row["time_total_s"] = row["time_read_s"] + row["time_preprocess_s"] + row["time_model_s"]
            # process RSS peak over this scan's read + preprocess and its batch's forward pass
            row["peak_rss_mb"] = max(row.pop("_peak_prep_bytes"), mem.peak_bytes) / 2**20
            if dev.type == "cuda":
                row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            rows.append(row)
            if on_row:
                on_row(row)
        pending.clear()

    if expand:
        items = expand_inputs(inputs, series_uid=series_uid, allow_non_ct=allow_non_ct).items
    else:
        items = [p if isinstance(p, InputItem) else InputItem(Path(p), series_uid) for p in inputs]
    todo = [it for it in items if it.error is None]
    prepared = iter_prepared(todo, cfg.preprocess, workers, allow_non_ct)
    position: dict[int, int] = {}
    for index, item in enumerate(items):
        path, err = item.path, item.error
        row: Row = {"path": str(path), **item.describe(), "error": err, "warnings": []}
        position[id(row)] = index
        if err is None:
            try:
                prep = next(prepared)  # read + sparsify, done here or by a worker process
                if isinstance(prep, str):
                    raise CtsparseError(prep)
                sv = prep.sv
                row["_peak_prep_bytes"] = prep.peak_bytes
                row.update(
                    {
                        "time_read_s": prep.time_read_s,
                        "time_preprocess_s": prep.time_preprocess_s,
                        "sites": sv.n_sites,
                        "occupancy": sv.occupancy,
                        "grid": "x".join(map(str, sv.grid_shape)),
                        "warnings": out_of_range(scan_quantities(sv), ranges),
                    }
                )
                if sv.n_channels != ckpt.in_channels:
                    raise ScanError(
                        path, f"{sv.n_channels} feature channels, the checkpoint expects {ckpt.in_channels}"
                    )
                pending.append((row, sv))
                if len(pending) >= batch_size:
                    flush()
                continue
            except CtsparseError as exc:
                row["error"] = str(exc)
            except Exception as exc:  # one broken scan must not stop the others
                row["error"] = f"{path}: {type(exc).__name__}: {exc}"
        rows.append(row)
        if on_row:
            on_row(row)
    flush()
    # batching finishes scans out of input order; report them in input order
    rows.sort(key=lambda r: position[id(r)])
    return rows


def summarize(rows: list[Row], wall_s: float, decision: Decision | None = None) -> dict[str, Any]:
    ok = [r for r in rows if not r.get("error")]
    d = decision or Decision()
    counts: dict[str, int] = {}
    for r in ok:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return {
        "n_scans": len(rows),
        "n_ok": len(ok),
        "n_failed": len(rows) - len(ok),
        "wall_s": wall_s,
        "scans_per_s": len(ok) / wall_s if wall_s else 0.0,
        "label_counts": counts,
        "median_total_s": float(np.median([r["time_total_s"] for r in ok])) if ok else float("nan"),
        "peak_rss_mb": max((r["peak_rss_mb"] for r in ok), default=float("nan")),
        "n_out_of_range": sum(bool(r.get("warnings")) for r in ok),
        "threshold": d.describe(),
        "decision": d.to_dict(),
    }
