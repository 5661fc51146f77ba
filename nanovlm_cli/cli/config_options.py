"""Typer options built from the described fields of a config dataclass: each option is written once, on its field.

A field declared with `train_config.option(help=..., group=...)` becomes `--field-name` (a boolean `--x/--no-x`),
typed from its annotation (a `path=True` field as a `Path`, so completions offer file names), with the field's help,
help panel and bounds, and defaulting to None: "not given", so the config file and the preset keep their value.
`with_config_options` splices these options into a command's signature; the command receives them in its
`**fields`, keyed by field name. `--help`, the man page and the completions read the command's parameters, so a new
field is listed everywhere once `python scripts/gen_docs.py` has rerun.

Why a signature and not one hand-written parameter per field: the help text, the type and the panel would be
written again in the command (they were, and drifted). Typer reads `__signature__` like any signature.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from nanovlm_cli.field_types import field_types

F = TypeVar("F", bound=Callable[..., Any])


def described_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that carry a description (`option(...)`), in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_name(f: dataclasses.Field) -> str:
    """The command-line name of a field: its `flag`, else `--field-name`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _value_type(hint: Any) -> Any:
    """`int | None` -> int: the type of a given value (None already means "not given")."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return functools.reduce(operator.or_, rest)
    return hint


def field_option(cls: type, name: str, callback: Callable[[Any], Any] | None = None) -> Any:
    """`Annotated[T | None, typer.Option(...)]` for the field `name` of `cls` (see the module docstring)."""
    f = next((f for f in described_fields(cls) if f.name == name), None)
    if f is None:
        raise KeyError(f"{cls.__name__}.{name} is not a described field; declare it with option(help=..., group=...)")
    meta = f.metadata
    value_type = Path if meta["path"] else _value_type(field_types(cls)[name])
    flag = flag_name(f)
    decl = f"{flag}/--no-{flag[2:]}" if value_type is bool else flag
    kwargs = {key: meta[key] for key in ("min", "max", "metavar") if meta.get(key) is not None}
    if callback is not None:
        kwargs["callback"] = callback
    return Annotated[value_type | None, typer.Option(decl, help=meta["help"], rich_help_panel=meta["group"], **kwargs)]


def field_parameters(cls: type, callbacks: Mapping[str, Callable[[Any], Any]] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter (default None) per described field of `cls`, for a command signature."""
    callbacks = callbacks or {}
    return [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=field_option(cls, f.name, callbacks.get(f.name)))
            for f in described_fields(cls)]


def with_config_options(cls: type, *, before: str, beside: Mapping[str, str] | None = None,
                        callbacks: Mapping[str, Callable[[Any], Any]] | None = None) -> Callable[[F], F]:
    """Decorate a command `f(ctx, ..., **fields)` with an option per described field of `cls`.

    The field options go just before the command's own parameter `before`, in field order; each own parameter
    named in `beside` is moved to just after the field it maps to (`{"lr_backbones": "lr_mp"}`), so a command
    option that belongs with some fields is listed among them. `callbacks` maps field names to Typer callbacks.
    """
    beside = dict(beside or {})

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        if before not in {p.name for p in own} or not set(beside) <= {p.name for p in own}:
            raise TypeError(f"{func.__name__} has no parameter {before!r} or one of {sorted(beside)}")
        moved = {p.name: p for p in own if p.name in beside}
        ordered: list[inspect.Parameter] = []
        for p in own:
            if p.name == before:
                for fp in field_parameters(cls, callbacks):
                    ordered += [fp, *(moved[n] for n, anchor in beside.items() if anchor == fp.name)]
            if p.name not in moved:
                ordered.append(p)
        missing = set(moved) - {p.name for p in ordered}
        if missing:
            raise TypeError(f"with_config_options: {sorted(missing)} name no field of {cls.__name__} in beside")
        func.__signature__ = signature.replace(parameters=ordered)  # type: ignore[attr-defined]
        return func

    return decorate
