"""Shell completions (bash, zsh, fish) and the `nanovlm.1` man page, generated from the Typer app itself.

Each output is rendered from the records of `reference.py` (the command tree read once, help as written in the
code); the completions here, the man page in `manpage.py`. Static scripts need no Python at completion time and
can be packaged by distributions; using the raw help strings (never Rich's rendered help) keeps the output
independent of terminal width, so `scripts/gen_docs.py` is deterministic and a test can fail when the committed
files drift from the app.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from nanovlm_cli.cli.app import get_command
from nanovlm_cli.cli.manpage import man_page
from nanovlm_cli.cli.reference import HEADER, ParamDoc, describe

OUTPUTS = ("completions/nanovlm.bash", "completions/_nanovlm", "completions/nanovlm.fish", "man/nanovlm.1")


def _all_option_names(params: typing.Iterable[ParamDoc]) -> list[str]:
    return [n for p in params if not p.is_argument for n in (*p.names, *p.negations)]


# --- bash -----------------------------------------------------------------------------------------------------

def bash_completion(group: Any) -> str:
    global_opts, commands = describe(group)
    names = " ".join(c.name for c in commands)
    lines = [
        f"# bash completion for nanovlm ({HEADER})",
        "_nanovlm() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" cmd="" opts="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        f"            {'|'.join(c.name for c in commands)}) cmd=\"${{COMP_WORDS[i]}}\"; break ;;",
        "        esac",
        "    done",
        '    if [[ -z "$cmd" ]]; then',
        (f'        COMPREPLY=($(compgen -W "{" ".join([*_all_option_names(global_opts), "--help", "-h"])} {names}" '
         '-- "$cur"))'),
        "        return 0",
        "    fi",
        '    case "$cmd" in',
    ]
    for command in commands:
        lines.append(f"        {command.name})")
        choice_opts = [p for p in command.options if p.choices]
        value_opts = [p for p in command.options if p.metavar and not p.choices]
        if choice_opts or value_opts:
            lines.append('            case "$prev" in')
            for p in choice_opts:
                lines.append(f"                {'|'.join(p.names)}) COMPREPLY=($(compgen -W \"{' '.join(p.choices)}\" "
                             '-- "$cur")); return 0 ;;')
            files = [n for p in value_opts if p.is_path for n in p.names]
            others = [n for p in value_opts if not p.is_path for n in p.names]
            if files:
                lines.append(f"                {'|'.join(files)}) COMPREPLY=($(compgen -f -- \"$cur\")); return 0 ;;")
            if others:
                lines.append(f"                {'|'.join(others)}) COMPREPLY=(); return 0 ;;")
            lines.append("            esac")
        lines.append(f'            opts="{" ".join([*_all_option_names(command.options), "--help", "-h"])}" ;;')
    lines += [
        "    esac",
        '    if [[ "$cur" == -* ]]; then',
        '        COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
        "    else",
        '        COMPREPLY=($(compgen -f -- "$cur"))',
        "    fi",
        "}",
        "complete -o default -o bashdefault -F _nanovlm nanovlm",
    ]
    return "\n".join(lines) + "\n"


# --- zsh ------------------------------------------------------------------------------------------------------

def _zsh_text(text: str) -> str:
    """First sentence, safe inside a single-quoted `_arguments` spec (brackets would end the description)."""
    text = text.split(". ")[0].rstrip(".")
    return text.replace("\\", "").replace("[", "(").replace("]", ")").replace("'", "'\\''")


def _zsh_spec(p: ParamDoc) -> list[str]:
    desc = _zsh_text(p.help)
    if p.is_argument:
        action = "_files" if p.is_path else " "
        return [f"'{'*' if p.multiple else ''}:{p.names[0].lower()}:{action}'"]
    label = p.names[0].lstrip("-")
    if p.metavar is None:
        exclusive = " ".join([*p.names, *p.negations])
        specs = [f"'({exclusive})'{{{','.join(p.names)}}}'[{desc}]'" if len(p.names) > 1
                 else f"'({exclusive}){p.names[0]}[{desc}]'"]
        specs += [f"'({exclusive}){n}[not: {desc}]'" for n in p.negations]
        return specs
    if p.choices:
        action = f"({' '.join(p.choices)})"
    else:
        action = "_files" if p.is_path else " "
    if p.multiple:
        return [f"'*{n}[{desc}]:{label}:{action}'" for n in p.names]
    if len(p.names) > 1:
        return [f"'({' '.join(p.names)})'{{{','.join(p.names)}}}'[{desc}]:{label}:{action}'"]
    return [f"'{p.names[0]}[{desc}]:{label}:{action}'"]


def zsh_completion(group: Any) -> str:
    global_opts, commands = describe(group)
    lines = [
        "#compdef nanovlm",
        f"# zsh completion for nanovlm ({HEADER})",
        "",
        "_nanovlm() {",
        "    local curcontext=\"$curcontext\" state line",
        "    typeset -A opt_args",
        "    _arguments -C \\",
    ]
    for p in global_opts:
        lines += [f"        {spec} \\" for spec in _zsh_spec(p)]
    lines += [
        "        '(- *)'{-h,--help}'[Show help and exit]' \\",
        "        '1:command:->command' \\",
        "        '*::arg:->args'",
        "    case $state in",
        "        command)",
        "            local -a commands",
        "            commands=(",
    ]
    lines += [f"                '{c.name}:{_zsh_text(c.summary)}'" for c in commands]
    lines += [
        "            )",
        "            _describe -t commands 'nanovlm command' commands ;;",
        "        args)",
        "            case $words[1] in",
    ]
    for command in commands:
        lines.append(f"                {command.name})")
        lines.append("                    _arguments \\")
        specs = [s for p in command.options for s in _zsh_spec(p)]
        specs.append("'(- *)'{-h,--help}'[Show help and exit]'")
        specs += [s for p in command.arguments for s in _zsh_spec(p)]
        lines += [f"                        {s} \\" for s in specs[:-1]]
        lines.append(f"                        {specs[-1]} ;;")
    lines += ["            esac ;;", "    esac", "}", "", '_nanovlm "$@"']
    return "\n".join(lines) + "\n"


# --- fish -----------------------------------------------------------------------------------------------------

def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_lines(p: ParamDoc, condition: str) -> list[str]:
    def names(opts: typing.Iterable[str]) -> str:
        return " ".join(f"-l {n[2:]}" if n.startswith("--") else f"-s {n[1:]}" for n in opts)

    desc = _fish_quote(p.help.split(". ")[0].rstrip("."))
    base = f"complete -c nanovlm -n {_fish_quote(condition)}"
    if p.metavar is None:
        out = [f"{base} {names(p.names)} -d {desc}"]
        out += [f"{base} {names([n])} -d {_fish_quote('not: ' + p.help.split('. ')[0].rstrip('.'))}"
                for n in p.negations]
        return out
    if p.choices:
        return [f"{base} {names(p.names)} -x -a {_fish_quote(' '.join(p.choices))} -d {desc}"]
    return [f"{base} {names(p.names)} -r{' -F' if p.is_path else ''} -d {desc}"]


def fish_completion(group: Any) -> str:
    global_opts, commands = describe(group)
    lines = [f"# fish completion for nanovlm ({HEADER})", "complete -c nanovlm -f"]
    for p in global_opts:
        lines += _fish_lines(p, "__fish_use_subcommand")
    lines += [f"complete -c nanovlm -n __fish_use_subcommand -a {c.name} -d {_fish_quote(c.summary.rstrip('.'))}"
              for c in commands]
    for command in commands:
        condition = f"__fish_seen_subcommand_from {command.name}"
        for p in command.options:
            lines += _fish_lines(p, condition)
        if any(a.is_path for a in command.arguments):
            lines.append(f"complete -c nanovlm -n {_fish_quote(condition)} -F")
    return "\n".join(lines) + "\n"


# --- all outputs ----------------------------------------------------------------------------------------------

def generate_all(group: Any | None = None) -> dict[str, str]:
    """Relative path -> content of every generated file (see OUTPUTS), from the app unless `group` is given."""
    if group is None:
        group = get_command()
    rendered = {
        "completions/nanovlm.bash": bash_completion(group),
        "completions/_nanovlm": zsh_completion(group),
        "completions/nanovlm.fish": fish_completion(group),
        "man/nanovlm.1": man_page(group),
    }
    assert tuple(rendered) == OUTPUTS
    return rendered


def stale_outputs(root: Path, group: Any | None = None) -> list[str]:
    """Generated files under `root` that are missing or differ from what the app generates now."""
    return [path for path, text in generate_all(group).items()
            if not (root / path).is_file() or (root / path).read_text() != text]
