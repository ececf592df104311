"""The main job's closing summary: held-out accuracy with its CI, sparse vs dense, where outputs are.

    python scripts/demo_summary.py runs/demo

Reads what the demo's commands wrote (evaluate/metrics.json, benchmark.json, run/plan.json,
predictions.csv) and writes summary.json beside them.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _metric(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    if not isinstance(v, dict):
        return "n/a"
    return f"{100 * v['value']:.1f} % (95 % CI {100 * v['ci_low']:.1f}-{100 * v['ci_high']:.1f} %)"


def main(out: Path) -> None:
    report = json.loads((out / "evaluate" / "metrics.json").read_text())
    metrics = report["metrics"]
    bench = json.loads((out / "benchmark.json").read_text())
    rows = [r for r in bench["rows"] if "speedup" in r]
    low = [r for r in rows if r["occupancy"] <= 0.2]
    summary: dict[str, Any] = {
        "heldout_scans": report["n_scans"],
        "heldout_failed": report["n_failed"],
        "heldout_accuracy": metrics.get("accuracy"),
        "heldout_auroc": metrics.get("auroc"),
        "decision": report.get("threshold"),
        "benchmark": [
            {
                "case": r["case"],
                "occupancy": r["occupancy"],
                "speedup": r["speedup"],
                "sparse_forward_mb": r.get("sparse_forward_mb"),
                "dense_forward_mb": r.get("dense_forward_mb"),
            }
            for r in rows
        ],
        "median_speedup_at_most_20pct": statistics.median(r["speedup"] for r in low) if low else None,
    }
    with open(out / "predictions.csv") as fh:
        preds = list(csv.DictReader(fh))
    summary["samples_predicted"] = sum(not p.get("error") for p in preds)
    summary["samples_flagged"] = sum(bool(p.get("warnings")) for p in preds)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    print("\n== ctsparse demo: summary ==")
    print(
        f"held-out phantoms (another seed, never seen in training): {report['n_evaluated']} of "
        f"{report['n_scans']} scans evaluated; decision {report.get('threshold')}"
    )
    print(f"  accuracy          {_metric(metrics, 'accuracy')}")
    print(f"  balanced accuracy {_metric(metrics, 'balanced_accuracy')}")
    print(f"  AUROC             {_metric(metrics, 'auroc')}")
    for r in rows:
        mem = ""
        if r.get("sparse_forward_mb") is not None and r.get("dense_forward_mb") is not None:
            mem = f", forward memory {r['sparse_forward_mb']:.1f} vs {r['dense_forward_mb']:.1f} MB"
        print(
            f"  sparse vs dense twin, {r['case']} ({100 * r['occupancy']:.0f} % occupancy): "
            f"speed-up {r['speedup']:.2f}x over the dense twin{mem}"
        )
    print(
        f"bundled samples: {summary['samples_predicted']} of {len(preds)} predicted, "
        f"{summary['samples_flagged']} flagged as unlike the training data"
    )
    print(
        f"outputs: {out}/run (model, plan.json, history), {out}/evaluate (metrics, ROC, calibration), "
        f"{out}/predictions.csv, {out}/profile.json, {out}/benchmark.json, {out}/summary.json"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
