"""Real torchrun jobs on this machine: a stop that reaches one rank stops all of them, resuming
with another number of processes, two launchers acting as two nodes, the collective timeout.

Every rendezvous is on 127.0.0.1 with a free port, so nothing listens beyond this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import SLOWER

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

from ctsparse.models.checkpoint import load_checkpoint
from ctsparse.training import history as hist

SETS = [
    "model.widths=[8, 16]",
    "model.depths=[1, 1]",
    "model.dropout=0",
    "preprocess.features=patch",
    "train.batch_size=2",  # 1 per rank; 6 training scans -> 3 steps per epoch
    "train.warmup_epochs=0",
    "train.val_fraction=0.25",
    "train.patience=50",
]
RUN_FILES = {"best.pt", "last.pt", "config.yaml", "history.csv", "metrics.json", "split.json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_args(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    args = ["train", str(data), "--out", str(out), "--device", "cpu", "--threads", "1", "--no-plan"]
    return [*args, "--epochs", str(epochs), *[x for s in SETS for x in ("--set", s)], *extra]


def _torchrun(nnodes: int, node_rank: int, nproc: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
        "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "ctsparse",
    ]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "GLOO_SOCKET_IFNAME": "lo", **extra}


def _rank_pid(agent: int, rank: int, timeout: float = 60) -> int:
    """The pid of the worker with this global RANK among torchrun's children."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
        for pid in children:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {agent}")


def _kill_tree(pid: int) -> None:
    """SIGKILL a torchrun agent and its workers: a failed test must not leave ranks waiting in a
    collective (they would ignore SIGTERM and hold two cores)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        _kill_tree(int(child))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_for_epochs(
    proc: subprocess.Popen[str], history: Path, n: int, timeout: float = 300, poll: float = 0.02
) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rows = hist.read(history)
        if len(rows) >= n:
            return float(rows[-1]["epoch_time_s"])
        assert proc.poll() is None, f"torchrun ended (rc {proc.returncode}) before epoch {n}"
        time.sleep(poll)
    _kill_tree(proc.pid)
    raise AssertionError(f"no epoch {n} after {timeout} s")


def _wait_for_file(proc: subprocess.Popen[str], path: Path, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"torchrun ended (rc {proc.returncode}) before {path.name}"
        assert time.monotonic() - t0 < timeout, f"no {path.name} after {timeout} s"
        time.sleep(0.002)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_then_resume_on_one_process(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """A scheduler preempts one process of a two-process job: the stop decision is all-reduced,
    so both ranks stop at the same step (one alone would leave the other waiting forever in its
    next all_reduce), last.pt holds that step, and one process resumes it, redoing that epoch
    from its start because the sharding changed."""
    out = tmp_path / "run"
    cmd = [*_torchrun(1, 0, 2, _free_port()), *_train_args(tiny_dataset, out, 3, *SLOWER)]
    with open(tmp_path / "job.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), text=True)
    try:
        epoch_s = _wait_for_epochs(proc, out / "history.csv", 1, poll=0.002)
        # history is written before last.pt, and a signal before last.pt stops at the boundary
        _wait_for_file(proc, out / "last.pt")
        time.sleep(0.25 * epoch_s)  # inside epoch 2's steps (see test_crash_safety)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        rc = proc.wait(timeout=120)  # both ranks reached the stop; no rank hangs
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    text = (tmp_path / "job.log").read_text()
    assert rc != 0, text  # torchrun reports its workers' exit code 130 as a failure
    assert "interrupted" in text and "Traceback" not in text.split("interrupted")[0], text
    last = load_checkpoint(out / "last.pt")
    partial = last.extra["partial"]
    assert partial is not None and partial["epoch"] == 2 and partial["world"] == 2, last.extra
    assert last.extra["epoch"] == 1 and [r["epoch"] for r in hist.read(out / "history.csv")] == ["1"]

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctsparse",
            "train",
            str(tiny_dataset),
            "--out",
            str(out),
            "--resume",
            "--threads",
            "1",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming at epoch 2" in res.stdout
    assert "with 2 processes; with 1 that epoch restarts from its first step" in res.stdout + res.stderr
    assert [r["epoch"] for r in hist.read(out / "history.csv")] == ["1", "2", "3"]
    last = load_checkpoint(out / "last.pt")
    assert last.extra["epoch"] == 3 and last.extra["world"] == 1 and last.extra["partial"] is None


@pytest.mark.slow
def test_two_launchers_as_two_nodes_share_a_run_folder(tiny_dataset: Path, tmp_path: Path) -> None:
    """`torchrun --nnodes 2 --node-rank 0|1` (static rendezvous, loopback master), one process
    per node, each node with its own cache folder, one shared run folder: each node fills its
    own cache with every scan, only global rank 0 (local rank 0 on node 0) talks and writes, and
    both nodes resume from the shared last.pt."""
    out = tmp_path / "shared_run"
    caches = [tmp_path / f"node{r}_cache" for r in (0, 1)]

    def launch(*extra: str, epochs: int) -> list[subprocess.CompletedProcess[str]]:
        port = _free_port()
        procs = [
            subprocess.Popen(
                [*_torchrun(2, r, 1, port), *_train_args(tiny_dataset, out, epochs, *extra)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(CTSPARSE_CACHE=str(caches[r])),
            )
            for r in (0, 1)
        ]
        try:
            outputs = [p.communicate(timeout=300) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    _kill_tree(p.pid)
        return [
            subprocess.CompletedProcess(p.args, p.returncode, o, e)
            for p, (o, e) in zip(procs, outputs, strict=True)
        ]

    node0, node1 = launch(epochs=2)
    for res in (node0, node1):
        assert res.returncode == 0, res.stdout + res.stderr
    assert "processes 2 (batch 1 per process)" in node0.stdout
    assert node0.stdout.count("best epoch") == 1 and node0.stdout.count("epoch   2  train loss") == 1
    # node 1's process has LOCAL_RANK 0 but RANK 1: it neither prints nor writes
    assert "train loss" not in node1.stdout and "best epoch" not in node1.stdout, node1.stdout
    for cache in caches:  # each node's cache holds every scan
        assert len(list((cache / "sparse").glob("*.npz"))) == 8, cache
    assert {p.name for p in out.iterdir()} >= RUN_FILES
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    last = load_checkpoint(out / "last.pt")
    assert last.extra["epoch"] == 2 and last.extra["world"] == 2
    split = json.loads((out / "split.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["n"] == len(split["val"]) == 2

    node0, node1 = launch("--resume", epochs=3)
    for res in (node0, node1):
        assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming at epoch 3" in node0.stdout and "train loss" not in node1.stdout
    assert [r["epoch"] for r in hist.read(out / "history.csv")] == ["1", "2", "3"]
    assert load_checkpoint(out / "last.pt").extra["epoch"] == 3


_WAIT = """
import os, sys, time
from ctsparse.training import distributed as ddp
d, _ = ddp.setup("cpu", need_me=False)
if d.rank == 1:
    time.sleep(120)  # never reaches the barrier: the slow rank
t0 = time.monotonic()
try:
    d.barrier()
    print("no timeout", flush=True)
except Exception as exc:
    print(f"timed out after {time.monotonic() - t0:.1f} s: {type(exc).__name__}", flush=True)
os._exit(0)
"""


@pytest.mark.slow
def test_dist_timeout_bounds_the_wait_in_a_collective(tmp_path: Path) -> None:
    """CTSPARSE_DIST_TIMEOUT_MIN reaches the process group: rank 0 waiting at a barrier for a
    rank that never comes gives up after that many minutes (here 0.05 = 3 s), not torch's 30."""
    port = str(_free_port())
    env = _env(
        CTSPARSE_DIST_TIMEOUT_MIN="0.05",
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        LOCAL_WORLD_SIZE="2",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WAIT],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in (0, 1)
    ]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert out.startswith("timed out after"), out + err
    seconds = float(out.split()[3])
    assert 2.5 <= seconds < 20, out


def test_dist_timeout_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctsparse.errors import CtsparseError
    from ctsparse.training.distributed import dist_timeout

    monkeypatch.delenv("CTSPARSE_DIST_TIMEOUT_MIN", raising=False)
    assert dist_timeout().total_seconds() == 120 * 60
    monkeypatch.setenv("CTSPARSE_DIST_TIMEOUT_MIN", "0.5")
    assert dist_timeout().total_seconds() == 30
    monkeypatch.setenv("CTSPARSE_DIST_TIMEOUT_MIN", "soon")
    with pytest.raises(CtsparseError, match="CTSPARSE_DIST_TIMEOUT_MIN='soon'"):
        dist_timeout()
