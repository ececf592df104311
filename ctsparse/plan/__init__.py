"""Self-configuration, the nnU-Net way: measure the dataset, measure the device, apply rules.

    fingerprint(DATA)                    -> Fingerprint   what the scans are (fingerprint.py)
    measure_device(scan, preprocess, ...) -> Measurements  step time and memory here (measure.py)
    make_plan(fp, meas, budget)          -> Plan          config overrides with reasons (rules.py)

`plan_dataset` runs the three; `resolve_config` turns a plan (plus --set) into the Config.
"""

from ctsparse.plan.fingerprint import Fingerprint, fingerprint
from ctsparse.plan.measure import Machine, Measurements, machine, measure_device
from ctsparse.plan.pipeline import (
    Planning,
    plan_dataset,
    plan_record,
    plan_yaml,
    resolve_config,
    write_plan_json,
)
from ctsparse.plan.records import Plan, Planned
from ctsparse.plan.rules import Budget, make_plan

__all__ = [
    "Budget",
    "Fingerprint",
    "Machine",
    "Measurements",
    "Plan",
    "Planned",
    "Planning",
    "fingerprint",
    "machine",
    "make_plan",
    "measure_device",
    "plan_dataset",
    "plan_record",
    "plan_yaml",
    "resolve_config",
    "write_plan_json",
]
