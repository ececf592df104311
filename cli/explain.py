"""`ctsparse explain CHECKPOINT SCAN... --out DIR`: where in each scan the model found its answer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from . import options
from .console import console, handles_errors
from .render import add_error_row, make_table, non_ct_hint

Method = Annotated[
    str,
    typer.Option(
        "--method",
        "-m",
        help="gradcam (last stage, mapped through the strides), inputxgrad (input x gradient, per "
        "site) or occlusion (gradient-free: drop blocks of sites; one forward pass per block).",
    ),
]
ClassName = Annotated[
    str | None, typer.Option("--class", help="Class to explain (default: the predicted one).")
]


def run_explain(
    checkpoint: Path,
    inputs: list[Any],
    out: Path,
    *,
    method: str,
    class_name: str | None,
    device: str,
    series: str | None,
    allow_non_ct: bool,
) -> list[dict[str, Any]]:
    """Explain the scans and print one table row per scan (shared with `predict --explain`)."""
    from ctsparse.explain import explain as run

    done: list[str] = []
    with console.status("explaining...") as status:

        def on_row(row: dict[str, Any]) -> None:
            done.append(row["path"])
            status.update(f"explained {len(done)} scan(s): {Path(row['path']).name}")

        rows = run(
            checkpoint,
            inputs,
            out,
            method=method,
            target=class_name,
            device=device,
            series_uid=series,
            allow_non_ct=allow_non_ct,
            on_row=on_row,
        )
    table = make_table(
        f"explanations ({method})",
        ["scan", "predicted", "explained", "p", "peak (mm, RAS+)", "peak voxel", "time s", "peak RSS MB"],
        right=["p", "time s", "peak RSS MB"],
    )
    for r in rows:
        if r.get("error"):
            add_error_row(table, Path(r["path"]).name, non_ct_hint(r["error"]))
            continue
        table.add_row(
            Path(r["path"]).name,
            r["label"],
            r["class"],
            f"{r['p_class']:.3f}",
            ", ".join(f"{v:.1f}" for v in r["peak_mm"]),
            ", ".join(str(v) for v in r["peak_voxel"]),
            f"{r['time_total_s']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
        )
    console.print(table)
    for note in sorted({r["note"] for r in rows if r.get("note")}):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    n_ok = sum(not r.get("error") for r in rows)
    console.print(f"{n_ok} explained, {len(rows) - n_ok} failed; files in {out}", highlight=False)
    return rows


@handles_errors
def explain(
    checkpoint: Annotated[Path, typer.Argument(help="A best.pt / last.pt written by `ctsparse train`.")],
    inputs: Annotated[
        list[str], typer.Argument(help="NIfTI or MetaImage files, DICOM folders, dataset folders or globs.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the maps, PNGs and JSONs.")],
    method: Method = "gradcam",
    class_name: ClassName = None,
    device: options.Device = "auto",
    series: options.Series = None,
    threads: options.Threads = None,
    allow_non_ct: options.AllowNonCT = False,
) -> None:
    """Saliency maps: which part of each scan the model's answer rests on.

    Per scan, in OUT:
    NAME_METHOD.nii.gz: the map on the scan's own grid (0..1), aligned with it in a viewer;
    NAME_METHOD_sites.npz: the map on the sites the network saw;
    NAME_METHOD.png: axial, coronal and sagittal slices through the peak;
    NAME_METHOD.json: the peak in voxels and mm (RAS+), the class, time and peak memory.
    """
    from ctsparse.device import configure_threads

    configure_threads(threads)
    rows = run_explain(
        checkpoint,
        list(inputs),
        out,
        method=method,
        class_name=class_name,
        device=device,
        series=series,
        allow_non_ct=allow_non_ct,
    )
    if any(r.get("error") for r in rows):
        raise typer.Exit(1)
