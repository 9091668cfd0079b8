"""Command-line options generated from config dataclasses, so no field is copied into a CLI by hand.

Each field of a frozen config dataclass becomes one click option: the flag from the field name
(``block_depth`` -> ``--block-depth``, or a given rename), the type from its annotation (``bool``
-> ``--x/--no-x``, ``Literal`` -> a choice, ``X | None`` -> X or ``none``, ``tuple[int, ...]`` ->
comma-separated integers), the help from the field's docstring (the string literal under it, as
Sphinx and griffe read them). Options given on the command line land in
``ctx.meta[OVERRIDES][(section, field)]``; options left out are absent, so the config a command
starts from (a preset, a stored run) keeps its value, and ``--help`` shows that value as the default.
Options carry a ``group`` that :class:`GroupedCommand` prints as its own section of ``--help``.

Validation stays in the dataclasses' ``__post_init__``; :func:`flag_names_in` rewrites field names in
their messages to the flags the user typed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Union, get_args, get_origin, get_type_hints

import click
from click.core import ParameterSource

OVERRIDES = "config_overrides"  # ctx.meta key: {(section, field): value} of the options given
OTHER = "Other options"  # the --help heading of options without a group (--version, --debug, --help)


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> Mapping[str, str]:
    """The docstrings of a dataclass's fields: the string literal right under each annotated field."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (frozen app): options simply have no help
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


class IntList(click.ParamType):
    """Comma-separated integers (``32,64,96``); ``none`` is the empty list where that is allowed."""

    name = "INTS"

    def __init__(self, allow_empty: bool = False) -> None:
        self.allow_empty = allow_empty

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        if self.allow_empty and text.lower() in ("none", ""):
            return ()
        try:
            return tuple(int(v) for v in text.split(","))
        except ValueError:
            empty = " (or none)" if self.allow_empty else ""
            self.fail(f"give comma-separated integers, e.g. 32,64,96{empty}; got {value!r}", param, ctx)


class ChoiceList(click.ParamType):
    """Comma-separated values, each one of ``choices`` (any string when None); ``none`` is the empty list."""

    name = "LIST"

    def __init__(self, choices: tuple[str, ...] | None = None) -> None:
        self.choices = choices
        if choices:
            self.name = ",".join(choices)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        if text.lower() in ("none", ""):
            return ()
        items = tuple(v.strip() for v in text.split(","))
        bad = [v for v in items if self.choices is not None and v not in self.choices]
        if bad:
            self.fail(f"{', '.join(map(repr, bad))} not allowed; give a comma-separated list of "
                      f"{', '.join(self.choices or ())}, or none", param, ctx)
        return items


class Optional(click.ParamType):
    """A value of ``inner`` type, or ``none`` for a field that may be unset."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = f"{inner.name}|none"

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        if isinstance(self.inner, click.Choice):
            return "[" + "|".join(map(str, self.inner.choices)) + "|none]"
        return super().get_metavar(param, ctx)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        return self.inner.convert(value, param, ctx)


def param_type(hint: Any) -> click.ParamType | None:
    """The click type of a field annotation; None for ``bool`` (an on/off flag)."""
    origin = get_origin(hint)
    if hint is bool:
        return None
    if origin is Literal:
        return click.Choice([str(v) for v in get_args(hint)])
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"no option type for {hint!r}")
        if inner[0] is bool:  # --x/--no-x; left out, the field stays unset
            return None
        wrapped = param_type(inner[0])
        if wrapped is None:
            raise TypeError(f"no option type for {hint!r}")
        return Optional(wrapped)
    if origin is tuple:
        (item,) = {a for a in get_args(hint) if a is not Ellipsis}
        if item is int:
            return IntList()
        if item is str:
            return ChoiceList()
        if get_origin(item) is Literal:
            return ChoiceList(tuple(str(v) for v in get_args(item)))
        raise TypeError(f"no option type for {hint!r}")
    if hint is Path:
        return click.Path(path_type=Path)
    simple = {int: click.INT, float: click.FLOAT, str: click.STRING}
    if hint in simple:
        return simple[hint]
    raise TypeError(f"no option type for {hint!r}")


def show(value: Any) -> str:
    """A config value as it would be typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


class GroupedOption(click.Option):
    """An option printed under its ``group`` heading by :class:`GroupedCommand`."""

    def __init__(self, *args: Any, group: str = OTHER, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class ConfigOption(GroupedOption):
    """One config field as an option. ``default_of(ctx)`` gives the config whose values ``--help`` shows."""

    def __init__(self, *args: Any, section: str, field: str, default_of: Callable[[click.Context], tuple[str, Any]],
                 **kwargs: Any) -> None:
        super().__init__(*args, expose_value=False, callback=_remember, **kwargs)
        self.section, self.field, self.default_of = section, field, default_of

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        label, config = self.default_of(ctx)
        section = getattr(config, self.section, None) if config is not None else None
        if section is not None and hasattr(section, self.field) and "[default:" not in (self.help or ""):
            value = show(getattr(section, self.field))
            extra["default"] = f"{value} ({label})" if label else value
        return extra


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Record an option that was given (on the command line or from an environment variable)."""
    if ctx.get_parameter_source(param.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
        assert isinstance(param, ConfigOption)
        ctx.meta.setdefault(OVERRIDES, {})[(param.section, param.field)] = value
    return value


def config_options(cls: type, section: str, group: str, default_of: Callable[[click.Context], tuple[str, Any]],
                   *, rename: Mapping[str, str] | None = None, skip: Iterable[str] = (),
                   prefix: str = "") -> list[click.Option]:
    """One :class:`ConfigOption` per field of dataclass ``cls`` (minus ``skip``), in field order.

    The flag is ``--PREFIX-FIELD-NAME``; ``rename`` maps a field to its whole flag name instead (without
    dashes). The help is the field's docstring.
    """
    rename = dict(rename or {})
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    options: list[click.Option] = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = rename.get(f.name, prefix + f.name).replace("_", "-")
        kind = param_type(hints[f.name])
        decls = [f"--{flag}/--no-{flag}" if kind is None else f"--{flag}", f"{section}__{f.name}"]
        extra: dict[str, Any] = {} if kind is None else {"type": kind}
        options.append(ConfigOption(decls, section=section, field=f.name, default_of=default_of, group=group,
                                    default=None, help=docs.get(f.name, ""), **extra))
    return options


def allow_empty(options: list[click.Option], *fields: str) -> None:
    """Let the listed integer-list fields take ``none`` (the empty list)."""
    for option in options:
        if isinstance(option, ConfigOption) and option.field in fields and isinstance(option.type, IntList):
            option.type = IntList(allow_empty=True)


def add_options(options: Iterable[click.Option]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: append ready-made options to a command's parameters (as ``@click.option`` would)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = fn.__dict__.setdefault("__click_params__", [])
        params.extend(reversed(list(options)))  # click reverses the decorator-collected list
        return fn

    return decorate


def overrides(ctx: click.Context) -> dict[tuple[str, str], Any]:
    """The config options given on the command line: ``{(section, field): value}``."""
    return dict(ctx.meta.get(OVERRIDES, {}))


def section(ctx: click.Context, name: str) -> dict[str, Any]:
    """The given options of one section: ``{field: value}``, to build its dataclass from."""
    return {field: value for (sec, field), value in overrides(ctx).items() if sec == name}


def with_flag_names(ctx: click.Context, build: Callable[[], Any], every_field_of: str | None = None) -> Any:
    """``build()``, a ValueError from it naming the flags typed rather than the fields they set (every field of
    section ``every_field_of``, typed or not, when given: for errors about defaults too)."""
    try:
        return build()
    except ValueError as exc:
        given = set(overrides(ctx))
        if every_field_of is not None:
            given |= {(p.section, p.field) for p in ctx.command.params
                      if isinstance(p, ConfigOption) and p.section == every_field_of}
        text = flag_names_in(str(exc), ctx, given)
        try:  # an error naming its field (runtime.settings.SettingsError) keeps it
            renamed = type(exc)(exc.field, text) if hasattr(exc, "field") else type(exc)(text)
        except TypeError:  # an exception type with another constructor
            renamed = ValueError(text)
        raise renamed from None


def flag_of(ctx: click.Context, section: str, field: str) -> str:
    """The flag that sets ``section.field`` in this command (``--flip`` for ``data.random_flip``)."""
    cmd = ctx.command
    for p in cmd.params:
        if isinstance(p, ConfigOption) and (p.section, p.field) == (section, field):
            return p.opts[0].split("/")[0]
    return "--" + field.replace("_", "-")


def flag_names_in(text: str, ctx: click.Context, given: Iterable[tuple[str, str]]) -> str:
    """``text`` (a config error) with the given fields' names replaced by their flags."""
    for section, field in sorted(given, key=lambda k: len(k[1]), reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(field)}(?![\w-])", flag_of(ctx, section, field), text)
    return text


class GroupedCommand(click.Command):
    """``--help`` prints options under their groups' headings, in the order the groups first appear."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or isinstance(param, click.Argument):
                continue
            groups.setdefault(getattr(param, "group", OTHER), []).append(record)
        for name, records in groups.items():
            with formatter.section(name):
                formatter.write_dl(records)
