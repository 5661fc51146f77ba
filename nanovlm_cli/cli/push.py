"""`nanovlm push`: publish a checkpoint directory to the Hugging Face Hub with a generated model card.

Thin layer over the library's hub module. The checkpoint must first pass `nanovlm validate`'s checks (without
generation); a broken one is refused with one line. `--dry-run DIR` writes exactly what would be uploaded (weights,
config, tokenizer, model card) into DIR and uploads nothing, so the card can be reviewed offline.
`--format transformers` uploads `nanovlm export`'s transformers (Idefics3) directory instead of the checkpoint's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from nanovlm_cli.cli.console import out, print_json
from nanovlm_cli.cli.options import CheckpointArg, JsonOpt, as_str


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _files_table(result: Any) -> Table:
    where = result.folder if result.dry_run else result.url
    title = f"{'dry run: would upload' if result.dry_run else 'uploaded'} to {result.repo_id} ({where})"
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("file", style="cyan")
    table.add_column("size", justify="right")
    for f in result.files:
        table.add_row(f.name, _size(f.size))
    table.add_section()
    table.add_row("[bold]total[/]", _size(result.total_bytes))
    return table


def push(
    checkpoint: CheckpointArg,
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repository, e.g. user/my-vlm.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (default: main).")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", "-m", help="Commit message.")] = None,
    dry_run: Annotated[Path | None, typer.Option(
        "--dry-run", metavar="DIR", help="Write the files that would be uploaded into DIR; upload nothing.")] = None,
    license: Annotated[str | None, typer.Option(
        "--license", metavar="ID", help="License for the model card, e.g. apache-2.0 (default: from the base "
                                        "models' licenses, else other).")] = None,
    format: Annotated[Literal["nanovlm", "transformers"], typer.Option(
        "--format", help="What to upload: the checkpoint as saved, or `nanovlm export`'s transformers directory.")
    ] = "nanovlm",
    keep_adapters: Annotated[bool, typer.Option(
        "--keep-adapters", help="Upload a LoRA checkpoint's adapters unmerged (default: merged into the weights).")
    ] = False,
    json_output: JsonOpt = False,
) -> None:
    """Validate CHECKPOINT, then upload it to the Hub as REPO_ID with a model card."""
    from nanovlm_cli.hub import push_checkpoint  # torch-free --help: the library loads on use

    result = push_checkpoint(checkpoint, repo_id, private=private, revision=revision, commit_message=commit_message,
                             dry_run_dir=as_str(dry_run), license=license, format=format,
                             keep_adapters=keep_adapters)
    if json_output:
        print_json(result)
    else:
        out.print(_files_table(result))
