"""CLI options generated from config dataclasses, so each option's default and help live once.

A config field's `metadata` carries its help (`help`) and how the command line spells it:
`cli_type` (the type typer parses, e.g. `str` for counts like "5M"), `parse` (turns that value into
the field's value: "count" for 5M / 200k, "l0" for L0 lists and ranges, or a function), `flag` (the option name, when not
`--field-name`) and `hidden`. `config_command(Cls)` wraps a function `f(config, **extra)`: the
command takes every field of Cls as an option beside f's own parameters, builds Cls from them
(its __post_init__ validates) and calls f with it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import typer

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def _cli_annotation(tp: Any) -> Any:
    """What typer should parse: X | None → Optional[X]; list[X] and scalars as they are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return typing.Optional[_cli_annotation(args[0])]  # noqa: UP045 (typer reads Optional)
    return tp


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return ...


def metavar(annotation: Any) -> str:
    """A plain placeholder (INT, TEXT, ...) instead of typer's `<list[str]>`; none for flags."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        annotation = typing.get_args(annotation)[0]
    if annotation is bool:
        return ""
    return {int: "INT", float: "FLOAT", str: "TEXT"}.get(annotation, "VALUE")


def field_option(f: dataclasses.Field[Any], hints: dict[str, Any], help_suffix: str = "") -> inspect.Parameter:
    meta = f.metadata
    default = meta.get("cli_default", _field_default(f))
    annotation = meta.get("cli_type", _cli_annotation(hints[f.name]))
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    # A flag that is off by default needs no --no- twin.
    names = [f"{flag}/--no-{flag[2:]}"] if annotation is bool and default is True else [flag]
    option = typer.Option(
        default,
        *names,
        help=" ".join(part for part in (meta.get("help"), help_suffix) if part) or None,
        hidden=meta.get("hidden", False),
        show_default=meta.get("show_default", True),
        metavar=meta.get("metavar", metavar(annotation)),
    )
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def parse_value(f: dataclasses.Field[Any], raw: Any) -> Any:
    """The field's value from what the command line gave: `parse` is a function or a parser's name."""
    from saelab.cli.common import parse_count, parse_l0_values

    parse = f.metadata.get("parse")
    if parse == "count":
        return parse_count(raw, f.name)
    if parse == "l0":
        return parse_l0_values(raw)
    return parse(raw) if callable(parse) else raw


def config_fields(cls: type, exclude: Iterable[str] = ()) -> list[dataclasses.Field[Any]]:
    skip = set(exclude)
    return [f for f in dataclasses.fields(cls) if f.init and f.name not in skip and not f.metadata.get("no_cli")]


def config_command(
    cls: type[T], exclude: Iterable[str] = (), extra_help: Mapping[str, str] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the wrapped `f(config: cls, **extra)` becomes a typer command with cls's options.
    `extra_help` adds text to some fields' help (e.g. the registered architectures to --arch)."""
    fields = config_fields(cls, exclude)
    hints = typing.get_type_hints(cls)
    field_names = {f.name for f in fields}

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for name, p in inspect.signature(func).parameters.items() if name != "config"]
        own_hints = typing.get_type_hints(func)
        clash = field_names & {p.name for p in own}
        if clash:
            raise TypeError(f"{func.__name__} repeats config fields {sorted(clash)}")

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {}
            for f in fields:
                raw = kwargs.pop(f.name)
                values[f.name] = parse_value(f, raw)
            return func(cls(**values), **kwargs)

        params = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=own_hints.get(p.name, p.annotation)) for p in own
        ]
        params += [field_option(f, hints, (extra_help or {}).get(f.name, "")) for f in fields]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the new signature, not func's
        return command

    return decorate


# typer ≥ 0.20 names a value's type `<str>`, `<list[str]>`, `<path>`: the plain placeholders `train` uses instead.
_PLACEHOLDERS = {"str": "TEXT", "int": "INT", "float": "FLOAT", "bool": "", "path": "PATH", "directory": "DIR"}


def plain_placeholder(shown: str | None) -> str | None:
    """`<list[str]>` → TEXT, `<int>` → INT, `<path>...` → PATH...; choices `<a|b>` → [a|b]; others unchanged."""
    m = re.fullmatch(r"<(?:list\[)?([^<>\[\]]+)\]?>(\.\.\.)?", shown or "")
    if m is None:
        return shown
    inner, dots = m.group(1), m.group(2) or ""
    if "|" in inner:
        return f"[{inner}]{dots}"
    label = _PLACEHOLDERS.get(inner, inner.upper())
    return f"{label}{dots}" if label else ""


def hide_flag_types() -> None:
    """Plain help placeholders. typer ≥ 0.20 prints `<bool>` beside every on/off flag (even --help), `<list[str]>`
    beside repeatable options and `{run}` for a required argument in the usage line: a flag takes no value, so
    nothing shows there; a value shows as TEXT, INT, FLOAT or PATH (as `metavar()` gives `train`'s options); an
    argument as click spells it, RUN (required) or [RUN] (optional)."""
    from typer.core import TyperArgument, TyperOption

    if getattr(TyperOption, "_saelab_flags_plain", False):
        return
    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return "" if self.is_flag else plain_placeholder(shown(self, ctx))

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
    TyperOption._saelab_flags_plain = True  # type: ignore[attr-defined]
    argument_shown = getattr(TyperArgument, "display_type_rich", None)
    if argument_shown is not None:

        def argument_type(self: TyperArgument, ctx: Any) -> str | None:
            return plain_placeholder(argument_shown(self, ctx))

        TyperArgument.display_type_rich = argument_type  # type: ignore[method-assign]
    if isinstance(getattr(TyperArgument, "display_name_raw", None), property):

        def display_name(self: TyperArgument) -> str:
            return self.metavar if self.metavar is not None else str(self.name or "").upper()

        TyperArgument.display_name_raw = property(display_name)  # type: ignore[assignment]
    if hasattr(TyperArgument, "_usage_display_name"):

        def usage_name(self: TyperArgument) -> str:
            name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
            return name + ("..." if self.nargs != 1 else "")

        TyperArgument._usage_display_name = usage_name  # type: ignore[attr-defined]
