"""A run folder: the files a training run owns, and starting a new run where one already is."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ctsparse.errors import CtsparseError

# Written by the train loop (plus its PNGs); their presence is what makes a folder hold a run.
RUN_FILES = ("best.pt", "last.pt", "history.csv", "metrics.json", "config.yaml", "split.json")


def holds_run(out: str | Path) -> bool:
    return any((Path(out) / f).exists() for f in RUN_FILES)


def clear_run(out: str | Path, *, overwrite: bool, also: Iterable[str] = ()) -> None:
    """Make `out` ready for a new run: nothing to do if it holds none; otherwise refuse unless
    `overwrite`, then delete the run's files and the files named in `also` (e.g. a plan).

    Raises:
        CtsparseError: `out` holds a run and `overwrite` is False.
    """
    if not holds_run(out):
        return
    if not overwrite:
        raise CtsparseError(
            f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    for name in (*RUN_FILES, *also):
        (Path(out) / name).unlink(missing_ok=True)
