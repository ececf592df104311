"""`ctsparse benchmark`: the sparse model against its dense twin, side by side in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .console import console, handles_errors
from .render import atomic_path, fmt_float, fmt_pct, make_table, write_json

DEFAULT_THRESHOLDS = "-500,-300,-100,100,200,400"
DEFAULT_FILLS = "0.02,0.05,0.1,0.2,0.4"
NUMERIC_COLUMNS = [
    "sites", "occupancy", "sparse fwd s", "dense fwd s", "speed-up", "x ideal",
    "sparse step s", "dense step s", "sparse MB", "dense MB",
]  # fmt: skip


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


def _plot(rows: list[dict[str, Any]], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r for r in rows if "sparse_forward_s" in r), key=lambda r: r["occupancy"])
    occ = [100 * r["occupancy"] for r in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(occ, [r["sparse_forward_s"] for r in pts], "o-", label="sparse (ME)")
    dense = [(100 * r["occupancy"], r["dense_forward_s"]) for r in pts if "dense_forward_s" in r]
    if dense:
        a1.plot(*zip(*dense, strict=True), "s-", label="dense twin (Conv3d)")
        a1.plot(
            occ, [r.get("ideal_sparse_s", float("nan")) for r in pts], ":", label="ideal = occupancy x dense"
        )
    a1.set_xlabel("occupancy (%)")
    a1.set_ylabel("forward time (s, median)")
    a1.legend()
    a2.plot(occ, [r["sparse_peak_rss_mb"] for r in pts], "o-", label="sparse")
    dmem = [(100 * r["occupancy"], r["dense_peak_rss_mb"]) for r in pts if "dense_peak_rss_mb" in r]
    if dmem:
        a2.plot(*zip(*dmem, strict=True), "s-", label="dense twin")
    a2.set_xlabel("occupancy (%)")
    a2.set_ylabel("peak RSS during forward (MB)")
    a2.legend()
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@handles_errors
def benchmark(
    scans: Annotated[
        list[Path] | None, typer.Argument(help="Scans to benchmark on; default: one phantom.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (model + preprocessing).")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override key=value.")] = None,
    thresholds: Annotated[
        str, typer.Option(help="HU thresholds of the occupancy sweep.")
    ] = DEFAULT_THRESHOLDS,
    fills: Annotated[
        str, typer.Option(help="Synthetic fill levels (fractions); empty to skip.")
    ] = DEFAULT_FILLS,
    spacings: Annotated[
        str, typer.Option(help="Isotropic spacings (mm) of the resolution sweep; empty to skip.")
    ] = "",
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per case (median reported).")] = 5,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads (default: torch's).")] = None,
    no_train_step: Annotated[
        bool, typer.Option("--no-train-step", help="Skip the training-step timing.")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write all rows to JSON.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of time and memory vs occupancy.")] = None,
) -> None:
    """Time and memory of the sparse model vs its dense twin over occupancy and resolution."""
    from dataclasses import replace

    import torch

    from ctsparse import benchmark as bench
    from ctsparse.config import load_config
    from ctsparse.device import resolve_device
    from ctsparse.sparsify import sparsify

    cfg = load_config(config, list(set_ or []))
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    volumes = []
    if scans:
        from ctsparse.io import read_volume

        volumes = [read_volume(p) for p in scans]
    else:
        from ctsparse.data.phantoms import case_rng, make_phantom

        volumes = [make_phantom("nodule", case_rng(0, 0), source="phantom:0/0")]
    rows: list[dict[str, Any]] = []
    for vol in volumes:
        cases = bench.threshold_cases(vol, cfg.preprocess, _floats(thresholds)) if thresholds else []
        base = sparsify(vol, cfg.preprocess)
        if fills:
            cases += bench.fill_cases(base, _floats(fills))
        for s in _floats(spacings) if spacings else []:
            cases.append((f"spacing {s:g} mm", sparsify(vol, replace(cfg.preprocess, spacing=[s, s, s]))))
        for name, sv in cases:
            with console.status(f"{Path(vol.source).name}: {name} ({sv.n_sites} sites)"):
                row = {
                    "scan": vol.source,
                    "case": name,
                    **bench.compare(sv, cfg.model, dev, runs, 1, not no_train_step),
                }
            rows.append(row)
            console.print(
                f"{name:>18}: occupancy {fmt_pct(row['occupancy'])}  "
                f"sparse {fmt_float(row.get('sparse_forward_s'), '.3f')} s  "
                f"dense {fmt_float(row.get('dense_forward_s'), '.3f')} s  "
                f"speed-up x{fmt_float(row.get('speedup'), '.2f')}"
            )
        layers = bench.layer_profile(base, cfg.model, dev)
        rows.append(
            {"scan": vol.source, "case": "sparse layer profile", "layers": layers, "sites": base.n_sites}
        )
    table = make_table(
        f"sparse vs dense twin ({dev}, {torch.get_num_threads()} threads, median of {runs})",
        ["case", *NUMERIC_COLUMNS],
        right=NUMERIC_COLUMNS,
    )
    for r in rows:
        if "layers" in r:
            continue
        table.add_row(
            r["case"],
            str(r["sites"]),
            fmt_pct(r["occupancy"]),
            fmt_float(r.get("sparse_forward_s"), ".3f"),
            fmt_float(r.get("dense_forward_s"), ".3f"),
            fmt_float(r.get("speedup"), ".2f"),
            fmt_float(r.get("sparse_over_ideal"), ".1f"),
            fmt_float(r.get("sparse_train_step_s"), ".3f"),
            fmt_float(r.get("dense_train_step_s"), ".3f"),
            fmt_float(r.get("sparse_peak_rss_mb"), ".0f"),
            fmt_float(r.get("dense_peak_rss_mb"), ".0f") if "dense_error" not in r else "failed",
        )
    console.print(table)
    for r in rows:
        if "layers" in r:
            total = sum(r["layers"].values()) or 1.0
            parts = ", ".join(
                f"{k} {v * 1000:.1f} ms ({100 * v / total:.0f}%)"
                for k, v in sorted(r["layers"].items(), key=lambda kv: -kv[1])
            )
            console.print(f"sparse forward, where the time goes ({r['sites']} sites): {parts}")
    if json_out:
        write_json(
            json_out, {"device": str(dev), "threads": torch.get_num_threads(), "runs": runs, "rows": rows}
        )
        console.print(f"wrote {json_out}")
    if plot:
        _plot([r for r in rows if "layers" not in r], plot)
        console.print(f"wrote {plot}")
