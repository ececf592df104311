"""The DICOM node end to end: Orthanc sends phantom series, the node predicts and sends SRs back.

    python benchmarks/bench_node.py --series 20 --runs 3 --quiet 2 --threads 1

A real Orthanc (tests/orthanc.py: Debian's package, free loopback ports) holds N phantom CT
series; one Orthanc store job sends them all to `ctsparse serve` (its own process, as deployed)
over one association. Per run, with a fresh node storage:
  throughput  series per minute, from the store request to the last SR stored in Orthanc
  latency     per series, from its last instance stored by the node to its SR stored in Orthanc
              (the node's C-STORE to Orthanc returned success), split into
                quiet    the configured quiet period (a series is complete only after it)
                wait     the worker's poll tick and the queue behind earlier series
                predict  read + preprocess + model + SR written (checkpoint load per series)
                send     the SR's C-STORE to Orthanc
  receive     per series, first to last instance stored by the node
Times come from the node's journal (wall clock of the node process). Medians and ranges are over
all series of all runs; throughput is the median of the runs.

Without --checkpoint the model has random weights (timing only) and the config's architecture.
--nagle runs Orthanc with DCMTK's default (Nagle's algorithm on), to show what TCP_NODELAY buys.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.orthanc import NODE_AET, ORTHANC_AET, Orthanc, free_port, phantom_series, start_orthanc  # noqa: E402


def random_checkpoint(config: Path, series_folder: Path, out: Path) -> Path:
    """A checkpoint with random weights for `config` (timing does not depend on the weights)."""
    import torch

    from ctsparse.config import load_config
    from ctsparse.io import read_volume
    from ctsparse.models import create_model
    from ctsparse.models.checkpoint import save_checkpoint
    from ctsparse.sparsify import sparsify

    cfg = load_config(config)
    channels = sparsify(read_volume(series_folder, spacing=cfg.preprocess.spacing), cfg.preprocess).n_channels
    torch.manual_seed(0)
    model = create_model(cfg.model, channels, 2)
    save_checkpoint(out, model, cfg, ["normal", "nodule"], channels, {"note": "random weights (benchmark)"})
    return out


def serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctsparse", "serve", "--config", str(config)], stdout=out, stderr=out
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "checkpoint loaded" in log.read_text():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the node did not load its checkpoint within 120 s")


def journal_rows(storage: Path) -> list[dict[str, Any]]:
    from ctsparse.dicom_node.journal import Journal

    journal = Journal(storage / "journal.sqlite")
    try:
        return [s.as_dict() for s in journal.select()]
    finally:
        journal.close()


def one_run(
    orthanc: Orthanc, checkpoint: Path, series: list[tuple[str, str]], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    storage, port = work / "node", free_port()
    fields = {
        "checkpoint": str(checkpoint),
        "storage": str(storage),
        "ae_title": NODE_AET,
        "port": port,
        "allowed_callers": [ORTHANC_AET],
        "destinations": [{"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        "quiet_seconds": args.quiet,
        "predict": {"device": "cpu", "threads": args.threads},
    }
    config = work / "node.yaml"
    config.write_text(yaml.safe_dump(fields))
    orthanc.register_node(port)
    proc = serve(config, work / "node.log")
    try:
        t0 = time.time()
        orthanc.send_to_node([orthanc.series_id(uid) for _study, uid in series])
        sent = time.time()
        for study, _uid in series:
            orthanc.wait_for_srs(study, 1, timeout=600)
        # Orthanc holds the last SR a moment before the node's journal marks its series done
        deadline = time.monotonic() + 60
        while True:
            rows = journal_rows(storage)
            if sum(r["status"] == "done" for r in rows) == len(series) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    done = [r for r in rows if r["status"] == "done"]
    if len(done) != len(series):
        raise RuntimeError(f"{len(done)} of {len(series)} series done: {rows}")
    end = max(r["done_at"] for r in done)
    per_series = [
        {
            "series_uid": r["series_uid"],
            "instances": r["instances"],
            "receive_s": r["last_at"] - r["first_at"],
            "latency_s": r["done_at"] - r["last_at"],
            "quiet_s": args.quiet,
            "wait_s": r["started_at"] - r["last_at"] - args.quiet,
            "predict_s": r["predicted_at"] - r["started_at"],
            "send_s": r["done_at"] - r["predicted_at"],
        }
        for r in done
    ]
    return {
        "wall_s": end - t0,
        "orthanc_send_s": sent - t0,
        "series_per_min": 60.0 * len(done) / (end - t0),
        "series": per_series,
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=20, help="phantom series per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quiet", type=float, default=2.0, help="the node's quiet_seconds")
    ap.add_argument("--threads", type=int, default=1, help="the node's predict.threads")
    ap.add_argument("--size", default="96x96x64", help="phantom voxels XxYxZ (slices = instances)")
    ap.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: random weights)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--nagle", action="store_true", help="Orthanc with Nagle's algorithm on")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "node.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_node_"))
    shape = tuple(int(v) for v in args.size.split("x"))
    assert len(shape) == 3
    orthanc = start_orthanc(work / "orthanc", nodelay=not args.nagle)
    try:
        series, folders = [], []
        for k in range(args.series):
            folder = work / f"ct{k}"
            study, uid, files = phantom_series(
                folder,
                seed=1000 + k,
                label=("normal", "nodule")[k % 2],
                shape=shape,  # type: ignore[arg-type]
            )
            orthanc.upload(files)
            series.append((study, uid))
            folders.append(folder)
        checkpoint = args.checkpoint or random_checkpoint(args.config, folders[0], work / "random.pt")
        runs = []
        for r in range(args.runs):
            run_dir = work / f"run{r}"
            run_dir.mkdir()
            for sr in (i for study, _ in series for i in orthanc.sr_instances(study)):
                orthanc.request("DELETE", f"/instances/{sr}")  # each run waits for its own SRs
            runs.append(one_run(orthanc, checkpoint, series, args, run_dir))
            print(f"run {r + 1}: {runs[-1]['series_per_min']:.1f} series/min", flush=True)
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)
    every = [s for run in runs for s in run["series"]]
    result = {
        "command": "python benchmarks/bench_node.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "series_per_run": args.series,
        "instances_per_series": shape[2],
        "size": args.size,
        "runs": args.runs,
        "quiet_seconds": args.quiet,
        "threads": args.threads,
        "checkpoint": str(args.checkpoint) if args.checkpoint else f"random weights, {args.config.name}",
        "orthanc_tcp_nodelay": not args.nagle,
        "summary": {
            "series_per_min": summary([r["series_per_min"] for r in runs]),
            **{k: summary([s[k] for s in every]) for k in ("latency_s", "wait_s", "predict_s", "send_s")},
            "quiet_s": args.quiet,
            "receive_s": summary([s["receive_s"] for s in every]),
            "orthanc_send_s": summary([r["orthanc_send_s"] for r in runs]),
        },
        "runs_detail": runs,
        "load_average": os.getloadavg(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
