"""`ctsparse phantoms`: write a labelled set of synthetic chest CT scans (normal / nodule)."""

from __future__ import annotations

import os
import time
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .console import console, handles_errors


class PhantomFormat(str, Enum):
    nifti = "nifti"
    dicom = "dicom"


def _triple(text: str) -> tuple[float, float, float]:
    """'96x96x64' -> (96.0, 96.0, 64.0); BadParameter (exit code 2) if it is not three positive numbers."""
    try:
        values = tuple(float(p) for p in text.lower().replace("×", "x").split("x"))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise typer.BadParameter(f"expected three positive numbers like 96x96x64, got {text!r}")
    return values[0], values[1], values[2]


def _check_triple(text: str | None) -> str | None:
    if text is not None:
        _triple(text)
    return text


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split("-"))
    except ValueError:
        lo = hi = -1.0
    if not 0 < lo <= hi:
        raise typer.BadParameter(f"expected MIN-MAX with 0 < MIN <= MAX, like 6-20, got {text!r}")
    return lo, hi


def _check_range(text: str) -> str:
    _range(text)
    return text


@handles_errors
def phantoms(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the scans and labels.csv into.")],
    *,
    # 1200: the planned model learns a 6-20 mm nodule from 480 training scans clearly better than
    # from 160, and from 960 better again (docs/benchmarks.md, "Out of the box")
    n: Annotated[
        int, typer.Option("--n", "-n", min=1, help="Number of scans (1200 at 2.5 mm take about 3.4 GB).")
    ] = 1200,
    seed: Annotated[int, typer.Option(min=0, help="Seed; the same seed writes identical scans.")] = 0,
    format: Annotated[
        PhantomFormat, typer.Option("--format", "-f", help="File format.")
    ] = PhantomFormat.nifti,
    size: Annotated[
        str | None,
        typer.Option(
            callback=_check_triple,
            help="Voxels XxYxZ (before --vary changes the slice count). Default: a 350x350x320 mm "
            "chest field at --spacing (140x140x128 at the default spacing).",
        ),
    ] = None,
    spacing: Annotated[
        str, typer.Option(callback=_check_triple, help="Voxel size in mm, XxYxZ.")
    ] = "2.5x2.5x2.5",
    classes: Annotated[str, typer.Option(help="Comma-separated classes: normal, nodule.")] = "normal,nodule",
    balanced: Annotated[bool, typer.Option(help="Equal class counts (else random labels).")] = True,
    vary: Annotated[
        bool, typer.Option(help="Vary field of view (±10 %) and slice count (-20..+10 %) per scan.")
    ] = True,
    nodule_mm: Annotated[
        str, typer.Option(callback=_check_range, help="Nodule diameter range in mm, MIN-MAX.")
    ] = "6-20",
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes writing scans (default: the CPU count, at most 8); the "
            "scans do not depend on it.",
        ),
    ] = None,
) -> None:
    """Write synthetic chest CT phantoms with real HU values and a labels.csv (path,label)."""
    from ctsparse.data.phantoms import generate_phantoms, phantom_labels

    shape = tuple(int(v) for v in _triple(size)) if size is not None else None
    names = tuple(c.strip() for c in classes.split(",") if c.strip())
    start = time.perf_counter()
    with console.status(f"writing {n} phantoms to {out_dir}", spinner="dots"):
        paths = generate_phantoms(
            out_dir,
            n,
            seed,
            format.value,
            classes=names,
            shape=shape,
            spacing=_triple(spacing),
            balanced=balanced,
            vary_geometry=vary,
            nodule_mm=_range(nodule_mm),
            workers=workers or min(os.cpu_count() or 1, 8),
        )
    elapsed = time.perf_counter() - start
    counts = Counter(phantom_labels(n, seed, names, balanced))
    table = Table(title="phantoms written")
    table.add_column("class")
    table.add_column("scans", justify="right")
    for name in names:
        table.add_row(name, str(counts[name]))
    console.print(table)
    console.print(f"{len(paths)} scans ({format.value}) in {elapsed:.1f} s", highlight=False)
    console.print(f"labels: {Path(out_dir) / 'labels.csv'}", highlight=False, soft_wrap=True)
    console.print(
        f"findings (nodule centres in mm, RAS+, and radii): {Path(out_dir) / 'findings.csv'}",
        highlight=False,
        soft_wrap=True,
    )
