"""The `nanovlm(1)` man page in roff, rendered from the same records as the shell completions (`reference.py`).

Only the portable `man` macros are used (.TH .SH .SS .TP .PP .nf/.fi .B .I), every user string goes through
`roff_escape`, and there is no date in the header, so the page renders with `man -l` and regenerates byte-for-byte.
"""

from __future__ import annotations

from typing import Any

from nanovlm_cli import __version__
from nanovlm_cli.cli.options import ALIASES, IMPLIED, Fixed, Refused, Rename, ToArgument
from nanovlm_cli.cli.reference import COMMAND_EXAMPLES, ENVIRONMENT, EXAMPLES, EXIT_STATUS, HEADER, ParamDoc, describe


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
    # a long choice list ({a,b,...}) may break after its commas (\: is a zero-width break point)
    head = names + (f" {_italic(p.metavar).replace(',', ',' + chr(92) + ':')}" if p.metavar else "")
    body = p.help or ""
    if p.multiple:
        body += " Repeatable."
    if p.default is not None and p.default != "":
        body += f" Default: {p.default}."
    return [".TP", head, roff_escape(body.strip())]


def _alias_meaning(alias: Any, arguments: dict[str, str]) -> str:
    if isinstance(alias, Rename):
        extra = " (when several are given they must agree)" if alias.merge else ""
        extra += " (several words after it are joined with commas)" if alias.many else ""
        return f"Same as {alias.to}{extra}."
    if isinstance(alias, Fixed):
        return f"Same as {alias.to} {alias.value}."
    if isinstance(alias, ToArgument):
        return f"Gives the {arguments.get(alias.argument, alias.argument.upper())} argument."
    assert isinstance(alias, Refused)
    why = alias.why({}) if callable(alias.why) else alias.why
    return f"Refused: {why}."


def _compatibility(group: Any) -> list[str]:
    """The COMPATIBILITY section: the original nanoVLM spellings each command accepts, from `ALIASES`."""
    lines = [".SH COMPATIBILITY", roff_escape(
        "The command lines of the original nanoVLM repository work with its flags spelled as they were: "
        "underscores (--batch_size) for any option, and these names of its README, scripts and config fields. "
        "Flags that cannot mean anything here stop the command with one line saying why (exit status 2); "
        "boolean flags take no value (--compile, not --compile True).")]
    for command, table in ALIASES.items():
        cmd = group.commands[command]
        arguments = {p.name: p.metavar or p.name.upper() for p in cmd.params if p.param_type_name == "argument"}
        lines.append(f'.SS "{roff_escape("nanovlm " + command)}"')
        meanings: dict[str, list[str]] = {}
        for name, alias in table.items():
            meanings.setdefault(_alias_meaning(alias, arguments), []).append("--" + name[2:].replace("-", "_"))
        for trigger, (option, value) in IMPLIED.get(command, {}).items():
            meanings.setdefault(f"Without --backend, implies {option} {value}.", []).append(trigger)
        for meaning, names in meanings.items():
            lines += [".TP", ", ".join(_bold(n) for n in names), roff_escape(meaning)]
    return lines


def man_page(group: Any) -> str:
    global_opts, commands = describe(group)
    summary = " ".join((group.help or "").split())
    lines = [
        f".\\\" {HEADER}",
        f'.TH NANOVLM 1 "" "nanovlm {__version__}" "User Commands"',
        ".nh",  # never hyphenate: option names must stay whole
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
        for text, example in COMMAND_EXAMPLES.get(command.name, []):
            lines += [".PP", roff_escape(text), ".RS 4", ".nf", roff_escape(example), ".fi", ".RE"]
    lines += _compatibility(group)
    lines.append(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        lines += [".TP", _bold(code), roff_escape(text)]
    lines.append(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT:
        lines += [".TP", _bold(name), roff_escape(text)]
    lines.append(".SH EXAMPLES")
    for text, command in EXAMPLES:
        lines += [".PP", roff_escape(text), ".PP", ".RS 4", ".nf", roff_escape(command), ".fi", ".RE"]
    lines += [".SH FILES", _bold("man/nanovlm.1"), roff_escape(
        "This page. pip installs it as share/man/man1/nanovlm.1 under the environment's prefix, where man finds it "
        "when that prefix's bin directory is on PATH (a virtual environment); otherwise read it with "
        "man -l man/nanovlm.1 from a source checkout."),
        ".SH SEE ALSO", "The README.md of the project, and", _bold("nanovlm COMMAND --help") + "."]
    return "\n".join(lines) + "\n"
