"""`nanovlm export`: write a checkpoint as a transformers Idefics3 directory.

Thin layer over `nanovlm_cli.checkpoint.export.export_transformers`: the directory it writes loads with plain
transformers (`AutoModelForImageTextToText`, `AutoProcessor`, `pipeline("image-text-to-text")`). A checkpoint without
an exact transformers form (upstream nanoVLM layout, DINO encoders, another image layout) is refused with one line
and exit 1 before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nanovlm_cli.cli.console import out, print_json
from nanovlm_cli.cli.options import CheckpointArg, JsonOpt


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def export(
    checkpoint: CheckpointArg,
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="New or empty directory to write.")],
    json_output: JsonOpt = False,
) -> None:
    """Export CHECKPOINT to OUT_DIR in the transformers Idefics3 format."""
    from nanovlm_cli.checkpoint.export import export_transformers  # torch-free --help: the library loads on use

    result = export_transformers(checkpoint, out_dir)
    if json_output:
        print_json(result)
        return
    table = Table(title=f"exported {checkpoint} to {result.directory} (Idefics3, {result.text_model_type} decoder, "
                  f"{result.n_params:,} parameters)", title_justify="left", header_style="bold")
    table.add_column("file", style="cyan")
    table.add_column("size", justify="right")
    for f in result.files:
        table.add_row(f["name"], _size(f["size"]))
    out.print(table)
