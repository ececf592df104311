"""`ctsparse benchmark`'s sweep: the cases of one scan (or the default phantom) at several
occupancies and resolutions, each a SparseVolume on a fixed grid so that only the varied quantity
changes, and `run_benchmark`, which compares the engines on every case (ctsparse/benchmark.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctsparse.config import Config, PreprocessConfig
from ctsparse.sparse_volume import SparseVolume
from ctsparse.volume import Volume

if TYPE_CHECKING:
    from ctsparse.benchmark import Memory

BONE_HU = 200.0  # the resolution sweep's second level: a bone window keeps a few % to ~15 %
Case = tuple[str, SparseVolume]


def default_phantom() -> Volume:
    """What `ctsparse benchmark` runs on without scans: case 0 of seed 0, a nodule phantom."""
    from ctsparse.data.phantoms import case_rng, make_phantom

    return make_phantom("nodule", case_rng(0, 0), source="phantom:0/0")


def phantom_at(spacing: float, seed: int = 0) -> Volume:
    """The benchmark's default phantom (case 0 of `seed`) rendered at an isotropic `spacing`: the
    same patient on a finer or coarser grid, not an interpolation of a coarse volume."""
    from ctsparse.data.phantoms import case_rng, make_phantom

    return make_phantom("nodule", case_rng(seed, 0), spacing=(spacing,) * 3, source=f"phantom:{seed}/0")


def threshold_cases(
    volume: Volume, cfg: PreprocessConfig, thresholds: Sequence[float]
) -> list[tuple[str, SparseVolume]]:
    """Occupancy sweep through the HU threshold. The crop is fixed to the body's bounding box at
    the lowest threshold so that every case has the same dense grid (only occupancy changes)."""
    from ctsparse.sparsify import sparsify

    base = sparsify(volume, replace(cfg, threshold=min(thresholds), threshold_max=None))
    out = []
    for t in thresholds:
        sv = sparsify(volume, replace(cfg, threshold=t, threshold_max=None, crop=False))
        out.append((f"threshold {t:g} HU", _recrop(sv, base, cfg)))
    return out


def _recrop(sv: SparseVolume, base: SparseVolume, cfg: PreprocessConfig) -> SparseVolume:
    """Express `sv` (uncropped) on `base`'s cropped grid."""
    offset = np.rint(np.linalg.solve(sv.affine, base.affine[:, 3])[:3]).astype(np.int64)
    coords = sv.coords.astype(np.int64) - offset
    keep = np.all((coords >= 0) & (coords < np.asarray(base.grid_shape)), axis=1)
    return replace(
        sv,
        coords=np.ascontiguousarray(coords[keep], dtype=np.int32),
        feats=sv.feats[keep],
        grid_shape=base.grid_shape,
        affine=base.affine,
    )


def fill_cases(sv: SparseVolume, fills: Sequence[float], seed: int = 0) -> list[tuple[str, SparseVolume]]:
    """Synthetic occupancy levels on `sv`'s grid: its kept sites thinned or padded at random."""
    rng = np.random.default_rng(seed)
    total = int(np.prod(sv.grid_shape))
    out = []
    for f in fills:
        n = max(1, round(f * total))
        flat = rng.choice(total, size=n, replace=False)
        coords = np.ascontiguousarray(
            np.stack(np.unravel_index(np.sort(flat), sv.grid_shape), 1), dtype=np.int32
        )
        feats = rng.standard_normal((n, sv.n_channels)).astype(np.float32) * 0.3
        out.append((f"fill {100 * f:g}%", replace(sv, coords=coords, feats=feats)))
    return out


def sweep_cases(
    volume: Volume,
    cfg: PreprocessConfig,
    *,
    thresholds: Sequence[float] = (),
    fills: Sequence[float] = (),
    spacings: Sequence[float] = (),
    from_file: bool = False,
) -> tuple[SparseVolume, list[Case]]:
    """The scan sparsified as configured, and every case of the sweep on it.

    Occupancy: through the HU threshold (`thresholds`) and synthetic fill levels on the configured
    grid (`fills`). Resolution: the scan at each isotropic spacing in `spacings` (read again from
    its file when `from_file`, else the default phantom rendered at that spacing), each at the
    config's threshold and at BONE_HU on one dense grid.
    """
    from ctsparse.sparsify import sparsify

    cases = threshold_cases(volume, cfg, thresholds) if thresholds else []
    base = sparsify(volume, cfg)
    if fills:
        cases += fill_cases(base, fills)
    for s in spacings:
        if from_file:
            from ctsparse.io import read_volume

            at = read_volume(Path(volume.source), spacing=(s, s, s))
        else:
            at = phantom_at(s)
        levels = [cfg.threshold, BONE_HU]
        for name, sv in threshold_cases(at, replace(cfg, spacing=None), levels):
            cases.append((f"{s:g} mm, {name}", sv))
    return base, cases


Event = Callable[[str, dict[str, Any]], None]


def run_benchmark(
    scans: Sequence[str | Path],
    cfg: Config,
    *,
    device: str = "auto",
    thresholds: Sequence[float] = (),
    fills: Sequence[float] = (),
    spacings: Sequence[float] = (),
    kernels: Sequence[str] = (),
    runs: int = 5,
    train_step: bool = True,
    memory: Memory = "subprocess",
    on_event: Event | None = None,
) -> dict[str, Any]:
    """`ctsparse benchmark`: on each scan (the default phantom when none), every case of
    `sweep_cases` with each kernel in `kernels` (default: the config's) through `compare`; then
    the subject engine's per-layer profile of the scan as configured.

    Events: ("case", {scan, case, kernel, sites}) before each comparison, ("row", row) after it.
    Returns the report: device, threads, runs, memory, summary_5_20_pct and rows.
    """
    import torch

    from ctsparse.benchmark import BASELINE, SUBJECT, compare, layer_profile, occupancy_summary
    from ctsparse.device import resolve_device
    from ctsparse.models.registry import get_engine

    emit = on_event or (lambda kind, info: None)
    dev = resolve_device(device, need_me=get_engine(SUBJECT).needs_me or get_engine(BASELINE).needs_me)
    if scans:
        from ctsparse.io import read_volume

        volumes = [read_volume(p) for p in scans]
    else:
        volumes = [default_phantom()]
    rows: list[dict[str, Any]] = []
    for vol in volumes:
        base, cases = sweep_cases(
            vol, cfg.preprocess, thresholds=thresholds, fills=fills, spacings=spacings, from_file=bool(scans)
        )
        # kernels innermost: cube and cross of one case run back to back, under the same load
        for name, sv in cases:
            for kernel in kernels or [cfg.model.kernel]:
                emit("case", {"scan": vol.source, "case": name, "kernel": kernel, "sites": sv.n_sites})
                model_cfg = replace(cfg.model, kernel=kernel)  # type: ignore[arg-type]
                row = {
                    "scan": vol.source,
                    "case": name,
                    **compare(sv, model_cfg, dev, runs, 1, train_step, memory),
                }
                rows.append(row)
                emit("row", row)
        layers = layer_profile(base, cfg.model, dev)
        rows.append(
            {"scan": vol.source, "case": f"{SUBJECT} layer profile", "layers": layers, "sites": base.n_sites}
        )
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "runs": runs,
        "memory": memory,
        "summary_5_20_pct": occupancy_summary([r for r in rows if "layers" not in r]),
        "rows": rows,
    }
