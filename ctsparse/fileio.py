"""Crash-safe file writing shared by checkpoints, the SparseVolume cache, run histories and every
report or plot the commands write."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import: os.umask can only be read by setting it, which is not thread-safe
_UMASK = _read_umask()


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
            # mkstemp makes 0600; give the mode open() would give (or the replaced file's own)
            os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_UMASK)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it must not bring back the old name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` for a whole text file (UTF-8)."""
    with atomic_write(path) as fh:
        fh.write(text.encode("utf-8"))


def remove_stale_temps(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temp files `atomic_write` left behind for these names when a writer was killed.

    Only for folders a single writer owns (a run folder), never for the shared cache, where
    another process's temp file may be in the middle of being written.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
