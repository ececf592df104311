"""Fingerprint -> measure -> plan, and the plan as a config: resolved, as YAML, as JSON."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ctsparse.config import Config, apply_overrides, from_dict, to_dict
from ctsparse.errors import CtsparseError
from ctsparse.fileio import atomic_write_text
from ctsparse.plan.fingerprint import MAX_SCANS, Event, Fingerprint, fingerprint
from ctsparse.plan.measure import Measurements, machine, measure_device, representative_scan
from ctsparse.plan.records import Plan
from ctsparse.plan.rules import Budget, make_plan, measure_candidates, plan_preprocess


@dataclass(frozen=True)
class Planning:
    fingerprint: Fingerprint
    measurements: Measurements | None
    budget: Budget
    plan: Plan


def plan_dataset(
    data: str | Path,
    *,
    measure: bool = True,
    device: str = "auto",
    max_scans: int = MAX_SCANS,
    seed: int = 0,
    train_minutes: float | None = None,
    per_ball: bool = True,
    on_event: Event | None = None,
) -> Planning:
    """Fingerprint the dataset, time the candidates on `device` (unless measure=False), plan.

    Args:
        train_minutes: the training time budget the schedule is planned for (default: the
            device's, rules.TRAIN_MINUTES).
        per_ball: False plans scan labels even where findings.csv would allow per-ball
            training (what --set model.candidates=0 asks for).
    """
    emit = on_event or (lambda kind, info: None)
    fp = fingerprint(data, max_scans=max_scans, seed=seed, on_event=emit)
    budget = Budget.for_machine(machine(device))
    if train_minutes is not None:
        budget = replace(budget, train_minutes=train_minutes)
    budget = replace(budget, per_ball=per_ball)
    meas = None
    if measure:
        cfg = resolve_config(plan_preprocess(fp, budget))
        scan = representative_scan(fp, cfg.preprocess.region)
        candidates = measure_candidates(fp, budget)
        emit("measure", {"scan": Path(scan).name, "candidates": candidates})
        try:
            meas = measure_device(
                scan, cfg.preprocess, candidates, device, model=cfg.model, num_classes=len(fp.class_counts)
            )
        except (CtsparseError, RuntimeError, MemoryError) as exc:
            why = f"not measured: {str(exc).splitlines()[0][:200]}"
            meas = Measurements(
                device, 0, Path(scan).name, None, cfg.preprocess.region, "", 0.0, errors=[why]
            )
    return Planning(fp, meas, budget, make_plan(fp, meas, budget))


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def resolve_config(planned: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Config() defaults, then the planned values ({key: value} or {key: Planned}), then --set."""
    flat = {k: getattr(v, "value", v) for k, v in planned.items()}
    return from_dict(apply_overrides(_nested(flat), list(overrides or [])))


def overridden(plan: Plan, cfg: Config) -> dict[str, dict[str, Any]]:
    """Planned keys whose value in `cfg` differs from the plan (set by --set or a flag)."""
    resolved = to_dict(cfg)
    out = {}
    for key, p in plan.values.items():
        section, _, name = key.partition(".")
        if resolved[section][name] != p.value:
            out[key] = {"planned": p.value, "used": resolved[section][name]}
    return out


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), 96)]


def config_yaml(values: dict[str, Any], reasons: dict[str, str], header: list[str]) -> str:
    """A config file (sections of keys; JSON values are YAML) with each reason as a comment."""
    lines = [*(f"# {h}" for h in header)]
    for section, keys in _nested(values).items():
        lines.append(f"{section}:")
        for name, value in keys.items():
            lines += _comment(reasons.get(f"{section}.{name}", ""), "  ")
            lines.append(f"  {name}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def plan_yaml(planning: Planning, cfg: Config | None = None) -> str:
    """The planned keys (or, given the resolved `cfg`, every key) as a config for --config."""
    plan = planning.plan
    reasons = {k: p.reason for k, p in plan.values.items()}
    header = [
        f"Planned by `ctsparse plan` for {planning.fingerprint.dataset} "
        f"({planning.fingerprint.n_read} of {planning.fingerprint.n_scans} scans read).",
        "Keys not listed take the defaults of ctsparse/config.py; --set key=value overrides any key.",
    ]
    if cfg is None:
        return config_yaml(plan.overrides(), reasons, header)
    for key, change in overridden(plan, cfg).items():
        reasons[key] = f"set on the command line (the plan said {json.dumps(change['planned'])})"
    flat = {f"{s}.{k}": v for s, keys in to_dict(cfg).items() for k, v in keys.items()}
    return config_yaml(flat, reasons, [*header, "Every key is listed: this is the resolved config."])


def plan_record(
    planning: Planning, cfg: Config | None = None, sets: list[str] | None = None
) -> dict[str, Any]:
    """Everything behind the plan: fingerprint, measurements, budget, every key with its reason."""
    out: dict[str, Any] = {
        "dataset": planning.fingerprint.dataset,
        "plan": planning.plan.to_dict(),
        "budget": dataclasses.asdict(planning.budget),
        "measurements": planning.measurements.to_dict() if planning.measurements else None,
        "fingerprint": planning.fingerprint.to_dict(),
    }
    if cfg is not None:
        out["set"] = list(sets or [])
        out["overridden"] = overridden(planning.plan, cfg)
    return out


def write_plan_json(path: str | Path, record: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
