"""`ctsparse plan DATA`: the settings ctsparse would choose for a dataset, each with its reason."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from .console import console, handles_errors, warn_line
from .render import fmt_bytes, make_table, write_text_atomic

MAX_SCANS = 24  # ctsparse.plan.fingerprint.MAX_SCANS (not imported: --help stays light)


def _num(v: float | None, fmt: str = ".4g") -> str:
    return "-" if v is None else format(v, fmt)


def _sites(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.1f} k" if v >= 1e4 else f"{v:.0f}"


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The fingerprint summary (medians and ranges) as table rows."""
    sc, sp, sh = s["scans"], s["spacing"], s["shape"]
    pct = s["percentiles"]
    rows = [
        (
            "scans",
            f"{sc['read']} read of {sc['total']} (at most {sc['max_scans']}, stratified by class)"
            + (f"; {sc['failed']} unreadable" if sc["failed"] else ""),
        ),
        ("classes", ", ".join(f"{c} {n}" for c, n in s["classes"].items())),
        (
            "split",
            f"train {s['split']['train']}, val {s['split']['val']}"
            + (" (split column)" if s["split"]["explicit"] else " (default seeded split)"),
        ),
        (
            "spacing (mm)",
            "median "
            + " x ".join(_num(v) for v in sp["median"])
            + "; range "
            + ", ".join(
                f"{a} {_num(lo)}-{_num(hi)}" for a, lo, hi in zip("xyz", sp["min"], sp["max"], strict=True)
            ),
        ),
        (
            "shape",
            "median "
            + " x ".join(f"{v:.0f}" for v in sh["median"])
            + "; range "
            + ", ".join(
                f"{a} {lo:.0f}-{hi:.0f}" for a, lo, hi in zip("xyz", sh["min"], sh["max"], strict=True)
            ),
        ),
        (
            "values",
            f"{s['kind']} (per scan: {', '.join(f'{k} {n}' for k, n in s['kinds'].items())}); "
            f"min {_num(s['min']['median'])}, p0.5 {_num(pct['p0.5']['median'])}, "
            f"p50 {_num(pct['p50']['median'])}, p99.5 {_num(pct['p99.5']['median'])}, "
            f"max {_num(s['max']['median'])} (medians); integer-valued in {s['integer_valued']}",
        ),
        ("at the minimum", f"{s['frac_at_min']['median']:.1%} of voxels (median)"),
        (
            "lungs",
            f"found in {s['lungs']['found']}/{s['lungs']['of']}"
            + (f" (median {s['lungs']['median_ml']:.0f} mL)" if s["lungs"]["median_ml"] else ""),
        ),
        ("occupancy", ", ".join(f">= {t}: {v:.1%}" for t, v in s["occupancy"].items())),
    ]
    st = s["sites"]
    for region in ("body", "lungs"):
        if region in st:
            rows.append(
                (
                    f"sites ({region})",
                    ", ".join(f"k={k} {_sites(v)}" for k, v in st[region].items())
                    + f" (median of {st['scans']} scans at "
                    + " x ".join(_num(v) for v in st["spacing"])
                    + f" mm, threshold {_num(st['threshold'])})",
                )
            )
    return rows


def render_planning(planning: Any) -> None:
    """Fingerprint summary, measurements and the plan table (key | value | reason)."""
    plan = planning.plan
    fp_table = make_table(f"dataset {planning.fingerprint.dataset}", ["fact", "value"])
    for name, value in summary_rows(plan.summary):
        fp_table.add_row(name, Text(value))
    console.print(fp_table)
    meas = planning.measurements
    if meas is not None and meas.steps:
        t = make_table(
            f"one training step on {meas.device} ({meas.threads} threads), scan {meas.scan}, "
            f"{meas.seconds:.0f} s in all",
            ["kernel", "patch", "sites", "step per scan", "peak memory per scan"],
            right=["patch", "sites", "step per scan", "peak memory per scan"],
        )
        for s in meas.steps:
            t.add_row(
                s.kernel,
                str(s.patch_size),
                f"{s.sites:,}",
                f"{s.step_s * 1e3:.0f} ms",
                fmt_bytes(s.peak_bytes),
            )
        console.print(t)
    table = make_table(
        "plan" + ("" if plan.measured else " (not measured on this device)"), ["key", "value", "reason"]
    )
    for key, p in plan.values.items():
        table.add_row(key, Text(str(p.value)), Text(p.reason))
    console.print(table)
    for note in plan.notes:
        warn_line(note.replace("[", r"\["))


@contextmanager
def planning_status() -> Iterator[Callable[[str, dict[str, Any]], None]]:
    """A status line that follows the planner's events."""
    with console.status("planning: reading the dataset") as status:

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "read":
                status.update(f"planning: reading scan {info['i']}/{info['n']} {Path(info['path']).name}")
            elif kind == "sites":
                status.update(f"planning: counting sites {info['i']}/{info['n']} at the median spacing")
            elif kind == "measure":
                status.update(f"planning: timing {len(info['candidates'])} training steps on {info['scan']}")

        yield on_event


@handles_errors
def plan(
    data: Annotated[
        Path, typer.Argument(help="Dataset: class subfolders, a folder with labels.csv, or a datalist JSON.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Write the plan as a config YAML (reasons as comments) for train --config."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the fingerprint, measurements and plan as JSON.")
    ] = None,
    no_measure: Annotated[
        bool, typer.Option("--no-measure", help="Do not time the model here; use conservative estimates.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (measured and budgeted)")] = "auto",
    max_scans: Annotated[
        int, typer.Option("--max-scans", min=2, help="Scans read for the fingerprint.")
    ] = MAX_SCANS,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for the measurement.")] = None,
) -> None:
    """Fingerprint a dataset, time the model on this device, and show the planned settings."""
    from ctsparse.device import configure_threads
    from ctsparse.plan import plan_dataset, plan_record, plan_yaml, write_plan_json

    configure_threads(threads)
    with planning_status() as on_event:
        planning = plan_dataset(
            data, measure=not no_measure, device=device, max_scans=max_scans, on_event=on_event
        )
    render_planning(planning)
    if out is not None:
        write_text_atomic(out, plan_yaml(planning))
        console.print(f"wrote {out}: ctsparse train {data} --config {out}", highlight=False)
    if json_out is not None:
        write_plan_json(json_out, plan_record(planning))
        console.print(f"wrote {json_out}", highlight=False)
