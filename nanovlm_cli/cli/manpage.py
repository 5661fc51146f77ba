"""The `nanovlm(1)` man page in roff, rendered from the same records as the shell completions (`docs.py`).

Only the portable `man` macros are used (.TH .SH .SS .TP .PP .nf/.fi .B .I), every user string goes through
`roff_escape`, and there is no date in the header, so the page renders with `man -l` and regenerates byte-for-byte.
"""

from __future__ import annotations

from typing import Any

from nanovlm_cli import __version__
from nanovlm_cli.cli.docs import ENVIRONMENT, EXAMPLES, EXIT_STATUS, HEADER, ParamDoc, describe


def roff_escape(text: str) -> str:
    """Plain text -> roff text: backslashes and dashes escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n")]
    return "\n".join(lines)


def _bold(text: str) -> str:
    return f"\\fB{roff_escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{roff_escape(text)}\\fR"


def _option_entry(p: ParamDoc) -> list[str]:
    names = ", ".join(_bold(n) for n in (*p.names, *p.negations))
    head = names + (f" {_italic(p.metavar)}" if p.metavar else "")
    body = p.help or ""
    if p.multiple:
        body += " Repeatable."
    if p.default is not None and p.default != "":
        body += f" Default: {p.default}."
    return [".TP", head, roff_escape(body.strip())]


def man_page(group: Any) -> str:
    global_opts, commands = describe(group)
    summary = " ".join((group.help or "").split())
    lines = [
        f".\\\" {HEADER}",
        f'.TH NANOVLM 1 "" "nanovlm {__version__}" "User Commands"',
        ".SH NAME",
        f"nanovlm \\- {roff_escape(summary[0].lower() + summary[1:].rstrip('.'))}",
        ".SH SYNOPSIS",
        f"{_bold('nanovlm')} [{_bold('--debug')}] {_italic('COMMAND')} [{_italic('OPTIONS')}] [{_italic('ARGS')}]",
        ".br",
        f"{_bold('nanovlm')} {_bold('--version')}",
        ".SH DESCRIPTION",
        roff_escape(
            "nanovlm trains, fine-tunes, evaluates and runs small vision-language models: a vision encoder "
            "(SigLIP/SigLIP2, DINOv2, DINOv3) feeds a pixel-shuffle projector whose tokens are spliced into a "
            "decoder language model (SmolLM2/Llama-style, Gemma-3). It loads the checkpoints of Hugging Face's "
            "nanoVLM. Results go to standard output and progress and logs to standard error, so output pipes cleanly."
        ),
        ".PP",
        roff_escape("Every option also accepts its underscore spelling, as the original nanoVLM scripts wrote them: "
                    "--batch_size for --batch-size, --no_compile for --no-compile."),
        ".SH GLOBAL OPTIONS",
    ]
    for p in global_opts:
        lines += _option_entry(p)
    lines += [".TP", f"{_bold('-h')}, {_bold('--help')}", "Show help (of nanovlm or of a command) and exit."]
    lines.append(".SH COMMANDS")
    for command in commands:
        usage = " ".join(["nanovlm", command.name, "[OPTIONS]", *(a.names[0] for a in command.arguments)])
        lines += [f'.SS "{roff_escape(usage)}"', roff_escape(" ".join(command.help.split()))]
        for p in command.arguments:
            lines += [".TP", _italic(p.names[0]), roff_escape(p.help)]
        for p in command.options:
            lines += _option_entry(p)
    lines.append(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        lines += [".TP", _bold(code), roff_escape(text)]
    lines.append(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT:
        lines += [".TP", _bold(name), roff_escape(text)]
    lines.append(".SH EXAMPLES")
    for text, command in EXAMPLES:
        lines += [".PP", roff_escape(text), ".PP", ".RS 4", ".nf", roff_escape(command), ".fi", ".RE"]
    lines += [".SH SEE ALSO", "The README.md of the project, and", _bold("nanovlm COMMAND --help") + "."]
    return "\n".join(lines) + "\n"
