"""`nanovlm validate`: a pre-flight check that a checkpoint is sound (files, config, tokenizer, keys, shapes).

Thin layer over `nanovlm_cli.validation.validate_checkpoint`: a table (or `--json`) of every check, then exit 0
when all passed, else one red line per problem and exit 1, so scripts can gate on it.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from nanovlm_cli.cli.arguments import check_device
from nanovlm_cli.cli.console import out, print_error, print_json
from nanovlm_cli.cli.options import CheckpointArg, DeviceOpt, JsonOpt


def validate(
    checkpoint: CheckpointArg,
    generate: Annotated[bool, typer.Option(
        "--generate/--no-generate", help="Also run a short generation as a smoke test.")] = True,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Check that CHECKPOINT loads and is consistent."""
    from nanovlm_cli.validation import validate_checkpoint  # torch-free --help: the library loads on use

    check_device(device)
    report = validate_checkpoint(checkpoint, generate=generate, device=device)
    if json_output:
        print_json(report)
    else:
        table = Table(title=f"validate {checkpoint}", title_justify="left", header_style="bold")
        table.add_column("check", style="cyan", no_wrap=True)
        table.add_column("", no_wrap=True)
        table.add_column("detail", overflow="fold")
        for check in report.checks:
            mark = "[dim]skip[/]" if check.skipped else "[green]ok[/]" if check.ok else "[bold red]FAIL[/]"
            table.add_row(check.name, mark, escape(check.detail))
        out.print(table)
    if not report.ok:
        for check in report.problems:
            if not check.skipped:
                print_error(f"{check.name}: {check.detail}")
        raise typer.Exit(1)
