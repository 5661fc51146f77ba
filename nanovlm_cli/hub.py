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
        f"| vision encoder | {vision} ({cfg.vision.n_layers} layers, {cfg.vision.hidden_dim} wide, "
        f"patch {cfg.vision.patch_size}) |",
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


def prepare_upload_folder(checkpoint: Path, target: Path, *, repo_id: str) -> Path:
    """Copy the inference files of `checkpoint` into `target` with a model card naming `repo_id`."""
    from nanovlm_cli.checkpoint.io import read_model_config

    cfg = read_model_config(checkpoint)
    target.mkdir(parents=True, exist_ok=True)
    skip = {"training_state.pt", "README.md"}
    for item in sorted(checkpoint.iterdir()):
        if item.is_file() and item.name not in skip and not item.name.startswith("."):
            shutil.copy2(item, target / item.name)
    summary = _read_optional_json(checkpoint / "training_summary.json")
    results = _read_optional_json(checkpoint / "eval_results.json")
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    (target / "README.md").write_text(model_card(cfg, n_params=n_params, summary=summary, eval_results=results,
                                                 repo_id=repo_id))
    return target


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def push_checkpoint(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a checkpoint directory as one commit; returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    checkpoint = Path(checkpoint)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"repo id {repo_id!r} is not of the form user/name; pass e.g. myname/my-vlm")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = prepare_upload_folder(checkpoint, Path(tmp) / "upload", repo_id=repo_id)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                     commit_message=commit_message or f"Upload nanovlm checkpoint {checkpoint.name}")
    except HubError:
        raise
    except Exception as exc:  # network, auth, permission
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HubError(f"upload to {repo_id} failed ({type(exc).__name__}: {message}); "
                       "check `huggingface-cli login` / HF_TOKEN and the repo permissions") from exc
    url = getattr(info, "commit_url", None) or str(info)
    log.info("pushed %s to %s", checkpoint, repo_id)
    return url
