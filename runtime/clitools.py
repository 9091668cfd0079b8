"""What every command line of the toolkit shares: errors as one line on stderr, tracebacks on --debug."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def friendly_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Add ``--debug``; library errors become ``error: ...`` on stderr and exit code 1 (130 on Ctrl-C)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # every error reaches the user as one line
            if debug:
                raise
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show tracebacks.")(wrapper)
