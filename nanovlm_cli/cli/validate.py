"""`nanovlm validate`: a pre-flight check that a checkpoint is sound (files, config, tokenizer, keys, shapes).

Thin layer over the library's checkpoint validation; exits 1 when the report says the checkpoint is not sound,
so scripts can gate on it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from nanovlm_cli.cli.console import library_function, print_error, print_result
from nanovlm_cli.cli.options import CheckpointArg, DeviceOpt, JsonOpt


def validate(
    checkpoint: CheckpointArg,
    generate: Annotated[bool, typer.Option(
        "--generate/--no-generate", help="Also run a short generation as a smoke test.")] = True,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Check that CHECKPOINT loads and is consistent."""
    # TODO(checkpoint): provide nanovlm_cli.checkpoint.validate_checkpoint(...) -> a report with .ok and to_dict().
    validate_checkpoint = library_function("nanovlm_cli.checkpoint", "validate_checkpoint", "validate")
    report = validate_checkpoint(checkpoint, generate=generate, device=device)
    print_result(report, as_json=json_output, title=f"validate {checkpoint}")
    if not getattr(report, "ok", True):
        print_error(f"checkpoint {checkpoint} failed validation; see the report above")
        raise typer.Exit(1)
