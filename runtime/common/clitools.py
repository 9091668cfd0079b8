"""What every command line of the toolkit shares: errors as one line on stderr, tracebacks on --debug."""

from __future__ import annotations

import functools
import math
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
    """Add ``--debug`` and ``--version``; library errors become ``error: ...`` on stderr and exit code 1 (130 on
    Ctrl-C). Every float option must be finite (:func:`check_finite_options`, before the command runs)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> None:
        check_finite_options(click.get_current_context())
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


# Option sections whose dataclass refuses a non-finite value itself, as a usage error naming the flag in its own words
# (runtime.settings.SamplingSettings: "--eta must be a finite number >= 0").
SELF_CHECKED = frozenset({"sampling"})


def check_finite_options(ctx: click.Context) -> None:
    """Refuse NaN or an infinity given to any float option (click's FLOAT takes ``inf`` and ``nan``), as a usage
    error naming the flag (exit 2): one rule for every command, before any work."""
    from runtime.common.cliconfig import flag_of, overrides

    given: list[tuple[str, Any]] = [(flag_of(ctx, *key), v) for key, v in overrides(ctx).items()
                                    if key[0] not in SELF_CHECKED]
    by_name = {p.name: p for p in ctx.command.params}
    given += [(by_name[k].opts[0] if k in by_name and by_name[k].opts else k, v) for k, v in ctx.params.items()]
    for flag, value in given:
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise click.BadParameter(f"{v} is not a finite number", ctx, param_hint=f"'{flag}'")


class ThreadCount(click.ParamType):
    """``--threads N``: an integer from 1 to the logical CPUs this process may use
    (:func:`runtime.common.limits.max_threads`, read when the option is parsed): more threads than CPUs only
    oversubscribe them, and 10,000 of them take minutes to start."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from runtime.common.limits import max_threads

        n = click.IntRange(min=1).convert(value, param, ctx)
        if n > max_threads():
            self.fail(f"{n:,} is more than the {max_threads()} logical CPUs this process may use (the most threads "
                      "allowed)", param, ctx)
        return n


def threads_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--threads`` option of every command that runs a model on the CPU (see :class:`ThreadCount`)."""
    return click.option("--threads", type=ThreadCount(), default=None, help=help)
