"""A plan: config overrides (dotted keys), each with the reason it was chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Planned:
    value: Any
    reason: str


@dataclass(frozen=True)
class Plan:
    """Config overrides (dotted keys) with their reasons, the fingerprint summary and notes."""

    values: dict[str, Planned]
    summary: dict[str, Any]
    measured: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    def overrides(self) -> dict[str, Any]:
        return {k: p.value for k, p in self.values.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": {k: {"value": p.value, "reason": p.reason} for k, p in self.values.items()},
            "measured": self.measured,
            "notes": list(self.notes),
            "summary": self.summary,
        }
