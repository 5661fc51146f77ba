"""Terminal output for the CLI: results to stdout, logs / progress / errors to stderr.

Two Rich consoles split the streams so `nanovlm generate ... > answer.txt` or `--json | jq` pipe cleanly while
progress and logs stay on the terminal. Also home of the small helpers every command shares: JSON rendering
of library results and the one-line error.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

out = Console(highlight=False)  # results
err = Console(stderr=True, highlight=False)  # progress, logs, errors



class PlainLogHandler(logging.StreamHandler):
    """One line per record on the current `sys.stderr`: `23:22:41 INFO message`, never wrapped to a width, no
    padding, newlines inside a message folded; what a log file, `| tee` or CI gets instead of Rich's columns."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))

    @property  # type: ignore[override]
    def stream(self) -> Any:  # looked up at each record, so a redirected sys.stderr (tests, capture) is honoured
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        return " | ".join(line.rstrip() for line in super().format(record).splitlines() if line.strip())


def setup_logging(debug: bool, *, console: Console | None = None) -> None:
    """Route `logging` (the library logs, never prints) to stderr; DEBUG level with --debug.

    On a terminal through Rich (columns, colours); otherwise plain lines (`PlainLogHandler`), and the progress bars
    of `datasets` / `huggingface_hub` are switched off, since their carriage returns make a log file unreadable.
    """
    console = console or err
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_nanovlm", False):
            root.removeHandler(handler)
    if console.is_terminal and not console.is_dumb_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=debug, rich_tracebacks=False, markup=False)
    else:
        handler = PlainLogHandler()
        _disable_progress_bars()
    handler._nanovlm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _disable_progress_bars() -> None:
    """No carriage-return progress bars from `datasets` / `huggingface_hub` (read from the environment when they are
    imported; switched off directly when they already are). A user's own setting of the variables wins."""
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        importlib.import_module("huggingface_hub.utils").disable_progress_bars()


def print_error(message: str) -> None:
    """One red line on stderr: `error: <message>`."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def to_jsonable(value: Any) -> Any:
    """Library results -> JSON-safe data (`to_dict()`, dataclasses, paths, tuples, mappings)."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def print_json(value: Any) -> None:
    """Machine-readable result on stdout (plain JSON: no colours, no wrapping)."""
    sys.stdout.write(json.dumps(to_jsonable(value), indent=2) + "\n")
    sys.stdout.flush()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"vision": {"n_layers": 3}} -> {"vision.n_layers": 3}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def mapping_table(title: str, data: Mapping[str, Any]) -> Table:
    """A two-column field/value table of (flattened) `data`."""
    table = Table(title=title, title_justify="left", show_header=True, header_style="bold")
    table.add_column("field", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in flatten(to_jsonable(data)).items():
        table.add_row(key, escape(json.dumps(value) if not isinstance(value, str) else value))
    return table


def print_result(value: Any, *, as_json: bool, title: str = "result") -> None:
    """Render a library result: JSON with --json, else a table (mappings) or plain text."""
    if as_json:
        print_json(value)
        return
    data = to_jsonable(value)
    if isinstance(data, Mapping):
        out.print(mapping_table(title, data))
    elif isinstance(data, list) and all(isinstance(v, str) for v in data):
        for text in data:
            out.print(text, markup=False, soft_wrap=True)
    else:
        out.print(data if isinstance(data, str) else json.dumps(data, indent=2), markup=False, soft_wrap=True)
