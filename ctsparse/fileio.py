"""Crash-safe file writing shared by checkpoints, the SparseVolume cache and run histories."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Write to a temp file in the target's folder, fsync, then rename over the target.

    A crash or an exception at any point leaves either the old file or the complete new one,
    never a truncated file that a later reader could take as valid.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` for a whole text file (UTF-8)."""
    with atomic_write(path) as fh:
        fh.write(text.encode("utf-8"))
