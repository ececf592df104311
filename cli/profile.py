"""`ctsparse profile`: how sparse are these scans, and what does sparsity save?

Parse the arguments, call ctsparse.profile per scan, render. A scan that fails becomes an
error row; the others are still reported, and the exit code is 1 if any failed.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from ctsparse.config import PreprocessConfig, load_config
from ctsparse.fileio import atomic_write

from .console import console, error_line, handles_errors, is_tty
from .render import (
    add_error_row,
    fmt_bytes,
    fmt_float,
    fmt_pct,
    fmt_seconds,
    make_table,
    non_ct_hint,
    series_cell,
    skipped_lines,
    write_csv,
    write_json,
)


def _slug(path: Path, index: int) -> str:
    from ctsparse.io.discover import scan_stem

    return f"{index:03d}_" + scan_stem(path.name)


def _write_plots(row: dict[str, Any], cfg: PreprocessConfig, folder: Path, slug: str) -> list[Path]:
    """HU histogram with the threshold marked, and three orthogonal mid-slices with kept voxels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    orange = ListedColormap(["tab:orange"])

    plot = row["_plot"]
    hist_png, slices_png = folder / f"{slug}_hist.png", folder / f"{slug}_slices.png"
    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    edges, counts = np.asarray(plot["hist"]["edges"]), np.asarray(plot["hist"]["counts"])
    ax.stairs(counts, edges, fill=True, color="0.5")
    ax.set_yscale("log")  # zeros are clipped below the axis: a log scale shows both air and bone peaks
    ax.set_ylim(bottom=0.8)
    ax.axvline(cfg.threshold, color="tab:red", label=f"threshold {cfg.threshold:g} HU")
    if cfg.threshold_max is not None:
        ax.axvline(cfg.threshold_max, color="tab:red", linestyle="--", label=f"max {cfg.threshold_max:g} HU")
    ax.set(
        xlabel="HU", ylabel="voxels", title=f"{Path(row['path']).name}: occupancy {fmt_pct(row['occupancy'])}"
    )
    ax.legend(loc="upper right", fontsize=8)
    with atomic_write(hist_png) as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)

    sp = plot["spacing"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4), layout="constrained")
    titles = ("sagittal (A→, S↑)", "coronal (R→, S↑)", "axial (R→, A↑)")
    planes = ((1, 2), (0, 2), (0, 1))
    for ax, img, kept, title, (h, v) in zip(axes, plot["slices"], plot["kept"], titles, planes, strict=True):
        lo, hi = cfg.window if cfg.window is not None else (-1000.0, 1000.0)
        ax.imshow(img.T, origin="lower", cmap="gray", vmin=lo, vmax=hi, aspect=sp[v] / sp[h])
        overlay = np.ma.masked_where(~kept.T, kept.T.astype(float))
        ax.imshow(overlay, origin="lower", cmap=orange, alpha=0.45, aspect=sp[v] / sp[h])
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{Path(row['path']).name}: kept voxels (orange) at {cfg.threshold:g} HU", fontsize=10)
    with atomic_write(slices_png) as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return [hist_png, slices_png]


def _render(rows: list[dict[str, Any]], summary: dict[str, Any], skipped: list[Any]) -> None:
    named = any(r.get("series_uid") for r in rows)  # DICOM rows name the series they read
    cols = ["scan", *["series"] * named, "dims", "spacing mm", "HU p1..p99", "sites", "occupancy"]
    cols += ["in crop", "time", "peak RSS"]
    table = make_table("Sparsity per scan", cols, right=cols[4 + named :])
    for r in rows:
        if "error" in r:
            add_error_row(table, r["path"], non_ct_hint(r["error"]))
            continue
        table.add_row(
            r["path"],
            *([series_cell(r)] if named else []),
            "×".join(map(str, r["dims"])),
            "×".join(f"{s:.3g}" for s in r["spacing"]),
            f"{fmt_float(r['hu']['p1'], '.0f')}..{fmt_float(r['hu']['p99'], '.0f')}",
            f"{r['sites']:,}",
            fmt_pct(r["occupancy"]),
            fmt_pct(r["occupancy_cropped"]),
            fmt_seconds(sum(r["times"].values())),
            fmt_bytes(r["peak_rss_bytes"]),
        )
    console.print(table)
    for skip in skipped_lines(skipped):
        console.print(skip, highlight=False)
    ok = [r for r in rows if "error" not in r]
    if ok:
        _render_memory(ok)
        thresholds = list(ok[0]["sweep"])
        sweep = make_table(
            "Occupancy by threshold (HU ≥ t, before body mask)", ["scan", *thresholds], thresholds
        )
        for r in ok:
            sweep.add_row(r["path"], *(fmt_pct(r["sweep"][t]) for t in thresholds))
        console.print(sweep)
        stages = make_table("Time per stage", ["scan", *ok[0]["times"]], list(ok[0]["times"]))
        for r in ok:
            stages.add_row(r["path"], *(fmt_seconds(v) for v in r["times"].values()))
        console.print(stages)
    occ, tot = summary["occupancy"], summary["total"]
    line = f"[bold]{summary['n_ok']} ok[/], "
    line += f"[bold red]{summary['n_failed']} failed[/]" if summary["n_failed"] else "0 failed"
    if summary["n_ok"]:
        line += f"; occupancy median {fmt_pct(occ['median'])} (min {fmt_pct(occ['min'])}, "
        line += f"max {fmt_pct(occ['max'])}); {tot['sites']:,} sites; network input sparse "
        line += f"{fmt_bytes(tot['input_sparse_bytes'])} vs dense {fmt_bytes(tot['input_dense_bytes'])}, "
        line += f"first layer sparse {fmt_bytes(tot['first_layer_sparse_bytes'])} "
        line += f"vs dense {fmt_bytes(tot['first_layer_dense_bytes'])}"
    console.print(line, highlight=False)


def _render_memory(ok: list[dict[str, Any]]) -> None:
    """Sparse against dense, term by term: what the coordinates cost and where sparsity saves."""
    cols = ["scan", "sites", "grid cells", "occupied", "coords", "features", "= sparse in", "dense in"]
    cols += ["1st layer sparse", "1st layer dense"]
    table = make_table("Memory: network input and first-layer activations", cols, right=cols[1:])
    for r in ok:
        m, inp, act = r["memory"], r["memory"]["input"], r["memory"]["first_layer"]
        table.add_row(
            r["path"],
            f"{m['sites']:,}",
            f"{m['grid_cells']:,}",
            fmt_pct(m["site_occupancy"]),
            fmt_bytes(inp["coords_bytes"]),
            fmt_bytes(inp["feats_bytes"]),
            fmt_bytes(inp["sparse_bytes"]),
            fmt_bytes(inp["dense_bytes"]),
            fmt_bytes(act["sparse_bytes"]),
            fmt_bytes(act["dense_bytes"]),
        )
    console.print(table)
    m = ok[0]["memory"]
    c, w = m["channels"], m["width"]
    console.print(
        f"coords: 16 B per site (int32 batch, x, y, z, as MinkowskiEngine holds them; 12 B stored). "
        f"features: 4 B × {c} channel(s) per site; dense in: 4 B × {c} per cell of the cropped grid. "
        f"With {c} channel(s) the sparse input is the smaller only below "
        f"{fmt_pct(m['input']['break_even_occupancy'], 0)} occupied cells; the first layer "
        f"(width {w}: 4 B × {w} per site vs per cell) shares the coordinates, so from there on "
        "sparse costs occupied/all cells of dense.",
        highlight=False,
        style="dim",
    )


@handles_errors
def profile(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Scans: NIfTI or MetaImage files, DICOM files or folders (one row per CT series), dataset "
            "folders or globs."
        ),
    ],
    *,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Config YAML (preprocess section).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override, e.g. preprocess.threshold=-300.")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Shortcut for --set preprocess.threshold=T (HU).")
    ] = None,
    series: Annotated[
        str | None, typer.Option("--series", help="SeriesInstanceUID to pick in a folder.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write all rows and the summary as JSON.")
    ] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write one flat row per scan as CSV.")] = None,
    plots: Annotated[
        Path | None, typer.Option("--plots", help="Folder for a HU histogram and mid-slice PNG per scan.")
    ] = None,
    allow_non_ct: Annotated[
        bool, typer.Option("--allow-non-ct", help="Accept modalities other than CT.")
    ] = False,
) -> None:
    """Report how many voxels each scan keeps, and the memory a sparse network saves on it."""
    from ctsparse.inputs import expand_inputs
    from ctsparse.profile import profile_scan, summarize

    overrides = list(set_ or [])
    if threshold is not None:
        overrides.append(f"preprocess.threshold={threshold!r}")
    full = load_config(config, overrides)
    cfg = full.preprocess
    expansion = expand_inputs(paths, series_uid=series, allow_non_ct=allow_non_ct)
    items = expansion.items
    rows: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        status = (
            console.status(f"profiling {item.path} ({i + 1}/{len(items)})") if is_tty() else nullcontext()
        )
        with status:
            row = profile_scan(
                item, cfg, width=full.model.widths[0], allow_non_ct=allow_non_ct, plot_data=plots is not None
            )
        if plots is not None and "_plot" in row:
            row["plots"] = [str(p) for p in _write_plots(row, cfg, plots, _slug(item.path, i))]
        row.pop("_plot", None)
        rows.append(row)
    summary = summarize(rows)
    _render(rows, summary, expansion.skipped)
    if json_out is not None:
        skipped = [s.as_dict() for s in expansion.skipped]
        write_json(
            json_out,
            {"preprocess": dataclasses.asdict(cfg), "scans": rows, "summary": summary, "skipped": skipped},
        )
        console.print(f"wrote {json_out}", highlight=False)
    if csv_out is not None:
        write_csv(csv_out, rows)
        console.print(f"wrote {csv_out}", highlight=False)
    for r in rows:
        if "error" in r:
            error_line(non_ct_hint(f"{r['path']}: {r['error']}").replace("[", r"\["))
    if summary["n_failed"]:
        raise typer.Exit(1)
