"""Field types of the config dataclasses: plain data (TOML, JSON) checked against the annotations.

Config files, saved run configs and checkpoint config.json files are read as plain data, so every field is checked
against its annotation before any range check: `freeze_vision_encoder = "false"` must not freeze (a non-empty
string is truthy), `batch_size = 4.7` must not run, `lr_mp = "1e-3"` must not reach a comparison with a number.
Whole-valued floats are accepted for integer fields (4.0 -> 4) and integers for float fields (1 -> 1.0); lists
become tuples; nothing else is converted. A mismatch is one `ConfigError` line: the field, the value, what it is,
what is expected and how to write it. No torch import.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from nanovlm_cli.errors import ConfigError


class Mismatch(Exception):
    """`value` does not fit a field type; `expected` says what would."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def kind_of(value: Any) -> str:
    """What a value is, in the words of a config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def coerce(value: Any, tp: Any) -> Any:
    """`value` as field type `tp` (see above), or raise `Mismatch` saying what was expected."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        expected = []
        for option in options:
            try:
                return coerce(value, option)
            except Mismatch as exc:
                expected.append(exc.expected)
        raise Mismatch(" or ".join(expected) + (" or null" if type(None) in args else ""))
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise Mismatch("one of " + ", ".join(repr(a) for a in args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise Mismatch("a whole number")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise Mismatch("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise Mismatch("a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise Mismatch(_describe_tuple(args))
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise Mismatch(_describe_tuple(args))
        try:
            return tuple(coerce(v, t) for v, t in zip(value, item_types))
        except Mismatch:
            raise Mismatch(_describe_tuple(args)) from None
    if _is_config(tp):
        if isinstance(value, tp):
            return value
        raise Mismatch(f"a table of {tp.__name__} fields")
    return value  # an annotation this checker does not know: left to __post_init__


def _describe_tuple(args: tuple[Any, ...]) -> str:
    plural = {bool: "booleans", int: "whole numbers", float: "numbers", str: "strings"}
    if len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {plural.get(args[0], 'values')}"
    kinds = set(args)
    return f"a list of {len(args)} {plural.get(args[0], 'values') if len(kinds) == 1 else 'values'}"


def _is_config(tp: Any) -> bool:
    """A nested config dataclass (a table of its own fields), not a plain value."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_error(label: str, value: Any, expected: str) -> ConfigError:
    """One line: the field, the value, what it is and what is expected, and how to write it."""
    hint = f"write {expected}"
    if expected.startswith("one of "):
        hint = "use one of those"
    elif isinstance(value, str):
        text = value.strip()
        if "true or false" in expected and text.lower() in ("true", "false"):
            hint = f"write {text.lower()} without quotes"
        elif "number" in expected and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
            hint = f"write {text} without quotes" if "whole" not in expected or float(text).is_integer() \
                else "use a whole number"
    elif expected.startswith("a whole number") and isinstance(value, float):
        hint = "use a whole number"
    shown = json.dumps(value) if isinstance(value, (str, bool, int, float)) or value is None else repr(value)
    return ConfigError(f"{label} = {shown} is {kind_of(value)}, expected {expected}; {hint}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (a memo of immutable class data)."""
    return typing.get_type_hints(cls)


def check_field_types(cls: type, data: Mapping[str, Any], prefix: str = "", source: str | None = None) -> None:
    """Raise `ConfigError` for the first value of `data` that does not fit `cls`'s field types.

    The field is named `prefix` + name ("model.vision." + "hidden_dim"), after "`source`: " when given (e.g. the
    config file). Nested tables of sub-config fields are checked too; unknown names are left to `from_dict`.
    """
    hints = field_types(cls)
    for name, value in data.items():
        if name not in hints:
            continue
        tp = hints[name]
        if _is_config(tp) and isinstance(value, Mapping):
            check_field_types(tp, value, f"{prefix}{name}.", source)
            continue
        try:
            coerce(value, tp)
        except Mismatch as exc:
            error = type_error(prefix + name, value, exc.expected)
            raise (ConfigError(f"{source}: {error}") if source else error) from None
