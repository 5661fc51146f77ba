"""`--help` in a real 80-column terminal: whole option names, no type placeholders, examples that parse; the man
page where `man` finds it; and a test suite that does not depend on the caller's terminal settings."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from nanovlm_cli.cli.app import get_command
from nanovlm_cli.cli.reference import COMMAND_EXAMPLES, EXAMPLES, describe

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["train", "generate", "eval", "vram", "validate", "push"]


def _help(*args: str, columns: int = 80) -> str:
    env = {**os.environ, "COLUMNS": str(columns)}
    result = subprocess.run([sys.executable, "-m", "nanovlm_cli", *args, "--help"], capture_output=True, text=True,
                            timeout=60, env=env, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _option_names(command: str) -> list[str]:
    _, commands = describe(get_command())
    doc = next(c for c in commands if c.name == command)
    return [n for p in doc.options for n in (*p.names, *p.negations) if n.startswith("--")]


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {command: _help(*([command] if command else [])) for command in ["", *COMMANDS]}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_shows_every_option_name_whole(helps, command):
    text = helps[command]
    assert "…" not in text
    words = set(re.findall(r"--[\w-]+", text))
    for name in _option_names(command):
        assert name in words, f"`nanovlm {command} --help` at 80 columns does not show {name} whole"
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_no_type_placeholder_for_flags(helps, command):
    assert "<bool>" not in helps[command]
    assert not re.search(r"<\w[\w ]*>", helps[command]), "a <type> placeholder is shown"
    flag = "--json +Print the result as JSON" if command else "--debug +Show full tracebacks"
    assert re.search(rf"^  {flag}", helps[command], re.MULTILINE), "a flag is followed by something else"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_ends_with_examples(helps, command):
    examples = helps[command].split("Examples:\n")[1]
    for text, line in COMMAND_EXAMPLES[command]:
        assert f"    {line}\n" in examples  # a whole, copyable command line
        assert text.split()[0] in examples


@pytest.mark.parametrize("line", [c for _, c in EXAMPLES] + [c for v in COMMAND_EXAMPLES.values() for _, c in v])
def test_every_help_example_is_a_valid_command_line(line):
    for part in line.split("&&"):
        words = shlex.split(part)
        assert words[0] == "nanovlm" and len(part.strip()) <= 76, part  # fits an 80-column help, indented
        command = get_command().commands[words[1]]
        command.make_context(words[1], words[2:])  # parses (raises on a bad flag or value); runs nothing


def test_names_wider_than_the_column_get_their_own_line(helps):
    lines = helps["train"].splitlines()
    at = next(i for i, line in enumerate(lines) if "--gradient-checkpointing / --no-gradient-checkpointing" in line)
    assert lines[at].strip() == "--gradient-checkpointing / --no-gradient-checkpointing"
    assert lines[at + 1].strip().startswith("Recompute activations")


def test_help_adapts_to_a_narrow_terminal_without_cutting_names():
    text = _help("vram", columns=50)
    assert "--images-per-sample N" in text and "--max-batch-size-for GIB" in text and "…" not in text


def test_root_help_points_to_the_man_page_as_installed_and_from_a_checkout(helps):
    text = " ".join(helps[""].split())
    assert "man nanovlm" in text and "man -l man/nanovlm.1" in text


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")
def test_help_in_a_real_80_column_terminal():
    session = f"nanovlm-help-{uuid.uuid4().hex[:8]}"
    done = f"HELP-DONE-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "50"], env=env, check=True,
                   timeout=30)
    try:
        command = f"unset COLUMNS LINES; {shlex.quote(sys.executable)} -m nanovlm_cli vram --help; echo {done}"
        subprocess.run(["tmux", "send-keys", "-t", session, command, "Enter"], check=True, timeout=30)
        deadline, screen = time.monotonic() + 60, ""
        while time.monotonic() < deadline and f"\n{done}" not in screen:
            time.sleep(0.3)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-", "-t", session], capture_output=True,
                                    text=True, check=True, timeout=30).stdout
        assert f"\n{done}" in screen, screen
        assert "…" not in screen and "<bool>" not in screen
        for name in _option_names("vram"):
            assert re.search(rf"{re.escape(name)}(?![\w-])", screen), f"{name} is not shown whole in a tmux pane"
        assert "Examples:" in screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False, timeout=30)


def test_man_page_is_installed_where_man_finds_it(tmp_path):
    """The wheel carries the page as data for <prefix>/share/man/man1, and `man` finds it there.

    The wheel is built from a copy of the sources and only unpacked here: installing it (even with --prefix) would
    make pip uninstall the package from the environment running the tests.
    """
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("nanovlm_cli", "man"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("nanovlm_cli-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith(".data/data/share/man/man1/nanovlm.1")]
        installed = tmp_path / "prefix/share/man/man1/nanovlm.1"  # where pip puts a wheel's data for that prefix
        installed.parent.mkdir(parents=True)
        installed.write_bytes(archive.read(member))
    assert installed.read_text() == (ROOT / "man/nanovlm.1").read_text()
    if shutil.which("man") is None:
        return
    env = {**os.environ, "MANPATH": str(tmp_path / "prefix/share/man"), "MANPAGER": "cat", "PAGER": "cat"}
    found = subprocess.run(["man", "-w", "nanovlm"], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert found.returncode == 0 and Path(found.stdout.strip()) == installed, found.stderr


CONSOLE_SENSITIVE = ["tests/test_dashboard.py", "tests/test_cli.py::test_help_of_every_command_shows_its_options",
                     "tests/test_help.py::test_help_at_80_columns_shows_every_option_name_whole"]


@pytest.mark.parametrize("caller", [{"NO_COLOR": "1", "COLUMNS": "40"}, {"TERM": "dumb", "FORCE_COLOR": "1"}],
                         ids=["NO_COLOR-narrow", "TERM=dumb-forced-colour"])
def test_suite_does_not_depend_on_the_callers_terminal(caller, tmp_path):
    env = {**os.environ, **caller}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CONSOLE_SENSITIVE],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
