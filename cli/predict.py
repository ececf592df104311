"""`ctsparse predict CHECKPOINT SCAN...`: labels, probabilities, per-stage time and memory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from . import options
from .console import console, handles_errors

if TYPE_CHECKING:
    from ctsparse.dicom_node.sr import SRResult
from .render import (
    add_error_row,
    fmt_float,
    fmt_pct,
    make_table,
    non_ct_hint,
    series_cell,
    skipped_lines,
    write_csv,
    write_json,
)


@handles_errors
def predict(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="A best.pt / last.pt written by `ctsparse train`.")],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="NIfTI or MetaImage files, DICOM folders, dataset folders, globs or dicomweb:URL."
        ),
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write rows to .csv or .json.")] = None,
    device: options.Device = "auto",
    batch_size: options.BatchSize = 1,
    series: options.Series = None,
    threads: options.Threads = None,
    workers: options.Workers = 0,
    allow_non_ct: options.AllowNonCT = False,
    dicom_out: Annotated[
        Path | None,
        typer.Option(
            "--dicom-out",
            help="Write a DICOM SR per DICOM series (with --explain also its saliency as a Parametric Map).",
        ),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option("--study", help="StudyInstanceUID to retrieve (WADO-RS) from dicomweb:URL inputs."),
    ] = None,
    store: Annotated[
        bool,
        typer.Option("--store", help="Send each SR back to the dicomweb:URL its series came from (STOW-RS)."),
    ] = False,
    explain_dir: Annotated[
        Path | None,
        typer.Option(
            "--explain",
            help="Also write `ctsparse explain` outputs (Grad-CAM of the predicted class) into this folder.",
        ),
    ] = None,
) -> None:
    """Predict labels for CT scans with a trained checkpoint.

    A DICOM folder holding several CT series gives one row per series; the series left out
    (other modalities, scouts, screenshots) are listed with the reason. An input
    dicomweb:http://HOST/dicom-web with --study UID [--series UID] is retrieved first.
    """
    from ctsparse.device import configure_threads
    from ctsparse.inputs import expand_inputs
    from ctsparse.predict import predict as run_predict
    from ctsparse.predict import summarize

    configure_threads(threads)  # torch + ME's OpenMP (when given) and ME's BLAS pool (always)
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise typer.BadParameter(f"{out}: --out must end in .csv or .json")
    from ctsparse.dicom_node.dicomweb import RemoteInputs

    remote = RemoteInputs.fetch(inputs, study, series, store)  # dicomweb:URL -> retrieved folders
    ctx.call_on_close(remote.cleanup)  # also when the command fails
    t0 = time.perf_counter()
    done: list[str] = []
    started: dict[str, Any] = {}  # the checkpoint's classes, decision rule and training ranges
    with console.status("predicting...") as status:
        expansion = expand_inputs(remote.inputs, series_uid=series, allow_non_ct=allow_non_ct)

        def on_row(row: dict[str, Any]) -> None:
            done.append(row["path"])
            status.update(f"predicted {len(done)} scan(s): {Path(row['path']).name}")

        rows = run_predict(
            checkpoint,
            expansion.items,
            device=device,
            batch_size=batch_size,
            series_uid=series,
            on_row=on_row,
            workers=workers,
            on_start=started.update,
            allow_non_ct=allow_non_ct,
        )
        srs: list[SRResult] = []
        sr_dir = dicom_out or remote.sr_folder
        if sr_dir is not None:
            from ctsparse.dicom_node.sr import write_result_srs

            status.update("writing DICOM SRs...")
            files = [item.series.files if item.series else None for item in expansion.items]
            srs = write_result_srs(rows, sr_dir, started["model"], files)  # one per row, in order
            for row, sr in zip(rows, srs, strict=True):
                row.update(sr.columns())
    summary = summarize(rows, time.perf_counter() - t0, started.get("decision"))
    probs = sorted({k for r in rows for k in r if k.startswith("p_")})
    flagged = any(r.get("warnings") for r in rows)
    named = any(r.get("series_uid") for r in rows)  # DICOM rows name the series they read
    table = make_table(
        "predictions",
        ["scan", *["series"] * named, "label", *probs, "sites", "occupancy", "read s", "prep s", "model s"]
        + ["peak RSS MB"]
        + ["warnings"] * flagged,
        right=[*probs, "sites", "occupancy", "read s", "prep s", "model s", "peak RSS MB"],
    )
    for r in rows:
        if r.get("error"):
            add_error_row(table, Path(r["path"]).name, non_ct_hint(r["error"]))
            continue
        warnings = r.get("warnings") or []
        table.add_row(
            Path(r["path"]).name,
            *([series_cell(r)] if named else []),
            Text.assemble(r["label"], (" !", "bold yellow")) if warnings else r["label"],
            *[fmt_float(r.get(p), ".3f") for p in probs],
            str(r["sites"]),
            fmt_pct(r["occupancy"]),
            f"{r['time_read_s']:.2f}",
            f"{r['time_preprocess_s']:.2f}",
            f"{r['time_model_s']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
            *([Text("; ".join(warnings), style="yellow")] if flagged else []),
        )
    console.print(table)
    for line in skipped_lines(expansion.skipped):
        console.print(line, highlight=False)
    console.print(f"decision: {summary['threshold']}", highlight=False)
    if started.get("training_ranges") is None:
        console.print("[yellow]the checkpoint holds no training ranges: scans not checked against them[/]")
    if summary["n_out_of_range"]:
        console.print(
            f"[bold yellow]![/] {summary['n_out_of_range']} scan(s) outside the ranges of the training "
            "scans (marked !): their labels are less trustworthy"
        )
    console.print(
        f"{summary['n_ok']} predicted, {summary['n_failed']} failed in {summary['wall_s']:.1f} s "
        f"({summary['scans_per_s']:.2f} scans/s); labels {summary['label_counts']}"
    )
    for sr in srs:  # UIDs and file names only: an SR holds patient attributes, its lines do not
        if sr.sr_path is not None:
            console.print(f"SR of series {sr.series_uid}: {sr.sr_path}", highlight=False)
        elif sr.error:
            console.print(f"[red]error[/] {sr.series_uid}: {sr.error}", highlight=False)
        elif sr.note and not sr.note.endswith("prediction failed"):
            console.print(f"[dim]{Path(sr.scan).name}: {sr.note}[/]", highlight=False)
    for sr_path, url in remote.store([(sr.scan, sr.sr_path) for sr in srs]) if store else []:
        console.print(f"stored {sr_path.name} at {url} (STOW-RS)", highlight=False)
    if out is not None:
        if out.suffix.lower() == ".json":
            skipped = [s.as_dict() for s in expansion.skipped]
            report = {"checkpoint": str(checkpoint), "summary": summary, "rows": rows, "skipped": skipped}
            write_json(out, report)
        else:
            write_csv(out, rows)
        console.print(f"wrote {out}")
    explained: list[dict[str, Any]] = []
    if explain_dir is not None:
        from .explain import run_explain

        explained = run_explain(
            checkpoint,
            list(expansion.items),
            explain_dir,
            method="gradcam",
            class_name=None,
            device=device,
            series=series,
            allow_non_ct=allow_non_ct,
        )
    maps_failed = False
    if explained and dicom_out is not None:
        from ctsparse.dicom_node.saliency import write_saliency_maps

        sources = [item.series.files if item.series else None for item in expansion.items]
        for m in write_saliency_maps(explained, sources, dicom_out, started["model"]):
            if m.path is not None:
                console.print(f"saliency map of series {m.series_uid}: {m.path}", highlight=False)
            else:
                console.print(f"[red]error[/] {m.series_uid}: {m.error}", highlight=False)
                maps_failed = True
    if (
        summary["n_failed"]
        or any(r.error for r in srs)
        or any(r.get("error") for r in explained)
        or maps_failed
    ):
        raise typer.Exit(1)
