"""Meters: timers and memory probes. Nothing here prints: callers render the numbers.

Peak memory of a block: Linux lets a process reset its RSS high-water mark (VmHWM) by writing "5"
to /proc/self/clear_refs, so `peak_memory()` measures the peak *during* the block instead of the
peak since start-up that getrusage reports. Where that is not allowed it samples the current RSS
from a thread every few milliseconds (can miss a spike shorter than the interval).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Timer:
    """Per-stage wall seconds; repeated stages accumulate.

    >>> t = Timer()
    >>> with t.stage("read"):
    ...     pass
    >>> sorted(t.times)
    ['read']
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return sum(self.times.values())


@contextmanager
def stage(times: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall seconds of the block to times[name]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def release_freed_memory() -> None:
    """Hand blocks this process freed back to the system (glibc's malloc_trim), so that the RSS
    rise of the next measured block is its own and not a reuse of what an earlier one left in the
    heap. A no-op where glibc is not the allocator."""
    import ctypes
    import gc

    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    """Current resident set size, from /proc/self/statm (0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """Result of `peak_memory()`: RSS at the start and the peak RSS while the block ran (bytes)."""

    start_bytes: int = 0
    peak_bytes: int = 0
    method: str = ""
    _running_max: int = field(default=0, repr=False)

    @property
    def delta_bytes(self) -> int:
        """Extra memory the block needed above what was resident when it started."""
        return max(0, self.peak_bytes - self.start_bytes)


_active: list[PeakMemory] = []
_lock = threading.Lock()


@contextmanager
def peak_memory(interval: float = 0.005) -> Iterator[PeakMemory]:
    """Measure the peak RSS during the block. Nested probes stay correct: before an inner probe
    resets the high-water mark, the current mark is folded into every enclosing probe."""
    result = PeakMemory(start_bytes=current_rss_bytes())
    with _lock:
        hwm = _vm_hwm_bytes()
        for outer in _active:
            outer._running_max = max(outer._running_max, hwm or 0)
        use_hwm = hwm is not None and _reset_hwm()
        _active.append(result)
    result.method = "VmHWM" if use_hwm else "sampling"
    result._running_max = result.start_bytes
    stop = threading.Event()
    sampler = None
    if not use_hwm:

        def sample() -> None:
            while not stop.wait(interval):
                result._running_max = max(result._running_max, current_rss_bytes())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    try:
        yield result
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
        with _lock:
            end = (_vm_hwm_bytes() if use_hwm else None) or current_rss_bytes()
            result.peak_bytes = max(result._running_max, end)
            _active.remove(result)
            for outer in _active:
                outer._running_max = max(outer._running_max, result.peak_bytes)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - unreachable


def format_seconds(s: float) -> str:
    """0.0123 -> '12.3 ms', 75 -> '1m15s'."""
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 60:
        return f"{s:.2f} s"
    minutes, sec = divmod(s, 60)
    return f"{int(minutes)}m{sec:02.0f}s"
