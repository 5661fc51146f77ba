"""`--help` of `nanovlm` and of each command, from the records the man page and completions use (reference.py).

Why not Typer's Rich panels: at 80 columns they cut option names to fit their table (`--images-per-sam…`) and show
a `<bool>` placeholder for flags. Here an option's names are never cut or split: the name column has a width that
suits the terminal, a row whose names are wider puts its help on the next line (as argparse and git do), and help
text wraps at spaces only, never at the hyphens of an option name. Every command's help ends with examples.
Colour comes from Rich, so NO_COLOR, TERM=dumb and pipes get plain text.
"""

from __future__ import annotations

import textwrap
from typing import Any

from rich.console import Console
from rich.text import Text

from nanovlm_cli.cli.reference import COMMAND_EXAMPLES, EXAMPLES, ParamDoc, param_doc

INDENT = 2
GAP = 2
MAX_INLINE_CHOICES = 24  # longer choice lists show as NAME, with the values listed in the help text


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, max(width, 20), break_long_words=False, break_on_hyphens=False) or [""]


def _metavar(p: ParamDoc) -> str | None:
    if p.metavar is None:
        return None
    if p.choices:
        braces = "{" + ",".join(p.choices) + "}"
        return braces if len(braces) <= MAX_INLINE_CHOICES else "NAME"
    return p.metavar


def _label(p: ParamDoc) -> Text:
    if p.is_argument:
        return Text(p.names[0], style="bold cyan")
    shorts = [n for n in p.names if not n.startswith("--")]
    longs = [n for n in p.names if n.startswith("--")]
    label = Text(", ".join([*shorts, *longs]), style="bold cyan")
    for negation in p.negations:
        label.append(" / ")
        label.append(negation, style="bold cyan")
    metavar = _metavar(p)
    if metavar:
        label.append(f" {metavar}", style="yellow")
    return label


def _body(p: ParamDoc) -> str:
    parts = [p.help.strip()] if p.help.strip() else []
    if p.choices and _metavar(p) == "NAME" and not all(c in p.help for c in p.choices):
        parts.append(f"One of: {', '.join(p.choices)}.")
    if p.range:
        parts.append(f"{p.range[0].upper()}{p.range[1:]}.")
    if p.multiple and "repeat" not in p.help.lower():
        parts.append("Repeatable.")
    if p.required and not p.is_argument:
        parts.append("[required]")
    if p.default not in (None, ""):
        parts.append(f"[default: {p.default}]")
    return " ".join(parts)


def _column(rows: list[tuple[Text, str]], width: int) -> int:
    """The width of the names column: the longest names, up to about a third of the terminal."""
    return min(max((len(label) for label, _ in rows), default=0), max(16, min(34, width // 3)))


def _rows(rows: list[tuple[Text, str]], width: int, column: int) -> list[Text]:
    """Two columns: names, then help wrapped beside them (or below, when the names are wider than the column)."""
    start = INDENT + column + GAP
    lines: list[Text] = []
    for label, body in rows:
        wrapped = _wrap(body, width - start)
        if len(label) <= column:
            first = Text(" " * INDENT) + label + Text(" " * (column - len(label) + GAP) + wrapped[0])
            lines.append(first)
        else:
            lines.append(Text(" " * INDENT) + label)
            lines.append(Text(" " * start + wrapped[0]))
        lines += [Text(" " * start + rest) for rest in wrapped[1:]]
    return lines


def _section(title: str) -> list[Text]:
    return [Text(""), Text(f"{title}:", style="bold")]


def _examples(examples: list[tuple[str, str]], width: int) -> list[Text]:
    lines = _section("Examples")
    for i, (text, command) in enumerate(examples):
        if i:
            lines.append(Text(""))
        lines += [Text(" " * INDENT + line, style="dim") for line in _wrap(text, width - INDENT)]
        lines.append(Text(" " * (2 * INDENT) + command))  # a command line is never wrapped: it must stay copyable
    return lines


def help_lines(obj: Any, ctx: Any, width: int) -> list[Text]:
    """The help of a command or of the group (`obj`, with its click context) at `width` columns."""
    arguments = [p for p in obj.get_params(ctx) if getattr(p, "param_type_name", "") == "argument"]
    pieces = [(p.metavar or p.name.upper()) if p.required else f"[{p.metavar or p.name.upper()}]" for p in arguments]
    if getattr(obj, "commands", None):
        pieces.append("COMMAND [ARGS]...")
    usage = " ".join([ctx.command_path, "[OPTIONS]", *pieces])
    lines = [Text("Usage: ", style="bold") + Text(usage)]
    for paragraph in (obj.help or "").strip().split("\n\n"):
        lines += [Text("")] + [Text(line) for line in _wrap(" ".join(paragraph.split()), width)]
    docs = [d for d in (param_doc(p) for p in obj.get_params(ctx)) if d is not None]
    sections: dict[str, list[tuple[Text, str]]] = {}
    if any(d.is_argument for d in docs):
        sections["Arguments"] = [(_label(d), _body(d)) for d in docs if d.is_argument]
    sections["Options"] = []
    for d in docs:
        if not d.is_argument:
            sections.setdefault(d.panel or "Options", []).append((_label(d), _body(d)))
    sections["Options"].append((Text("-h, --help", style="bold cyan"), "Show this help and exit."))
    commands = getattr(obj, "commands", None)
    if commands:
        sections["Commands"] = [(Text(name, style="bold cyan"), (cmd.help or "").strip().split("\n")[0])
                                for name, cmd in commands.items() if not cmd.hidden]
    column = _column([row for rows in sections.values() for row in rows], width)  # one column for every section
    for title, rows in sections.items():
        lines += _section(title) + _rows(rows, width, column)
    if commands:
        lines += _examples(EXAMPLES, width)
    elif obj.name in COMMAND_EXAMPLES:
        lines += _examples(COMMAND_EXAMPLES[obj.name], width)
    if obj.epilog:
        lines += [Text("")] + [Text(line) for line in _wrap(" ".join(obj.epilog.split()), width)]
    return lines


def render_help(obj: Any, ctx: Any, console: Console | None = None) -> str:
    """The help as a string, with colour codes only where the console would use colour (a terminal, no NO_COLOR)."""
    console = console or Console(highlight=False)
    with console.capture() as captured:
        for line in help_lines(obj, ctx, console.width):
            console.print(line, soft_wrap=True)  # already wrapped: Rich must not wrap or crop again
    return captured.get()
