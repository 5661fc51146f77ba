"""Checks of command-line values that run before any model, dataset or benchmark is loaded.

A mistake in an argument must cost a second, not a whole run whose results are then thrown away: each command
calls these first. A value that cannot mean anything (`--device banana`, `--output` naming a file) is a usage
error: `typer.BadParameter`, one line naming the option and exit code 2. Whether this machine has the device is
checked later, by `devices.resolve_device` (exit 1: the command line was fine, the machine lacks it).
Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

from nanovlm_cli.config import check_device_name
from nanovlm_cli.errors import NanoVLMError


def usage_error(option: str, message: str) -> typer.BadParameter:
    """A usage error for `option` (exit 2); `message` says what is wrong and the fix (the command's context, for the
    "see --help" hint, is found by the exception itself)."""
    return typer.BadParameter(message, param_hint=f"'{option}'")


def check_device(device: str, option: str = "--device") -> str:
    """`device` when it is a device spelling (auto, cpu, cuda, cuda:N, mps), else a usage error."""
    try:
        return check_device_name(device)
    except NanoVLMError as exc:
        raise usage_error(option, str(exc)) from None


def _file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` that is a file (then nothing can be created below it)."""
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def check_output_dir(path: Path | None, option: str) -> None:
    """`path` can be (or already is) a directory we write into."""
    if path is None:
        return
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise usage_error(option, f"{path} is an existing file, not a directory; pass a directory to write into")
    blocker = _file_above(path)
    if blocker is not None:
        raise usage_error(option, f"{path} is below {blocker}, which is a file; pass a directory path")


def check_output_file(path: Path | None, option: str) -> None:
    """`path` can be written as a file: not an existing directory, not below a file."""
    if path is None:
        return
    path = path.expanduser()
    if path.is_dir():
        raise usage_error(option, f"{path} is a directory; pass a file name such as {path / 'out.png'}")
    blocker = _file_above(path)
    if blocker is not None:
        raise usage_error(option, f"{path} is below {blocker}, which is a file; pass a path in a directory")


def check_importable(module: str, option: str, install: str) -> None:
    """`module` can be imported (an optional extra that `option` needs), else a usage error naming the install."""
    if importlib.util.find_spec(module) is None:
        raise usage_error(option, f"{option} needs {module}, which is not installed; install it with: {install}")
