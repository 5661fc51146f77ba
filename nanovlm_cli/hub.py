"""Publishing: a checkpoint's inference files and its model card (`checkpoint/card.py`), uploaded to the Hub.

A checkpoint is validated (`nanovlm validate`'s checks, without generation) before anything is written or uploaded;
the card is generated again with the repo id, the checkpoint's evaluation results and the license. Uploading is
`create_repo` + one commit of the folder through huggingface_hub, with the token from the usual places (HF_TOKEN,
the login cache); it is never printed or logged.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open

from nanovlm_cli.checkpoint.card import model_card
from nanovlm_cli.checkpoint.export import check_exportable, export_transformers
from nanovlm_cli.checkpoint.files import new_or_empty_dir, read_json, weight_files
from nanovlm_cli.checkpoint.io import CONFIG_FILE, WEIGHTS_FILE, load_model, read_model_config, save_model
from nanovlm_cli.errors import HubError
from nanovlm_cli.models.lora import merge_lora
from nanovlm_cli.validation import validate_checkpoint

log = logging.getLogger(__name__)

PUSH_FORMATS = ("nanovlm", "transformers")  # the checkpoint as saved, or `nanovlm export`'s directory
# Files that never go to the Hub: training state for resume (large, and restores optimizer state).
_NOT_UPLOADED = {"training_state.pt", "README.md"}


@dataclass
class UploadFile:
    name: str
    size: int  # bytes


@dataclass
class PushResult:
    """What `push_checkpoint` did: the files of the upload folder, and the commit URL unless it was a dry run."""

    repo_id: str
    files: list[UploadFile]
    dry_run: bool
    folder: str | None = None  # the dry-run folder
    url: str | None = None  # the commit URL of a real push
    private: bool = False
    revision: str | None = None

    def __str__(self) -> str:  # `VisionLanguageModel.push_to_hub` returns this; its text is the commit URL
        return self.url or self.folder or self.repo_id

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        out = {"repo_id": self.repo_id, "dry_run": self.dry_run, "private": self.private, "revision": self.revision,
               "files": [{"name": f.name, "size": f.size} for f in self.files], "total_bytes": self.total_bytes}
        if self.folder is not None:
            out["folder"] = self.folder
        if self.url is not None:
            out["url"] = self.url
        return out


def check_repo_id(repo_id: str) -> None:
    """Raise HubError unless `repo_id` is a valid `namespace/name` model repository id."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"repo id {repo_id!r} is not of the form user/name; pass e.g. myname/my-vlm")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"repo id {repo_id!r} is not valid ({str(exc).splitlines()[0]}); use letters, digits, "
                       "'-', '_' and '.' as in myname/my-vlm") from exc


def _write_merged(checkpoint: Path, target: Path) -> None:
    """A LoRA checkpoint's adapters folded into its layers (`merge_lora`): target's config.json and weights become
    the merged model's, which loads with no adapters."""
    loaded = load_model(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        merged = save_model(merge_lora(loaded.model), Path(tmp) / "merged")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(merged / name, target / name)


def prepare_upload_folder(checkpoint: Path, target: Path, *, repo_id: str, license: str | None = None,
                          keep_adapters: bool = False) -> Path:
    """Copy the inference files of `checkpoint` into `target` with a model card naming `repo_id`.

    The card is generated from the checkpoint's own config, `training_summary.json` and `eval_results.json`.
    A LoRA checkpoint's adapters are merged into the uploaded weights unless `keep_adapters`.
    """
    checkpoint = Path(checkpoint)
    cfg = read_model_config(checkpoint)
    weights = weight_files(checkpoint)
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(checkpoint.iterdir()):
        if item.is_file() and item.name not in _NOT_UPLOADED and not item.name.startswith("."):
            shutil.copy2(item, target / item.name)
    if not keep_adapters and read_json(checkpoint / CONFIG_FILE).get("lora") is not None:
        _write_merged(checkpoint, target)
        weights = weight_files(target)
    summary = _read_optional_json(checkpoint / "training_summary.json")
    results = _read_optional_json(checkpoint / "eval_results.json")
    n_params = 0
    for file in weights:
        with safe_open(str(file), framework="pt") as f:
            n_params += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safe_open handle, not a dict)
    (target / "README.md").write_text(model_card(cfg, n_params=n_params, summary=summary, eval_results=results,
                                                 repo_id=repo_id, license=license))
    return target


def prepare_transformers_folder(checkpoint: Path, target: Path, *, repo_id: str, license: str | None = None) -> Path:
    """`nanovlm export`'s transformers directory of `checkpoint` in `target`, its model card naming `repo_id`."""
    checkpoint = Path(checkpoint)
    export_transformers(checkpoint, target)
    n_params = 0
    for file in weight_files(target):
        with safe_open(str(file), framework="pt") as f:
            n_params += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safe_open handle, not a dict)
    card = model_card(read_model_config(checkpoint), n_params=n_params,
                      summary=_read_optional_json(checkpoint / "training_summary.json"),
                      eval_results=_read_optional_json(checkpoint / "eval_results.json"), repo_id=repo_id,
                      license=license, library="transformers")
    (target / "README.md").write_text(card)
    return target


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; the model card leaves it out", path)
        return None


def _listing(folder: Path) -> list[UploadFile]:
    return [UploadFile(str(p.relative_to(folder)), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


def check_checkpoint(checkpoint: Path) -> None:
    """Raise HubError unless `checkpoint` passes `nanovlm validate --no-generate` (files, config, tokenizer,
    tensor names and shapes, finite values, tied weights, image processing): a broken checkpoint is never published."""
    report = validate_checkpoint(str(checkpoint), generate=False, device="cpu")
    problems = [f"{c.name}: {c.detail}" for c in report.problems if not c.skipped]
    if problems:
        raise HubError(f"{checkpoint} fails validation, nothing was uploaded ({'; '.join(problems)}); fix the "
                       f"checkpoint or push an earlier one (details: nanovlm validate {checkpoint} --no-generate)")


def push_checkpoint(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run_dir: str | Path | None = None,
    license: str | None = None,
    format: str = "nanovlm",
    keep_adapters: bool = False,
) -> PushResult:
    """Validate a checkpoint directory, then upload it as one commit (create_repo + upload_folder).

    The checks are `nanovlm validate`'s without the generation smoke test (`check_checkpoint`); a checkpoint that
    fails any of them is refused before anything is written or sent. With `dry_run_dir`, write exactly the folder
    that would be uploaded there instead and touch no network. `license` overrides the license derived from the
    base models. `format` "transformers" uploads `nanovlm export`'s directory instead of the checkpoint's own files
    (refused before anything is written or sent when the model has no exact transformers form). A LoRA checkpoint
    is uploaded with its adapters merged (W + (alpha/r)·B@A) unless `keep_adapters`. The token comes
    from HF_TOKEN or the login cache and is never printed or logged.
    """
    checkpoint = Path(checkpoint)
    check_repo_id(repo_id)
    if format not in PUSH_FORMATS:
        raise HubError(f"push format {format!r} is not one of {', '.join(PUSH_FORMATS)}")
    prepare = prepare_transformers_folder if format == "transformers" else \
        functools.partial(prepare_upload_folder, keep_adapters=keep_adapters)
    if not (checkpoint / "config.json").is_file():
        raise HubError(f"{checkpoint} is not a checkpoint directory (no config.json); pass the directory "
                       "`nanovlm train` saved")
    target = new_or_empty_dir(dry_run_dir, "dry-run directory", HubError) if dry_run_dir is not None else None
    check_checkpoint(checkpoint)
    if format == "transformers":
        check_exportable(read_model_config(checkpoint))
    if target is not None:
        try:
            prepare(checkpoint, target, repo_id=repo_id, license=license)
        except OSError as exc:
            raise HubError(f"cannot write the dry-run folder {target} ({type(exc).__name__}: {exc.strerror or exc}); "
                           "pass a writable directory") from exc
        return PushResult(repo_id, _listing(target), True, folder=str(target), private=private, revision=revision)

    if not get_token():
        raise HubError("no Hugging Face token found; run `hf auth login` or set HF_TOKEN (a token with write access)")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            folder = prepare(checkpoint, Path(tmp) / "upload", repo_id=repo_id, license=license)
            files = _listing(folder)
            log.info("uploading %d files (%.1f MB) to %s", len(files), sum(f.size for f in files) / 1e6, repo_id)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                     commit_message=commit_message or f"Upload nanovlm checkpoint {checkpoint.name}")
    except Exception as exc:  # network, auth, permission (huggingface_hub raises many types)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HubError(f"upload to {repo_id} failed ({type(exc).__name__}: {message}); "
                       "check `hf auth login` / HF_TOKEN and the repo permissions") from exc
    url = getattr(info, "commit_url", None) or str(info)
    log.info("pushed %s to %s", checkpoint, repo_id)
    return PushResult(repo_id, files, False, url=url, private=private, revision=revision)
