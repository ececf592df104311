"""`ctsparse serve --config node.yaml`: a DICOM node that labels every CT series sent to it."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from ctsparse.errors import CtsparseError

from .console import console, handles_errors

_STYLE = {"info": "", "warning": "yellow", "error": "bold red"}


def render_event(kind: str, info: dict[str, Any]) -> None:
    """One line per event: time, level, message (UIDs only, as the node words it)."""
    level = str(info.get("level", "info"))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    style = _STYLE.get(level, "")
    console.print(
        f"{stamp} {level.upper():7s} {info['message']}",
        style=style or None,
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    console.file.flush()  # a log line must reach the file even if the process is killed next


@handles_errors
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="node.yaml (see configs/node.yaml).")],
) -> None:
    """Run a DICOM C-STORE node: each complete CT series is predicted once and an SR sent back.

    Stops cleanly on Ctrl-C or SIGTERM; a restart carries on with what was received and not yet
    predicted or sent.
    """
    from ctsparse.dicom_node.config import load_node_config
    from ctsparse.dicom_node.node import DicomNode

    cfg = load_node_config(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        render_event("signal", {"level": "info", "message": f"{signal.Signals(signum).name}: stopping"})
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    node = DicomNode(cfg, on_event=render_event)
    try:
        node.start()
        while not stop.wait(0.5) and not node.stopping:
            pass
    finally:
        node.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if node.fatal is not None:
        raise CtsparseError(node.fatal)
