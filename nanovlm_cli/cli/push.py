"""`nanovlm push`: publish a checkpoint directory to the Hugging Face Hub with a generated model card.

Thin layer over the library's hub module. `--dry-run DIR` writes exactly what would be uploaded (weights,
config, tokenizer, model card) into DIR and uploads nothing, so the card can be reviewed offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nanovlm_cli.cli.console import library_function, print_result
from nanovlm_cli.cli.options import CheckpointArg, JsonOpt


def push(
    checkpoint: CheckpointArg,
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="Hub repository, e.g. user/my-vlm.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (default: main).")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", "-m", help="Commit message.")] = None,
    dry_run: Annotated[Path | None, typer.Option(
        "--dry-run", metavar="DIR", help="Write the files that would be uploaded into DIR; upload nothing.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Upload CHECKPOINT to the Hub as REPO_ID, with a model card."""
    if dry_run is not None:
        prepare_upload_folder = library_function("nanovlm_cli.hub", "prepare_upload_folder", "push")
        folder = prepare_upload_folder(Path(checkpoint), dry_run, repo_id=repo_id)
        result = {"repo_id": repo_id, "dry_run": True, "folder": str(folder),
                  "files": sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())}
    else:
        push_checkpoint = library_function("nanovlm_cli.hub", "push_checkpoint", "push")
        url = push_checkpoint(checkpoint, repo_id, private=private, revision=revision, commit_message=commit_message)
        result = {"repo_id": repo_id, "url": url}
    print_result(result, as_json=json_output, title=f"push {repo_id}")
