"""What every config dataclass shares: the range check, the typed JSON round trip, device names and config files.

`config.py` (the model) and `train_config.py` (a training run) both build on `_Config`, so neither imports the
other; `config.py` re-exports everything here under its old names. A nested config field (`VLMConfig.vision`) is
found from the field's annotation, so a new sub-config needs no registration. No torch import.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Self

from nanovlm_cli.errors import ConfigError
from nanovlm_cli.field_types import Mismatch, coerce, field_types, kind_of, type_error


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


DEVICE_NAMES = "auto, cpu, cuda, cuda:N (N a GPU index) or mps"


def is_device_name(name: object) -> bool:
    """A device spelling we accept (whether this machine has that device is checked when one is chosen)."""
    return isinstance(name, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name) is not None


def check_device_name(name: str) -> str:
    """`name`, or `ConfigError` when it is not a device spelling (see `is_device_name`)."""
    if not is_device_name(name):
        raise ConfigError(f"device {name!r} is not a device; use {DEVICE_NAMES}")
    return name


def _subconfig(tp: Any) -> type[_Config] | None:
    """The config class a field of type `tp` holds (`VisionConfig`, or `LoRAConfig | None`), else None."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    found = [t for t in options if isinstance(t, type) and issubclass(t, _Config)]
    return found[0] if len(found) == 1 else None


class _Config:
    """Shared JSON round-trip and field-type checking for the config dataclasses."""

    _label = ""  # how messages name this config's fields: "vision" -> "vision.hidden_dim"

    def _check_types(self) -> None:
        """Check (and normalise: 4.0 -> 4, 1 -> 1.0, lists -> tuples) every field against its annotation."""
        for name, tp in field_types(type(self)).items():
            if name.startswith("_"):
                continue
            value = getattr(self, name)
            try:
                coerced = coerce(value, tp)
            except Mismatch as exc:
                raise type_error(f"{self._label}.{name}" if self._label else name, value, exc.expected) from None
            if coerced is not value:
                object.__setattr__(self, name, coerced)  # frozen dataclass: normalising its own field

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls._label or cls.__name__} must be a table of {cls.__name__} fields, got "
                              f"{kind_of(data)} ({data!r:.60}); fix the config")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known fields are {', '.join(known)}"
            )
        types_ = field_types(cls)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            sub = _subconfig(types_.get(name))
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Self:
        """A validated copy with `changes` applied (configs are never mutated in place)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def load_json_config(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML file of config fields (for `--config run.toml`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing .json or .toml file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} does not parse: {exc}; fix its syntax") from exc
