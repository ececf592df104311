"""Rendering helpers shared by the commands: atomic JSON/CSV outputs, flat rows, table cells.

Every output file goes through ctsparse.fileio.atomic_write (PNGs too: savefig into its file): a
temporary name in the target folder, fsync, rename; an interrupted command leaves no half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from ctsparse.errors import NOT_CT
from ctsparse.fileio import atomic_write_text
from ctsparse.meters import format_bytes, format_seconds

__all__ = [
    "add_error_row",
    "error_cell",
    "flatten",
    "fmt_bytes",
    "fmt_float",
    "fmt_pct",
    "fmt_seconds",
    "jsonable",
    "make_table",
    "non_ct_hint",
    "series_cell",
    "skipped_lines",
    "write_csv",
    "write_json",
    "write_text_atomic",
]

ERROR_STYLE = "bold red"
fmt_bytes = format_bytes
fmt_seconds = format_seconds


def write_text_atomic(target: str | Path, text: str) -> None:
    atomic_write_text(target, text)


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, Paths to str, NaN/inf to null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, without importing numpy here
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(target: str | Path, obj: Any) -> None:
    write_text_atomic(target, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted columns; lists of numbers become '512x512x300', others '; '-joined.
    Keys starting with '_' (in-memory extras such as plot arrays) are dropped."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            sep = "x" if numeric else "; "
            out[name] = sep.join(f"{v:g}" if numeric else str(v) for v in value)
        elif isinstance(value, float) and not math.isfinite(value):
            out[name] = ""
        else:
            out[name] = "" if value is None else value
    return out


def write_csv(target: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per row, flat columns (the union over rows, in first-seen order)."""
    flat = [flatten(jsonable(r)) for r in rows]
    columns: dict[str, None] = {}
    for r in flat:
        columns.update(dict.fromkeys(r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    write_text_atomic(target, buf.getvalue())


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def fmt_float(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def make_table(title: str | None, columns: Sequence[str], right: Sequence[str] = ()) -> Table:
    """A table with the house look; columns named in `right` are right-aligned (numbers)."""
    table = Table(title=title, title_justify="left", header_style="bold", show_lines=False)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold")
    return table


def error_cell(reason: str) -> Text:
    return Text(reason, style=ERROR_STYLE)


def add_error_row(table: Table, label: str, reason: str) -> None:
    """A failed item: its label, then the one-line reason spanning the remaining columns' first cell."""
    n = len(table.columns)
    table.add_row(Text(label, style=ERROR_STYLE), error_cell(reason), *([""] * (n - 2)))


def non_ct_hint(message: str) -> str:
    """The library says a series is not CT; a command that has --allow-non-ct says how to read it."""
    return f"{message} (pass --allow-non-ct to read it)" if NOT_CT in message else message


def series_cell(row: dict[str, Any]) -> str:
    """'Chest 1.0 B70f, 312 slices' over its SeriesInstanceUID; '' for a row without a series."""
    if not row.get("series_uid"):
        return ""
    desc = row.get("series_description") or "(no description)"
    return f"{desc}, {row.get('n_slices', '?')} slices\n{row['series_uid']}"


def skipped_lines(skipped: Sequence[Any]) -> list[Text]:
    """One dim line per series or file group an input expansion left out (``ctsparse.inputs``)."""
    return [Text.assemble(("skipped ", "dim"), non_ct_hint(s.line())) for s in skipped]
