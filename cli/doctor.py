"""`ctsparse doctor`: is this environment able to run ctsparse, and how is it set up?"""

from __future__ import annotations

import typer
from rich.table import Table

from .console import console, error_line, handles_errors


@handles_errors
def doctor() -> None:
    """Print Python, torch, MinkowskiEngine (CPU/CUDA build, BLAS), devices and threads."""
    from ctsparse.doctor import check_environment

    checks = check_environment()
    table = Table(title="ctsparse doctor", show_lines=False)
    table.add_column("check")
    table.add_column("ok")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(c.name, "[green]yes[/]" if c.ok else "[red]NO[/]", c.detail, end_section=False)
    console.print(table)
    failed = [c for c in checks if not c.ok]
    if failed:
        first = failed[0]
        error_line(f"{first.name}: {first.detail}; fix: {first.fix}")
        raise typer.Exit(1)
