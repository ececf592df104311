"""`ctsparse benchmark`: the sparse model against its dense twin, side by side in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, cast

import typer

from ctsparse.fileio import atomic_write

from .console import console, handles_errors
from .render import fmt_float, fmt_pct, make_table, write_json

DEFAULT_THRESHOLDS = "-500,-300,-100,100,200,400"
DEFAULT_FILLS = "0.02,0.05,0.1,0.2,0.4"
NUMERIC_COLUMNS = [
    "sites", "occupancy", "sparse fwd s", "dense fwd s", "speed-up", "x ideal",
    "sparse step s", "dense step s", "sparse fwd MB", "dense fwd MB",
]  # fmt: skip


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


def _plot(rows: list[dict[str, Any]], target: Path) -> None:
    """Time vs occupancy on the base grid; time vs grid size over the resolution sweep; memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def voxels(r: dict[str, Any]) -> int:
        x, y, z = (int(v) for v in r["dense_grid"].split("x"))
        return x * y * z

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.5))
    ok = [r for r in rows if "sparse_forward_s" in r]
    for kernel, marker in (("cube", "o"), ("cross", "^")):
        base = sorted((r for r in ok if r["kernel"] == kernel and " mm, " not in r["case"]),
                      key=lambda r: r["occupancy"])  # fmt: skip
        sweep = [r for r in ok if r["kernel"] == kernel and " mm, " in r["case"]]
        for backend, style in (("sparse", "-"), ("dense", "--")):
            key = f"{backend}_forward_s"
            pts = [(100 * r["occupancy"], r[key]) for r in base if key in r]
            if pts:
                a1.plot(*zip(*pts, strict=True), marker + style, label=f"{backend}, {kernel}")
            for level in sorted({r["case"].split(", ", 1)[1] for r in sweep}):
                line = sorted((voxels(r), r[key]) for r in sweep if r["case"].endswith(level) and key in r)
                if line:
                    a2.plot(*zip(*line, strict=True), marker + style, label=f"{backend}, {kernel}, {level}")
            mem = [(r["sites"], r[f"{backend}_forward_mb"]) for r in ok
                   if r["kernel"] == kernel and f"{backend}_forward_mb" in r]  # fmt: skip
            if mem:
                a3.scatter(*zip(*mem, strict=True), marker=marker, label=f"{backend}, {kernel}")
    a1.set(xlabel="occupancy of the base grid (%)", ylabel="forward time (s, median)", yscale="log")
    a2.set(xlabel="dense grid voxels (resolution sweep)", ylabel="forward time (s, median)")
    a2.set(xscale="log", yscale="log")
    a3.set(xlabel="sites", ylabel="memory of one forward (MB)", xscale="log", yscale="log")
    # a panel without data (e.g. no occupancy sweep: --thresholds "" --fills "") is left out
    kept = [ax for ax in (a1, a2, a3) if ax.has_data()] or [a1]
    grid = fig.add_gridspec(1, len(kept))
    for ax in (a1, a2, a3):
        if ax in kept:
            ax.set_subplotspec(grid[kept.index(ax)])
            ax.legend(fontsize=7)
        else:
            fig.delaxes(ax)
    fig.set_size_inches(16 * len(kept) / 3, 4.5)
    fig.tight_layout()
    with atomic_write(target) as fh:
        fig.savefig(fh, format="png", dpi=100)
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
        str,
        typer.Option(
            help="Isotropic spacings (mm) of the resolution sweep, e.g. 3.65,2,1.4: the default phantom "
            "is rendered at each (a scan is resampled on read) and run at the config's threshold and "
            "at 200 HU; empty to skip."
        ),
    ] = "",
    kernels: Annotated[
        str, typer.Option(help="Kernels to compare, e.g. cube,cross (default: the config's).")
    ] = "",
    memory: Annotated[
        str,
        typer.Option(
            help="Forward memory: 'subprocess' (a fresh process per case and backend) or 'inprocess'."
        ),
    ] = "subprocess",
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
    from ctsparse.benchmark_sweep import run_benchmark
    from ctsparse.config import load_config
    from ctsparse.device import configure_threads

    cfg = load_config(config, list(set_ or []))
    if memory not in ("subprocess", "inprocess"):
        raise typer.BadParameter(f"--memory must be subprocess or inprocess, got {memory!r}")
    kernel_list = [k.strip() for k in kernels.split(",") if k.strip()]
    if bad := [k for k in kernel_list if k not in ("cube", "cross")]:
        raise typer.BadParameter(f"--kernels: unknown kernel {bad[0]!r} (cube, cross)")
    # torch, ME's OpenMP and the BLAS behind ME's convolutions (inherited by the memory probes)
    configure_threads(threads)
    with console.status("") as status:

        def show(kind: str, info: dict[str, Any]) -> None:
            if kind == "case":
                scan = Path(info["scan"]).name
                status.update(f"{scan}: {info['case']}, {info['kernel']} ({info['sites']} sites)")
            elif kind == "row":
                console.print(
                    f"{info['case']:>26} {info['kernel']:>5}: occupancy {fmt_pct(info['occupancy'])}  "
                    f"sparse {fmt_float(info.get('sparse_forward_s'), '.3f')} s  "
                    f"dense {fmt_float(info.get('dense_forward_s'), '.3f')} s  "
                    f"speed-up x{fmt_float(info.get('speedup'), '.2f')}"
                )

        report = run_benchmark(
            list(scans or []),
            cfg,
            device=device,
            thresholds=_floats(thresholds),
            fills=_floats(fills),
            spacings=_floats(spacings),
            kernels=kernel_list,
            runs=runs,
            train_step=not no_train_step,
            memory=cast(Any, memory),
            on_event=show,
        )
    rows, summary = report["rows"], report["summary_5_20_pct"]
    cases_rows = [r for r in rows if "layers" not in r]
    table = make_table(
        f"sparse vs dense twin ({report['device']}, {report['threads']} threads, median of {runs}; "
        f"forward memory: {memory})",
        ["case", "kernel", *NUMERIC_COLUMNS],
        right=NUMERIC_COLUMNS,
    )
    for r in cases_rows:
        table.add_row(
            r["case"],
            r["kernel"],
            str(r["sites"]),
            fmt_pct(r["occupancy"]),
            fmt_float(r.get("sparse_forward_s"), ".3f"),
            fmt_float(r.get("dense_forward_s"), ".3f"),
            fmt_float(r.get("speedup"), ".2f"),
            fmt_float(r.get("sparse_over_ideal"), ".1f"),
            fmt_float(r.get("sparse_train_step_s"), ".3f"),
            fmt_float(r.get("dense_train_step_s"), ".3f"),
            fmt_float(r.get("sparse_forward_mb"), ".1f"),
            fmt_float(r.get("dense_forward_mb"), ".1f") if "dense_error" not in r else "failed",
        )
    console.print(table)
    for group, sm in summary.items():
        console.print(
            f"{group}: {len(sm['cases'])} case(s) at 5-20 % occupancy, median speed-up "
            f"x{sm['median_speedup']:.1f}, sparse time = {sm['median_sparse_over_ideal']:.1f} x "
            "(occupancy x dense time)"
        )
    for r in rows:
        if "layers" in r:
            total = sum(r["layers"].values()) or 1.0
            parts = ", ".join(
                f"{k} {v * 1000:.1f} ms ({100 * v / total:.0f}%)"
                for k, v in sorted(r["layers"].items(), key=lambda kv: -kv[1])
            )
            console.print(f"sparse forward, where the time goes ({r['sites']} sites): {parts}")
    if json_out:
        write_json(json_out, report)
        console.print(f"wrote {json_out}")
    if plot:
        _plot(cases_rows, plot)
        console.print(f"wrote {plot}")
