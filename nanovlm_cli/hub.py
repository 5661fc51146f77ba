"""Publishing: the model card generated from a checkpoint's real config and results, and the Hub upload.

The card is built from what the checkpoint actually contains (backbones, parameter count, image processing,
training summary, evaluation results), never from a hard-coded template. Uploading is `create_repo` + one commit of
the folder through huggingface_hub, with the token from the usual places (HF_TOKEN, the login cache); it is never
printed or logged.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanovlm_cli import __version__
from nanovlm_cli.config import VLMConfig
from nanovlm_cli.errors import HubError

log = logging.getLogger(__name__)


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n  - {item}" for item in items)


def model_card(
    cfg: VLMConfig,
    *,
    n_params: int,
    summary: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """A README.md with Hub metadata for a checkpoint of `cfg`."""
    base_models = [m for m in (cfg.vision.hub_id, cfg.language.hub_id) if m]
    datasets = [summary["dataset"]] if summary and summary.get("dataset") and "/" in str(summary["dataset"]) else []
    meta = ["---", "library_name: nanovlm", "pipeline_tag: image-text-to-text", "license: apache-2.0",
            "tags:" + _yaml_list(["vision-language", "multimodal", "nanovlm"])]
    if base_models:
        meta.append("base_model:" + _yaml_list(base_models))
    if datasets:
        meta.append("datasets:" + _yaml_list(datasets))
    meta.append("---")
    name = repo_id or "nanovlm model"
    vision = cfg.vision.hub_id or f"{cfg.vision.kind} ViT trained from scratch"
    language = cfg.language.hub_id or "decoder trained from scratch"
    lines = [
        "\n".join(meta), "", f"# {name}", "",
        f"A vision-language model trained with [nanovlm](https://pypi.org/project/nanovlm-cli/) {__version__}.", "",
        "| part | value |", "| --- | --- |",
        (f"| vision encoder | {vision} ({cfg.vision.n_layers} layers, {cfg.vision.hidden_dim} wide, "
         f"patch {cfg.vision.patch_size}) |"),
        f"| projector | pixel shuffle x{cfg.projector.pixel_shuffle_factor} + linear |",
        f"| language model | {language} ({cfg.language.n_layers} layers, {cfg.language.hidden_dim} wide) |",
        f"| parameters | {n_params:,} |",
        f"| image processing | {cfg.image.mode}, {cfg.image.tile_size}px tiles, max side {cfg.image.max_side} |",
        f"| chat template | {cfg.chat_template} |",
    ]
    if summary:
        lines += ["", "## Training", "", "| metric | value |", "| --- | --- |"]
        for key in ("dataset", "steps", "samples_seen", "final_loss", "best_val_loss", "wall_time_s"):
            if key in summary and summary[key] is not None:
                value = summary[key]
                lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        if summary.get("skipped"):
            lines.append(f"| skipped samples | {json.dumps(summary['skipped'], sort_keys=True)} |")
    if eval_results:
        lines += ["", "## Evaluation", "", "| benchmark | accuracy |", "| --- | --- |",
                  f"| {eval_results.get('benchmark', '?')} | {eval_results.get('accuracy', float('nan')):.4f} |"]
        for category, accuracy in sorted((eval_results.get("by_category") or {}).items()):
            lines.append(f"| {eval_results.get('benchmark', '?')} / {category} | {accuracy:.4f} |")
    lines += [
        "", "## Usage", "", "```bash", "pip install nanovlm-cli",
        f'nanovlm generate image.png "What is in this image?" --checkpoint {repo_id or "<this repo>"}', "```", "",
        "```python", "from nanovlm_cli import VisionLanguageModel", "",
        f'model = VisionLanguageModel.from_pretrained("{repo_id or "<this repo>"}")', "```", "",
    ]
    return "\n".join(lines)


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
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"repo id {repo_id!r} is not of the form user/name; pass e.g. myname/my-vlm")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"repo id {repo_id!r} is not valid ({str(exc).splitlines()[0]}); use letters, digits, "
                       "'-', '_' and '.' as in myname/my-vlm") from exc


def prepare_upload_folder(checkpoint: Path, target: Path, *, repo_id: str) -> Path:
    """Copy the inference files of `checkpoint` into `target` with a model card naming `repo_id`.

    The card is generated from the checkpoint's own config, `training_summary.json` and `eval_results.json`.
    """
    from nanovlm_cli.checkpoint.files import weight_files
    from nanovlm_cli.checkpoint.io import read_model_config

    checkpoint = Path(checkpoint)
    cfg = read_model_config(checkpoint)
    weights = weight_files(checkpoint)
    target.mkdir(parents=True, exist_ok=True)
    for item in sorted(checkpoint.iterdir()):
        if item.is_file() and item.name not in _NOT_UPLOADED and not item.name.startswith("."):
            shutil.copy2(item, target / item.name)
    summary = _read_optional_json(checkpoint / "training_summary.json")
    results = _read_optional_json(checkpoint / "eval_results.json")
    from safetensors import safe_open

    n_params = 0
    for file in weights:
        with safe_open(str(file), framework="pt") as f:
            n_params += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safe_open handle, not a dict)
    (target / "README.md").write_text(model_card(cfg, n_params=n_params, summary=summary, eval_results=results,
                                                 repo_id=repo_id))
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


def push_checkpoint(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run_dir: str | Path | None = None,
) -> PushResult:
    """Upload a checkpoint directory as one commit (create_repo + upload_folder).

    With `dry_run_dir`, write exactly the folder that would be uploaded there instead and touch no network.
    The token comes from HF_TOKEN or the login cache and is never printed or logged.
    """
    import tempfile

    checkpoint = Path(checkpoint)
    check_repo_id(repo_id)
    if not (checkpoint / "config.json").is_file():
        raise HubError(f"{checkpoint} is not a checkpoint directory (no config.json); pass the directory "
                       "`nanovlm train` saved")
    if dry_run_dir is not None:
        target = Path(dry_run_dir)
        if target.exists() and any(target.iterdir()):
            raise HubError(f"dry-run directory {target} is not empty; pass a new or empty directory")
        prepare_upload_folder(checkpoint, target, repo_id=repo_id)
        return PushResult(repo_id, _listing(target), True, folder=str(target), private=private, revision=revision)

    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise HubError("no Hugging Face token found; run `hf auth login` or set HF_TOKEN (a token with write access)")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            folder = prepare_upload_folder(checkpoint, Path(tmp) / "upload", repo_id=repo_id)
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
