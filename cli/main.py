"""The ctsparse command: one module per subcommand, joined here.

Subcommand modules import only typer/rich and the light parts of ctsparse at module level, so
`ctsparse --help` never loads torch or MinkowskiEngine.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ctsparse import __version__

from . import benchmark, doctor, evaluate, explain, phantoms, plan, predict, profile, serve, train
from .console import State

app = typer.Typer(
    name="ctsparse",
    help="CT scan classification with sparse 3D convolutions (MinkowskiEngine).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctsparse {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """CT scan classification with sparse 3D convolutions."""
    State.debug = debug


app.command("train")(train.train)
app.command("plan")(plan.plan)
app.command("predict")(predict.predict)
app.command("evaluate")(evaluate.evaluate)
app.command("explain")(explain.explain)
app.command("profile")(profile.profile)
app.command("benchmark")(benchmark.benchmark)
app.command("phantoms")(phantoms.phantoms)
app.command("doctor")(doctor.doctor)
app.command("serve")(serve.serve)


def run() -> None:
    app()
