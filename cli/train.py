"""`ctsparse train DATA`: learn a classifier from a folder of labelled scans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ctsparse.errors import CtsparseError

from .console import State, console, handles_errors, is_tty, warn_line
from .plan import planning_status, render_planning
from .render import fmt_float, fmt_pct, make_table, write_text_atomic

if TYPE_CHECKING:
    from ctsparse.config import Config

# Written by planning, beside the run's own files (ctsparse.training.run_folder.RUN_FILES): under
# --nproc the ranks start after they exist.
PLANNED = "planned.yaml"  # the resolved config the ranks of --nproc N read
PLAN_FILES = ("plan.json", PLANNED)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class TrainDisplay:
    """Turns the library's training events into rich progress bars and lines."""

    def __init__(self, progress: Progress) -> None:
        self.p = progress
        self.pre: Any = None
        self.epoch_task: Any = None
        self.batch_task: Any = None

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        p = self.p
        if kind == "preprocess_start":
            self.pre = p.add_task("preprocess", total=info["n"], info="")
        elif kind == "preprocess":
            p.update(self.pre, completed=info["i"], info=Path(info["path"]).name)
            # a log file gets no live bar: one line per tenth of the scans instead
            step = max(1, info["n"] // 10)
            if not is_tty() and (info["i"] % step == 0 or info["i"] == info["n"]):
                elapsed = p.tasks[self.pre].elapsed or 0.0
                p.console.print(f"preprocessed {info['i']}/{info['n']} scans in {elapsed:.0f} s")
        elif kind == "skipped":
            warn_line(f"skipped {info['error']}")
        elif kind == "start":
            console.print(
                f"classes {info['classes']}  train {info['n_train']}  val {info['n_val']}  "
                f"device {info['device']}"
                + (
                    f"  processes {info['world']} (batch {info['batch_per_rank']} per process)"
                    if info["world"] > 1
                    else ""
                )
                + (f"  (resuming at epoch {info['start_epoch']})" if info["start_epoch"] > 1 else "")
            )
            if info.get("balls"):
                n = info["balls"]
                console.print(
                    f"candidate balls of the train scans: {n['finding']:,} with a finding, "
                    f"{n['background']:,} background; {n['steps']} steps of {n['batch']} balls per epoch"
                )
            self.epoch_task = p.add_task(
                "epochs", total=info["epochs"], completed=info["start_epoch"] - 1, info=""
            )
            self.batch_task = p.add_task("batches", total=1, info="")
        elif kind == "batch":
            p.update(
                self.batch_task,
                total=info["n_batches"],
                completed=info["batch"],
                info=f"loss {info['loss']:.3f}  {info['sites_per_s'] / 1e3:.0f}k sites/s",
            )
        elif kind == "epoch_end":
            p.update(
                self.epoch_task,
                completed=info["epoch"],
                info=f"val acc {fmt_pct(info['val_accuracy'])}  bal {fmt_pct(info['val_balanced_accuracy'])}",
            )
            p.console.print(
                f"epoch {info['epoch']:>3}  train loss {info['train_loss']:.4f}  "
                f"val loss {info['val_loss']:.4f}  "
                f"acc {fmt_pct(info['val_accuracy'])}  AUROC {fmt_float(info['val_auroc'], '.3f')}  "
                f"{info['epoch_time_s']:.1f}s  peak RSS {info['peak_rss_mb']:.0f} MB"
                + ("  *best" if info["improved"] else "")
            )
        elif kind == "budget_stop":
            p.console.print(
                f"stopped at epoch {info['epoch']}: the time budget is spent ({info['minutes']:.1f} min)"
            )
        elif kind == "partial_restart":
            warn_line(
                f"last.pt stopped inside epoch {info['epoch']} with {info['was']} processes; "
                f"with {info['now']} that epoch restarts from its first step"
            )
        elif kind == "early_stop":
            p.console.print(
                f"early stop at epoch {info['epoch']} (no improvement for {info['patience']} epochs)"
            )


@handles_errors
def train(
    data: Annotated[
        Path, typer.Argument(help="Dataset: class subfolders, a folder with labels.csv, or a datalist JSON.")
    ],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (configs/*.yaml).")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder for checkpoints, history and plots.")
    ] = Path("runs/default"),
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Override train.batch_size.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    seed: Annotated[int | None, typer.Option(help="Override train.seed.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Preprocessing worker processes (data.workers).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for torch/ME (default: all cores).")
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Data-parallel processes on this machine: relaunches itself under torchrun "
            "(for several machines run torchrun yourself, see README).",
        ),
    ] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in OUT.")] = False,
    no_plan: Annotated[
        bool, typer.Option("--no-plan", help="Without --config: train with the plain defaults, no planning.")
    ] = False,
    no_measure: Annotated[
        bool, typer.Option("--no-measure", help="Plan without timing the model here (estimates instead).")
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key=value, e.g. train.lr=1e-3.")
    ] = None,
) -> None:
    """Train a sparse (or dense-twin) classifier on labelled CT scans."""
    from ctsparse.config import Config, check_overrides, load_config

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks and writes
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CtsparseError("--nproc: already running under torchrun; drop --nproc")
    from ctsparse.device import configure_threads

    configure_threads(threads)  # torch + ME's OpenMP (when given) and ME's BLAS pool (always)

    overrides = list(set_ or [])
    for key, value in (
        ("train.epochs", epochs),
        ("train.batch_size", batch_size),
        ("train.seed", seed),
        ("data.workers", workers),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    planning = config is None and not resume and not no_plan
    # with a plan to come, each --set is checked alone here and the whole config after planning:
    # model.widths=[32,64,128] goes with the depths the plan gives, not with the default ones
    cfg = Config() if planning else load_config(config, overrides)
    asked = check_overrides(overrides) if planning else {}
    if main_rank and not resume:
        from ctsparse.training.run_folder import clear_run

        # under torchrun the plan stays: the ranks read planned.yaml
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
        clear_run(out, overwrite=overwrite, also=() if torchrun else PLAN_FILES)
    if config is not None:
        if main_rank and not resume:
            console.print(f"config from {config}: no planning (the file wins)", highlight=False)
    elif planning:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would plan (and measure) alone
            raise CtsparseError("under torchrun pass --config (e.g. from `ctsparse plan --out`) or --no-plan")
        cfg = _plan_run(data, out, device, no_measure, overrides, asked, nproc)
        if nproc > 1:
            config = out / PLANNED  # the ranks read the resolved config and never plan themselves
    if nproc > 1:
        argv = [
            str(data),
            "--out",
            str(out),
            "--device",
            device,
            *(["--config", str(config)] if config else []),
        ]
        for flag, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--seed", seed)):
            argv += [flag, str(value)] if value is not None else []
        argv += ["--workers", str(workers)] if workers is not None else []
        argv += ["--threads", str(threads)] if threads else []
        argv += ["--resume"] * resume + ["--overwrite"] * overwrite
        argv += [x for item in set_ or [] for x in ("--set", item)]
        raise typer.Exit(_launch(nproc, argv))
    from ctsparse.training.loop import train as run_training
    from ctsparse.training.resume import explicit_keys

    keys = explicit_keys(config, overrides) if resume else []  # may change on --resume, if allowed
    if not main_rank:
        result = run_training(data, out, cfg, device=device, resume=resume, resume_keys=keys)
        _end_rank(130 if result.interrupted else 0)
    with _progress() as progress:
        result = run_training(
            data,
            out,
            cfg,
            device=device,
            resume=resume,
            resume_keys=keys,
            on_event=TrainDisplay(progress),
        )
    m = result.metrics
    table = make_table(f"run {out}", ["metric", "value"], right=["value"])
    table.add_row("best epoch", str(result.best_epoch))
    table.add_row("evaluated on", str(m.get("evaluated_on")))
    for key in ("accuracy", "balanced_accuracy", "auroc"):
        if key in m:
            table.add_row(key, fmt_float(m[key], ".4f"))
    for cls, auc in (m.get("auroc_per_class") or {}).items():
        table.add_row(f"AUROC {cls}", fmt_float(auc, ".4f"))
    table.add_row("skipped scans", str(len(result.skipped)))
    console.print(table)
    if m.get("confusion_matrix"):
        console.print(
            f"confusion matrix (rows true, cols predicted, {m['classes']}): {m['confusion_matrix']}"
        )
    if m.get("threshold"):
        console.print(f"decision rule in best.pt: {m['threshold']}", highlight=False)
    console.print(f"checkpoints: {out / 'best.pt'}, {out / 'last.pt'}; history: {out / 'history.csv'}")
    if result.interrupted:
        where = f"epoch {result.epochs_run}" + (
            f" + {result.batches_into_next} steps of epoch {result.epochs_run + 1}"
            if result.batches_into_next
            else ""
        )
        how = (
            "the same command (torchrun ...) with --resume"
            if "WORLD_SIZE" in os.environ
            else (f"`ctsparse train {data} --out {out} --resume`")
        )
        console.print(f"[yellow]interrupted[/]: last.pt holds {where}; continue with {how}")
    _end_rank(130 if result.interrupted else 0)


def _plan_run(
    data: Path,
    out: Path,
    device: str,
    no_measure: bool,
    overrides: list[str],
    asked: dict[str, Any],
    nproc: int,
) -> Config:
    """Plan, show the plan, write OUT/plan.json (and, for --nproc, OUT/planned.yaml); the config.
    `asked`: the --set items, each checked alone (config.check_overrides)."""
    from ctsparse.plan import plan_dataset, plan_record, plan_yaml, resolve_config, write_plan_json

    for f in PLAN_FILES:  # from an earlier run in this folder
        (out / f).unlink(missing_ok=True)
    with planning_status() as on_event:
        # a time budget given on the command line is what the schedule is planned for
        # so is a choice of scan labels: the rest of the plan (grid, batches) follows it
        scan_labels = asked.get("model.candidates", -1) == 0
        planning = plan_dataset(
            data,
            measure=not no_measure,
            device=device,
            train_minutes=asked.get("train.max_minutes"),
            per_ball=not scan_labels,
            on_event=on_event,
        )
    render_planning(planning)
    cfg = resolve_config(planning.plan.values, overrides)
    write_plan_json(out / "plan.json", plan_record(planning, cfg, overrides))
    if nproc > 1:
        write_text_atomic(out / PLANNED, plan_yaml(planning, cfg))
    console.print(f"plan and its reasons: {out / 'plan.json'}", highlight=False)
    return cfg


def _end_rank(code: int) -> None:
    """Exit with `code`; under torchrun skip the interpreter's teardown.

    Every file is written, fsynced and closed and the process group destroyed by now, but on
    torch 2.13 + gloo a rank sometimes aborts (SIGABRT, "terminate called without an active
    exception") while the interpreter finalizes, which fails the whole torchrun job after a
    successful run (2 of 30 two-process runs here). os._exit after flushing avoids that phase.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise typer.Exit(code)


def _launch(nproc: int, argv: list[str]) -> int:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m ctsparse train ...`"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "ctsparse", *(["--debug"] if State.debug else []), "train", *argv]
    console.print(f"launching {nproc} processes: {' '.join(cmd[1:])}", highlight=False)
    proc = subprocess.Popen(cmd)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the workers got Ctrl-C too: wait while they save last.pt
