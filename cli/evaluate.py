"""`ctsparse evaluate CHECKPOINT DATA`: metrics with 95 % CIs on a labelled set, and report files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from . import options
from .console import console, handles_errors
from .render import add_error_row, fmt_float, make_table, write_json

METRIC_NAMES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "auroc": "AUROC (macro)",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}


@handles_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A best.pt written by `ctsparse train`.")],
    data: Annotated[
        Path,
        typer.Argument(
            help="Labelled scans: class subfolders, a folder with labels.csv, or a datalist JSON."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Report folder (default: runs/evaluate/<run folder>-<dataset name>)."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the metrics JSON to this file.")
    ] = None,
    n_boot: Annotated[int, typer.Option("--n-boot", min=0, help="Bootstrap resamples for the CIs.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resampling.")] = 0,
    device: options.Device = "auto",
    batch_size: options.BatchSize = 1,
    series: options.Series = None,
    threads: options.Threads = None,
    workers: options.Workers = 0,
    allow_non_ct: options.AllowNonCT = False,
) -> None:
    """Evaluate a checkpoint on labelled CT scans: metrics with bootstrap 95 % CIs, ROC, calibration."""
    from ctsparse.device import configure_threads
    from ctsparse.evaluate import evaluate as run_evaluate

    configure_threads(threads)
    done: list[str] = []
    with console.status("evaluating...") as status:

        def on_row(row: dict[str, Any]) -> None:
            done.append(row["path"])
            status.update(f"predicted {len(done)} scan(s): {Path(row['path']).name}")

        ev = run_evaluate(
            checkpoint,
            data,
            out_dir=out,
            n_boot=n_boot,
            seed=seed,
            device=device,
            batch_size=batch_size,
            series_uid=series,
            workers=workers,
            allow_non_ct=allow_non_ct,
            on_row=on_row,
        )
    m = ev.metrics
    if json_out is not None:
        write_json(json_out, m)
        ev.files.append(json_out)
    _render(m, ev.rows)
    console.print("wrote " + ", ".join(str(f) for f in ev.files), highlight=False)
    if m["n_failed"]:
        raise typer.Exit(1)


def _render(m: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    scored = m["metrics"]
    ci = f"{100 * m['bootstrap']['level']:.0f} % CI"
    table = make_table(
        f"{m['n_evaluated']} scans evaluated ({m['scans']})", ["metric", "value", ci], right=["value", ci]
    )
    names = dict(METRIC_NAMES)
    if len(m["classes"]) > 2:  # the two one-vs-rest AUROCs of a two-class task are the macro value
        names.update({f"auroc_{c}": f"AUROC {c}" for c in m["classes"]})
    else:
        names["auroc"] = "AUROC"
    for key, label in names.items():
        if key in scored:
            s = scored[key]
            table.add_row(label, fmt_float(s["value"], ".3f"), f"{fmt_float(s['ci_low'], '.3f')}-"
                          f"{fmt_float(s['ci_high'], '.3f')}")  # fmt: skip
    table.add_row("ECE (15 bins)", fmt_float(m["ece"], ".3f"), "")
    console.print(table)

    classes = m["classes"]
    cm = make_table("confusion matrix", ["true / predicted", *classes], right=classes)
    for c, counts in zip(classes, m["confusion_matrix"], strict=True):
        cm.add_row(c, *map(str, counts))
    console.print(cm)
    console.print(f"decision: {m['threshold']}", highlight=False)
    console.print(
        f"bootstrap: {m['bootstrap']['n_boot']} resamples, seed {m['bootstrap']['seed']} "
        f"({m['bootstrap']['method']})",
        highlight=False,
    )

    flagged = [r for r in rows if r["warnings"] and not r["error"]]
    if flagged:
        warn = make_table(f"{len(flagged)} scan(s) outside the training ranges", ["", "scan", "warnings"])
        for r in flagged:
            warn.add_row(Text("!", style="bold yellow"), Path(r["path"]).name, "; ".join(r["warnings"]))
        console.print(warn)
    if m["n_failed"]:
        failed = make_table(f"{m['n_failed']} scan(s) failed, not in the metrics", ["scan", "error"])
        for f in m["failed"]:
            add_error_row(failed, Path(f["path"]).name, f["error"])
        console.print(failed)
    console.print(f"metrics over {m['metrics_over']}", highlight=False)
