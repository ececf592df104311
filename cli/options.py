"""Options that several commands share, declared once (Typer's Annotated style)."""

from __future__ import annotations

from typing import Annotated

import typer

Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Scans per forward pass.")]
Series = Annotated[
    str | None, typer.Option("--series", help="SeriesInstanceUID to take from multi-series folders.")
]
Threads = Annotated[int | None, typer.Option(min=1, help="CPU threads for torch/ME (default: all cores).")]
Workers = Annotated[
    int, typer.Option(min=0, help="Processes that read and sparsify scans ahead of the model.")
]
AllowNonCT = Annotated[
    bool, typer.Option("--allow-non-ct", help="Read DICOM series of other modalities (MR, PT, ...).")
]
