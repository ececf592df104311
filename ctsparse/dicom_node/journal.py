"""The node's durable state: one row per series in SQLite, so a restart knows what is left to do.

A series moves received -> predicting -> predicted (SR stored locally) -> done (SR sent to every
destination), or to failed with a one-line reason. Every change is one committed transaction
(WAL, synchronous=FULL), so after a crash, even SIGKILL or a power cut, the row says how far the
series got: received ones are predicted, predicted ones only resent, done ones never redone.

A series found `predicting` at start was interrupted inside the prediction; it is predicted once
more, and a second interruption marks it failed rather than letting one scan that kills the
process stop the node in a loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_ATTEMPTS = 2
STATUSES = ("received", "predicting", "predicted", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    status TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    late INTEGER NOT NULL DEFAULT 0,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    predicted_at REAL,
    done_at REAL,
    label TEXT,
    sr_path TEXT,
    sent TEXT NOT NULL DEFAULT '[]',
    retry_at REAL,
    error TEXT
)
"""


@dataclass(frozen=True)
class SeriesState:
    """One row of the journal (UIDs and technical fields only)."""

    series_uid: str
    study_uid: str
    status: str
    instances: int
    late: int
    first_at: float
    last_at: float
    attempts: int
    started_at: float | None
    predicted_at: float | None
    done_at: float | None
    label: str | None
    sr_path: str | None
    sent: tuple[str, ...]
    retry_at: float | None
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


class Journal:
    """Thread-safe access to the series table (the receiver's threads and the worker share it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def received(self, series_uid: str, study_uid: str, now: float | None = None) -> SeriesState:
        """Count one stored instance; returns the row after the update."""
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute(
                "INSERT INTO series (series_uid, study_uid, status, instances, first_at, last_at) "
                "VALUES (?, ?, 'received', 1, ?, ?) ON CONFLICT(series_uid) DO UPDATE SET "
                "instances = instances + 1, last_at = excluded.last_at, "
                "late = late + (status != 'received')",
                (series_uid, study_uid, now, now),
            )
        state = self.get(series_uid)
        assert state is not None
        return state

    def get(self, series_uid: str) -> SeriesState | None:
        rows = self.select("WHERE series_uid = ?", (series_uid,))
        return rows[0] if rows else None

    def select(self, where: str = "", args: tuple[Any, ...] = ()) -> list[SeriesState]:
        with self._lock:
            cur = self._db.execute(f"SELECT * FROM series {where} ORDER BY first_at", args)
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        out = []
        for row in rows:
            values = dict(zip(names, row, strict=True))
            values["sent"] = tuple(json.loads(values["sent"]))
            out.append(SeriesState(**values))
        return out

    def due(self, quiet_seconds: float, now: float | None = None) -> list[SeriesState]:
        """Series to predict: nothing of them arrived for `quiet_seconds`."""
        now = time.time() if now is None else now
        return self.select("WHERE status = 'received' AND last_at <= ?", (now - quiet_seconds,))

    def to_send(self, now: float | None = None) -> list[SeriesState]:
        """Series whose SR is stored but not yet delivered everywhere, and not waiting for a retry."""
        now = time.time() if now is None else now
        return self.select("WHERE status = 'predicted' AND (retry_at IS NULL OR retry_at <= ?)", (now,))

    def start(self, series_uid: str) -> int:
        """Mark the prediction as begun (before any work, so a crash inside it is seen); returns
        the attempt number."""
        self._write(
            "UPDATE series SET status = 'predicting', attempts = attempts + 1, started_at = ?, "
            "error = NULL WHERE series_uid = ?",
            (time.time(), series_uid),
        )
        state = self.get(series_uid)
        assert state is not None
        return state.attempts

    def predicted(self, series_uid: str, label: str, sr_path: str | Path) -> None:
        self._write(
            "UPDATE series SET status = 'predicted', label = ?, sr_path = ?, predicted_at = ? "
            "WHERE series_uid = ?",
            (label, str(sr_path), time.time(), series_uid),
        )

    def sent(self, series_uid: str, destinations: list[str]) -> None:
        self._write("UPDATE series SET sent = ? WHERE series_uid = ?", (json.dumps(destinations), series_uid))

    def retry_later(self, series_uid: str, at: float, error: str) -> None:
        self._write("UPDATE series SET retry_at = ?, error = ? WHERE series_uid = ?", (at, error, series_uid))

    def done(self, series_uid: str) -> None:
        self._write(
            "UPDATE series SET status = 'done', done_at = ?, retry_at = NULL, error = NULL "
            "WHERE series_uid = ?",
            (time.time(), series_uid),
        )

    def failed(self, series_uid: str, error: str) -> None:
        self._write(
            "UPDATE series SET status = 'failed', error = ? WHERE series_uid = ?", (error, series_uid)
        )

    def recover(self) -> tuple[list[str], list[str]]:
        """At start: series interrupted inside a prediction go back to the queue, or fail after
        MAX_ATTEMPTS. Returns (requeued, given up)."""
        interrupted = self.select("WHERE status = 'predicting'")
        requeued = [s.series_uid for s in interrupted if s.attempts < MAX_ATTEMPTS]
        given_up = [s.series_uid for s in interrupted if s.attempts >= MAX_ATTEMPTS]
        for uid in requeued:
            self._write("UPDATE series SET status = 'received' WHERE series_uid = ?", (uid,))
        for uid in given_up:
            self.failed(uid, f"the node stopped during each of {MAX_ATTEMPTS} predictions of this series")
        return requeued, given_up
