"""Completions and man page: generated from the app, committed, never drifting, and valid for their tools."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nanovlm_cli.cli.app import get_command
from nanovlm_cli.cli.docs import OUTPUTS, describe, generate_all
from nanovlm_cli.cli.manpage import roff_escape

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "run `python scripts/gen_docs.py` and commit completions/ and man/"


def require_tools(*tools: str, hint: str) -> None:
    """Skip when a checker is not installed here; in CI (`CI=true`) fail instead, since a skip there would count as a
    pass of a check that never ran."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    message = f"{'/'.join(missing)} not installed ({hint})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so this check must run")
    pytest.skip(message)


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return generate_all()


def test_committed_files_match_the_app(generated):
    for path, text in generated.items():
        target = ROOT / path
        assert target.is_file(), f"{path} is missing; {REGENERATE}"
        assert target.read_text() == text, f"{path} is out of date with the CLI options; {REGENERATE}"


def test_generation_does_not_depend_on_terminal_width(generated, monkeypatch):
    monkeypatch.setenv("COLUMNS", "37")
    assert generate_all() == generated


def test_every_command_and_option_is_in_every_output(generated):
    _, commands = describe(get_command())
    assert [c.name for c in commands] == ["train", "generate", "eval", "vram", "validate", "push", "export", "chat",
                                          "serve"]
    for path in OUTPUTS:
        text = generated[path].replace("\\-", "-")  # roff escapes dashes
        for command in commands:
            assert command.name in text, f"{command.name} missing from {path}"
            for option in command.options:
                long_names = [n for n in option.names if n.startswith("--")]
                for name in long_names + list(option.negations):
                    assert (name in text) if path != "completions/nanovlm.fish" else (f"-l {name[2:]}" in text), \
                        f"{name} of {command.name} missing from {path}"


def test_option_records_read_choices_paths_and_flags():
    _, commands = describe(get_command())
    train = {n: p for p in next(c for c in commands if c.name == "train").options for n in p.names}
    assert train["--preset"].choices[:1] == ("default",) and "tiny" in train["--preset"].choices
    assert train["--config"].is_path and train["--config"].metavar == "FILE"
    assert train["--compile"].metavar is None and train["--compile"].negations == ("--no-compile",)
    assert train["--batch-size"].metavar == "N"


def _complete(words: list[str]) -> list[str]:
    script = (f"source {ROOT / 'completions/nanovlm.bash'}; COMP_WORDS=({' '.join(words)}); "
              f"COMP_CWORD={len(words) - 1}; _nanovlm; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion_completes_commands_options_and_choices():
    assert _complete(["nanovlm", "tr"]) == ["train"]
    assert _complete(["nanovlm", "train", "--pres"]) == ["--preset"]
    assert _complete(["nanovlm", "train", "--preset", "ti"]) == ["tiny"]
    assert _complete(["nanovlm", "--debug", "vram", "--no-s"]) == ["--no-stop-on-oom"]
    assert "--no-generate" in _complete(["nanovlm", "validate", "--"])


@pytest.mark.parametrize("shell,path", [("bash", "completions/nanovlm.bash"), ("zsh", "completions/_nanovlm"),
                                        ("fish", "completions/nanovlm.fish")])
def test_completion_script_parses(shell, path):
    require_tools(shell, hint=".ci/run installs it")
    result = subprocess.run([shell, "-n", str(ROOT / path)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_roff_escape_neutralises_requests_dashes_and_backslashes():
    assert roff_escape(".TH x") == "\\&.TH x"
    assert roff_escape("'quoted") == "\\&'quoted"
    assert roff_escape("--batch-size a\\b") == "\\-\\-batch\\-size a\\eb"


def test_man_page_renders_without_warnings():
    require_tools("man", "groff", hint=".ci/run installs man-db and groff-base")
    page = ROOT / "man/nanovlm.1"
    lint = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert lint.returncode == 0 and lint.stderr == "", lint.stderr
    env = {**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat"}
    rendered = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert rendered.returncode == 0, rendered.stderr
    text = re.sub(".\b", "", rendered.stdout)  # drop overstrike bold/underline
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "ENVIRONMENT", "EXAMPLES"):
        assert heading in text
    assert "nanovlm train [OPTIONS]" in text and "--gradient-checkpointing" in text


def test_readme_setup_commands_presets_and_config_example(tmp_path):
    from nanovlm_cli.presets import PRESETS
    from nanovlm_cli.run_config import resolve_run_config

    readme = (ROOT / "README.md").read_text()
    assert "pip install torch==2.14.1 torchvision==0.29.1 && pip install -e . && nanovlm train --preset tiny" in readme
    assert "pip install -e '.[dev]' && python -m pytest -q" in readme
    assert "python -m pytest -q" in (ROOT / ".ci/run").read_text()
    for name in PRESETS:
        assert f"| `{name}` |" in readme, f"preset {name} missing from the README presets table"
    for command in ("train", "generate", "eval", "vram", "validate", "push"):
        assert f"### {command}" in readme
    example = re.search(r"```toml\n(.*?)```", readme, re.DOTALL).group(1)
    (tmp_path / "run.toml").write_text(example)
    model, train = resolve_run_config("default", config_file=str(tmp_path / "run.toml"))
    assert (train.batch_size, train.lr_vision, model.image.max_grid) == (8, 1e-5, 4)


def test_man_page_lists_every_original_spelling_and_every_command_example(generated):
    from nanovlm_cli.cli.options import ALIASES
    from nanovlm_cli.cli.reference import COMMAND_EXAMPLES

    page = generated["man/nanovlm.1"].replace("\\-", "-").replace("\\e", "\\")
    compatibility = page.split(".SH COMPATIBILITY")[1].split(".SH ")[0]
    for command, table in ALIASES.items():
        section = compatibility.split(f'.SS "nanovlm {command}"')[1].split(".SS ")[0]
        for name in table:
            assert "--" + name[2:].replace("-", "_") in section, f"{name} of {command} missing from COMPATIBILITY"
    for examples in COMMAND_EXAMPLES.values():
        for _, line in examples:
            assert line in page
    assert ".nh" in page.splitlines()[:4]  # no hyphenation: option names are never split
