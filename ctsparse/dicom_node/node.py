"""The DICOM node: a C-STORE SCP that predicts each complete CT series once and sends back an SR.

    receiver threads (pynetdicom)          worker thread
    C-STORE -> file on disk -> journal      journal: due series -> predict -> SR -> C-STORE / STOW

The receiver acknowledges an instance only after it is on disk and in the journal; the worker
takes a series once nothing of it arrived for ``quiet_seconds``. Everything the worker does is
recorded in the journal before and after, so a restart carries on where the last run stopped
(``journal.py``). Events go to ``on_event(kind, info)`` with a one-line ``info["message"]`` that
names UIDs only, never the patient.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from ctsparse.dicom_node.config import NodeConfig
from ctsparse.dicom_node.journal import Journal, SeriesState
from ctsparse.dicom_node.store import (
    OUT_OF_RESOURCES,
    SUCCESS,
    send_c_store,
    send_stow,
    series_folder,
    set_no_delay,
    write_instance,
)
from ctsparse.errors import CheckpointError, CtsparseError

OnEvent = Callable[[str, dict[str, Any]], None]
SrWriter = Callable[[dict[str, Any], list[Path], Path, dict[str, Any]], Path]


def _default_sr_writer() -> SrWriter:
    from ctsparse.dicom_node.sr import write_result_sr

    return write_result_sr


def _reason(error: str, folder: Path) -> str:
    """A predict row's error without the storage path in front (the series UID is named anyway)."""
    return error.removeprefix(f"{folder}: ")


class DicomNode:
    """Start with ``start()``, stop with ``stop()``; ``port`` is the bound port once started."""

    def __init__(self, cfg: NodeConfig, on_event: OnEvent | None = None, sr_writer: SrWriter | None = None):
        self.cfg = cfg
        self.storage = Path(cfg.storage)
        self.journal = Journal(self.storage / "journal.sqlite")
        self._on_event = on_event
        self._sr_writer = sr_writer
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        self._ae: Any = None
        self.port = cfg.port
        self.fatal: str | None = None  # why the node stopped itself (an unusable checkpoint)

    def emit(self, kind: str, level: str, message: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._on_event(kind, {"level": level, "message": message, **fields})

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Recover the journal, listen, start the worker, and load the checkpoint in the background.

        Loading imports torch and MinkowskiEngine (seconds); the node listens meanwhile, and an
        unusable checkpoint stops it (``fatal``). A missing file is refused at once.
        """
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        if not Path(self.cfg.checkpoint).is_file():
            raise CheckpointError(self.cfg.checkpoint, "checkpoint file not found")
        if self._sr_writer is None:
            self._sr_writer = _default_sr_writer()
        self._recover()
        ae = AE(ae_title=self.cfg.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.cfg.allowed_callers)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_OPEN, lambda event: set_no_delay(event.assoc)),
        ]
        server = ae.start_server((self.cfg.bind, self.cfg.port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the running server
        self._ae = ae
        self.port = int(server.server_address[1])
        self._worker = threading.Thread(target=self._work, name="ctsparse-node-worker", daemon=True)
        self._worker.start()
        self.emit(
            "listening",
            "info",
            f"{self.cfg.ae_title} listening on {self.cfg.bind}:{self.port}; "
            f"accepting {', '.join(self.cfg.allowed_callers)}; quiet period {self.cfg.quiet_seconds:g} s",
            port=self.port,
        )
        threading.Thread(target=self._load_checkpoint, name="ctsparse-node-model", daemon=True).start()

    def _load_checkpoint(self) -> None:
        from ctsparse.device import configure_threads
        from ctsparse.models.checkpoint import load_checkpoint

        try:
            configure_threads(self.cfg.predict.threads)  # before any torch work, as predict does
            ckpt = load_checkpoint(self.cfg.checkpoint)
        except Exception as exc:
            self.fatal = str(exc) if isinstance(exc, CtsparseError) else f"{type(exc).__name__}: {exc}"
            self.emit("fatal", "error", f"checkpoint unusable, stopping: {self.fatal}")
            self._stop.set()
            self._wake.set()
            return
        self.emit("ready", "info", f"checkpoint loaded (classes: {', '.join(ckpt.classes)})")

    @property
    def stopping(self) -> bool:
        """True once the node stopped itself (see ``fatal``) or ``stop()`` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Refuse new associations (aborting any in progress: their unacknowledged instances are
        resent by the peer), let the worker finish the series in hand, close the journal."""
        self._stop.set()
        self._wake.set()
        if self._ae is not None:
            self._ae.shutdown()
        if self._worker is not None:
            self._worker.join()
        self.journal.close()
        self.emit("stopped", "info", "stopped")

    def _recover(self) -> None:
        requeued, given_up = self.journal.recover()
        for uid in requeued:
            self.emit(
                "recovered", "warning", f"series {uid}: interrupted while predicting; predicting it again"
            )
        for uid in given_up:
            self.emit("series_failed", "error", f"series {uid}: interrupted in every prediction; given up")
        root = self.storage / "series"
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            for tmp in folder.glob(".*.tmp"):  # writes cut short; never acknowledged to the sender
                tmp.unlink(missing_ok=True)
            files = sorted(folder.glob("*.dcm"))
            if not files or self.journal.get(folder.name) is not None:
                continue
            # stored, but the process died before the journal counted it: not lost, queue it
            study = str(dcmread(files[0], stop_before_pixels=True).get("StudyInstanceUID", ""))
            last = max(f.stat().st_mtime for f in files)
            for _ in files:
                self.journal.received(folder.name, study, now=last)
            self.emit(
                "recovered", "warning", f"series {folder.name}: found on disk, not in the journal; queued"
            )
        pending = self.journal.select("WHERE status IN ('received', 'predicted')")
        if pending:
            self.emit("resumed", "info", f"{len(pending)} series left from the last run")

    # -- receiving ---------------------------------------------------------------------------

    def _on_rejected(self, event: Any) -> None:
        calling = str(getattr(event.assoc.requestor, "ae_title", "")).strip()
        address = getattr(event.assoc.requestor, "address", "")
        self.emit(
            "rejected", "error", f"association from {calling!r} ({address}) rejected: not in allowed_callers"
        )

    def _on_store(self, event: Any) -> int:
        got = write_instance(event, self.storage)
        if got.status != SUCCESS:
            self.emit(
                "instance_refused",
                "error",
                f"instance {got.sop_uid or '?'}: refused: {got.error}",
                status=got.status,
            )
            return got.status
        try:
            state = self.journal.received(got.series_uid, got.study_uid)
        except Exception as exc:  # the file is on disk (queued at the next start); the peer resends
            message = f"instance {got.sop_uid}: stored but not journaled ({type(exc).__name__}); refused"
            self.emit("instance_refused", "error", message)
            return OUT_OF_RESOURCES
        if state.instances == 1:
            calling = str(getattr(event.assoc.requestor, "ae_title", "")).strip()
            self.emit(
                "series_started",
                "info",
                f"series {got.series_uid} (study {got.study_uid}): receiving from {calling}",
                series_uid=got.series_uid,
            )
        elif state.late == 1 and state.status != "received":
            self.emit(
                "late_instance",
                "warning",
                f"series {got.series_uid}: instance {got.sop_uid} arrived after the series was complete "
                f"({state.status}); stored, not predicted again (raise quiet_seconds?)",
                series_uid=got.series_uid,
            )
        return SUCCESS

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        tick = min(1.0, max(0.05, self.cfg.quiet_seconds / 10))
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # the node keeps running; the journal still holds the work
                self.emit("worker_error", "error", f"worker: {type(exc).__name__}: {exc}")
            self._wake.wait(tick)
            self._wake.clear()

    def _step(self) -> None:
        for state in self.journal.to_send():
            if self._stop.is_set():
                return
            self._deliver(state)
        for state in self.journal.due(self.cfg.quiet_seconds):
            if self._stop.is_set():
                return
            self._process(state)

    def _process(self, state: SeriesState) -> None:
        uid = state.series_uid
        folder = series_folder(self.storage, uid)
        attempt = self.journal.start(uid)
        self.emit(
            "series_complete",
            "info",
            f"series {uid}: complete ({state.instances} instance(s)), predicting"
            + (f" (attempt {attempt})" if attempt > 1 else ""),
            series_uid=uid,
        )
        started: dict[str, Any] = {}  # predict's model card, which the SR names the model by
        try:
            from ctsparse.predict import predict  # torch: the first import takes seconds

            rows = predict(
                self.cfg.checkpoint, [folder], device=self.cfg.predict.device, on_start=started.update
            )
            row = rows[0]
            if row.get("error"):
                raise CtsparseError(_reason(str(row["error"]), folder))
            assert self._sr_writer is not None
            sources = sorted(folder.glob("*.dcm"))
            # <results>/<series UID>.sr.dcm, replaced atomically: a redone series leaves one SR
            sr_path = self._sr_writer(row, sources, self.storage / "results", started["model"])
        except Exception as exc:
            reason = str(exc) if isinstance(exc, CtsparseError) else f"{type(exc).__name__}: {exc}"
            self.journal.failed(uid, reason)
            self.emit("series_failed", "error", f"series {uid}: no result: {reason}", series_uid=uid)
            return
        self.journal.predicted(uid, str(row["label"]), sr_path)
        self.emit(
            "series_predicted",
            "info",
            f"series {uid}: {row['label']} ({row['confidence']:.3f}); SR stored",
            series_uid=uid,
            label=row["label"],
        )
        done = self.journal.get(uid)
        assert done is not None
        self._deliver(done)

    def _targets(self) -> list[str]:
        names = [f"{d.ae_title}@{d.host}:{d.port}" for d in self.cfg.destinations]
        return names + ([f"stow:{self.cfg.stow_url}"] if self.cfg.stow_url else [])

    def _deliver(self, state: SeriesState) -> None:
        """Send the stored SR to every destination it has not reached yet."""
        uid = state.series_uid
        sr = Path(state.sr_path or "")
        if not sr.is_file():
            self.journal.failed(uid, "the stored SR file is missing")
            self.emit("series_failed", "error", f"series {uid}: the stored SR file is missing")
            return
        sent = list(state.sent)
        by_name = {f"{d.ae_title}@{d.host}:{d.port}": d for d in self.cfg.destinations}
        for target in self._targets():
            if target in sent:
                continue
            try:
                if target.startswith("stow:"):
                    send_stow([sr], target.removeprefix("stow:"))
                else:
                    send_c_store(sr, by_name[target], self.cfg.ae_title)
            except Exception as exc:  # a peer down, refusing, timing out: the SR waits on disk
                reason = str(exc) if isinstance(exc, CtsparseError) else f"{type(exc).__name__}: {exc}"
                self.journal.retry_later(uid, time.time() + self.cfg.retry_seconds, reason)
                self.emit(
                    "send_failed",
                    "warning",
                    f"series {uid}: SR not delivered: {reason}; retrying in {self.cfg.retry_seconds:g} s",
                    series_uid=uid,
                )
                return
            sent.append(target)
            self.journal.sent(uid, sent)
        self.journal.done(uid)
        where = ", ".join(sent) if sent else "no destination configured"
        self.emit("series_done", "info", f"series {uid}: SR sent ({where})", series_uid=uid)
