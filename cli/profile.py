"""`ctsparse profile`: how sparse are these scans, and what does sparsity save?

Parse the arguments, call ctsparse.profile_report per scan, render. A scan that fails becomes an
error row; the others are still reported, and the exit code is 1 if any failed.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from ctsparse.config import PreprocessConfig, load_config
from ctsparse.errors import CtsparseError

from .console import console, error_line, handles_errors, is_tty
from .render import (
    add_error_row,
    atomic_path,
    fmt_bytes,
    fmt_float,
    fmt_pct,
    fmt_seconds,
    make_table,
    write_csv,
    write_json,
)


def _expand(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """Files and DICOM folders stay as they are; dataset folders expand to their scans.
    Returns (path, error) pairs so a bad input becomes an error row instead of stopping the run."""
    out: list[tuple[Path, str | None]] = []
    for p in paths:
        if not p.exists():
            out.append((p, "no such file or folder"))
        elif p.is_dir():
            from ctsparse.io.discover import find_scans

            try:
                found = find_scans(p)
            except CtsparseError as exc:
                out.append((p, getattr(exc, "reason", str(exc))))
                continue
            if not found:
                out.append((p, "no NIfTI files or DICOM series found in this folder"))
            out.extend((f, None) for f in found)
        else:
            out.append((p, None))
    return out


def _slug(path: Path, index: int) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    return f"{index:03d}_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "scan")


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
    with atomic_path(hist_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
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
    with atomic_path(slices_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return [hist_png, slices_png]


def _render(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    cols = ["scan", "dims", "spacing mm", "HU p1..p99", "sites", "occupancy", "in crop", "dense", "sparse"]
    cols += ["act dense", "act sparse", "time", "peak RSS"]
    right = cols[4:]
    table = make_table("Sparsity per scan", cols, right=right)
    for r in rows:
        if "error" in r:
            add_error_row(table, r["path"], r["error"])
            continue
        c = r["act_channels"]
        table.add_row(
            r["path"],
            "×".join(map(str, r["dims"])),
            "×".join(f"{s:.3g}" for s in r["spacing"]),
            f"{fmt_float(r['hu']['p1'], '.0f')}..{fmt_float(r['hu']['p99'], '.0f')}",
            f"{r['sites']:,}",
            fmt_pct(r["occupancy"]),
            fmt_pct(r["occupancy_cropped"]),
            fmt_bytes(r["dense_bytes"]),
            fmt_bytes(r["sparse_bytes"]),
            f"{fmt_bytes(r['act_dense_bytes'])} @{c}ch",
            f"{fmt_bytes(r['act_sparse_bytes'])} ({fmt_float(r['act_ratio'], '.1f')}× less)",
            fmt_seconds(sum(r["times"].values())),
            fmt_bytes(r["peak_rss_bytes"]),
        )
    console.print(table)
    ok = [r for r in rows if "error" not in r]
    if ok:
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
        line += f"max {fmt_pct(occ['max'])}); {tot['sites']:,} sites, sparse "
        line += f"{fmt_bytes(tot['sparse_bytes'])} vs dense {fmt_bytes(tot['dense_bytes'])}"
    console.print(line, highlight=False)


@handles_errors
def profile(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Scans: NIfTI files, DICOM files or series folders, or dataset folders."),
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
    from ctsparse.profile_report import profile_scan, summarize

    overrides = list(set_ or [])
    if threshold is not None:
        overrides.append(f"preprocess.threshold={threshold!r}")
    cfg = load_config(config, overrides).preprocess
    inputs = _expand(paths)
    rows: list[dict[str, Any]] = []
    for i, (path, problem) in enumerate(inputs):
        if problem is not None:
            rows.append({"path": str(path), "error": problem})
            continue
        status = console.status(f"profiling {path} ({i + 1}/{len(inputs)})") if is_tty() else nullcontext()
        with status:
            row = profile_scan(
                path, cfg, series_uid=series, allow_non_ct=allow_non_ct, plot_data=plots is not None
            )
        if plots is not None and "_plot" in row:
            row["plots"] = [str(p) for p in _write_plots(row, cfg, plots, _slug(path, i))]
        row.pop("_plot", None)
        rows.append(row)
    summary = summarize(rows)
    _render(rows, summary)
    if json_out is not None:
        write_json(json_out, {"preprocess": dataclasses.asdict(cfg), "scans": rows, "summary": summary})
        console.print(f"wrote {json_out}", highlight=False)
    if csv_out is not None:
        write_csv(csv_out, rows)
        console.print(f"wrote {csv_out}", highlight=False)
    for r in rows:
        if "error" in r:
            error_line(f"{r['path']}: {r['error']}".replace("[", r"\["))
    if summary["n_failed"]:
        raise typer.Exit(1)
