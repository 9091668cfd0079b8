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


def version_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--version``: the toolkit's version (``runtime.__version__``, the one place it is written)."""
    from runtime import __version__

    return click.version_option(__version__, "--version", prog_name="ddim-deploy",
                                message="%(prog)s %(version)s")(fn)


def friendly_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Add ``--debug`` and ``--version``; library errors become ``error: ...`` on stderr and exit code 1 (130 on Ctrl-C)."""

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

    return version_option(click.option("--debug", is_flag=True, help="Show tracebacks.")(wrapper))


def size_limit_options(fn: Callable[..., None]) -> Callable[..., None]:
    """``--max-image-size``, ``--max-parameters``, ``--max-memory-gib``: the fields of
    :class:`runtime.common.limits.SizeLimits` (generated from it), checked before a model is built. The command
    reads them with :func:`size_limits`."""
    from runtime.common.cliconfig import add_options, config_options
    from runtime.common.limits import SizeLimits

    defaults = type("Defaults", (), {"limits": SizeLimits()})()
    options = config_options(SizeLimits, "limits", "Size limits", lambda ctx: ("", defaults), prefix="max_")
    return add_options(options)(fn)


def size_limits(ctx: click.Context) -> Any:
    """The :class:`runtime.common.limits.SizeLimits` of a command with :func:`size_limit_options`."""
    from runtime.common.cliconfig import section, with_flag_names
    from runtime.common.limits import SizeLimits

    return with_flag_names(ctx, lambda: SizeLimits(**section(ctx, "limits")))

