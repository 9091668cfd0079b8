"""The command-line options of the sampler's commands, generated from what the runtime declares: the sampling flags
from :class:`runtime.settings.SamplingSettings`, ``--backend`` from the backend table. (runtime/common holds what every
command shares and imports nothing of the sampler; these need the sampler's modules.)"""

from __future__ import annotations

from typing import Any, Callable

import click

from runtime.backends.registry import names
from runtime.common.cliconfig import add_options, config_options, flag_of, section, with_flag_names
from runtime.settings import SamplingSettings, SettingsError


def sampling_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The sampling flags (``--steps``, ``--eta``, ``--solver``, ``--spacing``, ``--clip-x0``): the fields of
    :class:`SamplingSettings` (generated from it, so a new setting is a new flag). The command reads them with
    :func:`sampling_settings`; the rules are the dataclass's."""
    defaults = type("Defaults", (), {"sampling": SamplingSettings()})()
    options = config_options(SamplingSettings, "sampling", "Sampling", lambda ctx: ("", defaults))
    return add_options(options)(fn)


def sampling_settings(ctx: click.Context) -> SamplingSettings:
    """The :class:`SamplingSettings` of a command with :func:`sampling_options`. A broken rule is a usage error
    naming the flag (exit 2, as click's own range checks)."""
    try:
        return with_flag_names(ctx, lambda: SamplingSettings(**section(ctx, "sampling")), every_field_of="sampling")
    except SettingsError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint=f"'{flag_of(ctx, 'sampling', exc.field)}'") from None


class BackendChoice(click.Choice):
    """``--backend``: ``auto`` or a row of the backend table (:mod:`runtime.backends.registry`), read when the
    option is used, so backends registered or installed as plugins are accepted too."""

    def __init__(self, serve: bool = False) -> None:
        super().__init__(names(serve=serve))
        self.serve = serve

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        self.choices = names(serve=self.serve)
        return super().convert(value, param, ctx)
