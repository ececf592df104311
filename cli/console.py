"""Console helpers shared by the commands: one rich console, one-line errors, --debug."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from ctsparse.errors import CtsparseError

# Piped output (CI logs, `| tee`) would otherwise be wrapped at 80 columns and unreadable.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)

F = TypeVar("F", bound=Callable[..., Any])


# click's ClickException (vendored inside typer in recent releases): usage errors that click
# reports itself with exit code 2
_PASS_THROUGH: tuple[type[BaseException], ...] = (
    typer.Exit,
    typer.Abort,
    SystemExit,
    *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"),
)


class State:
    debug = False


def error_line(message: str) -> None:
    """One line on stderr, no markup interpretation of user paths."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)


def warn_line(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def handles_errors(func: F) -> F:
    """Turn library errors into one line and exit code 1; a traceback only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _PASS_THROUGH:
            raise  # usage errors keep click's exit code 2 and its message
        except CtsparseError as exc:
            if State.debug:
                raise
            error_line(str(exc).replace("[", r"\["))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if State.debug:
                raise
            error_line(
                f"{type(exc).__name__}: {exc} (run with --debug for the traceback)".replace("[", r"\[")
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def is_tty() -> bool:
    return sys.stdout.isatty()
