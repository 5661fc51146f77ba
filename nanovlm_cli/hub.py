"""Publishing: the model card generated from a checkpoint's real config and results, and the Hub upload.

The card is built from what the checkpoint actually contains (backbones and their licenses, parameter count, image
processing, training summary, every evaluation protocol it recorded), never from a hard-coded template. A checkpoint
is validated (`nanovlm validate`'s checks, without generation) before anything is written or uploaded. Uploading is `create_repo` + one commit of
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


# Licenses of the backbones the presets use, by Hub id prefix (checked against their model cards; no network at
# push time). A base model that is not listed here makes the card's license "other", with the reason in the text.
BASE_MODEL_LICENSES: dict[str, str] = {
    "google/siglip-": "apache-2.0",
    "google/siglip2-": "apache-2.0",
    "facebook/dinov2-": "apache-2.0",
    "facebook/dinov3-": "dinov3-license",  # Meta's DINOv3 License (Hub: license: other)
    "HuggingFaceTB/SmolLM2-": "apache-2.0",
    "google/gemma-3-": "gemma",  # the Gemma Terms of Use
}
# Licenses the Hub knows by id; anything else is written as `license: other` + `license_name`.
_HUB_LICENSE_IDS = {"apache-2.0", "mit", "gemma"}


def base_model_license(hub_id: str) -> str | None:
    """The license of a known base model (e.g. "apache-2.0"), or None when nanovlm does not know it."""
    return next((lic for prefix, lic in BASE_MODEL_LICENSES.items() if hub_id.startswith(prefix)), None)


@dataclass(frozen=True)
class CardLicense:
    """The card's `license:` value, an optional `license_name:`, and one sentence saying where it comes from."""

    license: str
    name: str | None
    explanation: str


def card_license(base_models: list[str], chosen: str | None = None) -> CardLicense:
    """The license a model derived from `base_models` carries: theirs when they agree, else "other" and why."""
    if chosen:
        return CardLicense(chosen if chosen in _HUB_LICENSE_IDS else "other", None if chosen in _HUB_LICENSE_IDS
                           else chosen, f"{chosen}, as chosen by the author (`nanovlm push --license`).")
    if not base_models:
        return CardLicense("other", "unknown", "Not set: every part was trained from scratch, so no base model "
                           "license applies; the author should choose one (`nanovlm push --license ...`).")
    found = {m: base_model_license(m) for m in base_models}
    listed = ", ".join(f"{m} ({lic or 'license unknown to nanovlm'})" for m, lic in found.items())
    unknown = [m for m, lic in found.items() if lic is None]
    licenses = sorted({lic for lic in found.values() if lic})
    if unknown:
        return CardLicense("other", "unknown", f"Unknown: check the licenses of the base models before use: {listed}.")
    if len(licenses) == 1:
        lic = licenses[0]
        hub_id = lic if lic in _HUB_LICENSE_IDS else "other"
        return CardLicense(hub_id, None if hub_id == lic else lic, f"{lic}, from the base models: {listed}.")
    return CardLicense("other", "multiple", f"The terms of every base model apply: {listed}.")


@dataclass(frozen=True)
class EvalEntry:
    """One scored protocol of one benchmark, as the card shows it."""

    benchmark: str
    protocol: str  # "open answers", "option likelihood" or "letter"
    n: int | None
    accuracy: float
    by_category: dict[str, float]
    unanswered: int | None = None


PROTOCOLS = {
    "open answers": "a short free-form reply, exact match with the answer",
    "option likelihood": "the option text the model finds most likely (no generation)",
    "letter": "a greedy reply that must name the option's letter (a reply naming none counts wrong)",
}


def _protocol(result: dict[str, Any]) -> str:
    if str(result.get("benchmark", "")).endswith("-open"):
        return "open answers"
    return "option likelihood" if result.get("scoring") == "rank" else "letter"


def eval_entries(*sources: dict[str, Any] | None) -> list[EvalEntry]:
    """Every scored protocol in `sources` (eval_results.json, the training summary's "eval"), nested ones included.

    Training saves the letter-scored shapes result with the same questions rank-scored under "rank" and the
    open-answer result under "open"; `nanovlm eval` writes one protocol per file. Duplicates are kept once.
    """
    entries: dict[tuple[str, str], EvalEntry] = {}

    def visit(result: dict[str, Any]) -> None:
        if isinstance(result.get("accuracy"), (int, float)) and result.get("benchmark"):
            entry = EvalEntry(
                str(result["benchmark"]), _protocol(result), result.get("n"), float(result["accuracy"]),
                {str(k): float(v) for k, v in (result.get("by_category") or {}).items() if isinstance(v, (int, float))},
                result.get("unanswered") if _protocol(result) == "letter" else None)
            entries.setdefault((entry.benchmark, entry.protocol), entry)
        for key, value in result.items():
            if isinstance(value, dict) and key not in ("by_category", "n_by_category", "comparison"):
                visit(value)

    for source in sources:
        if isinstance(source, dict):
            visit(source)
    return list(entries.values())


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _shapes_question(entries: list[EvalEntry]) -> str:
    """The shapes question the model answers best in open form (colour when nothing was measured)."""
    from nanovlm_cli.data.shapes import QUESTIONS

    scores = next((e.by_category for e in entries if e.protocol == "open answers" and e.by_category), {})
    best = max((c for c in scores if c in QUESTIONS), key=lambda c: scores[c], default="colour")
    return QUESTIONS[best][0]


def _evaluation_lines(entries: list[EvalEntry], have_results: bool) -> list[str]:
    if not entries:
        return (["", "## Evaluation", "", ("The checkpoint's eval_results.json holds no accuracy this card can read; "
                 "see that file.")] if have_results else
                ["", "## Evaluation", "", ("Not evaluated: the checkpoint holds no eval_results.json. Score it with "
                 "`nanovlm eval CHECKPOINT --benchmark ...` before relying on it.")])
    lines = ["", "## Evaluation", "", "| benchmark | protocol | samples | accuracy | by category |",
             "| --- | --- | ---: | ---: | --- |"]
    for e in entries:
        categories = ", ".join(f"{c} {a:.3f}" for c, a in sorted(e.by_category.items())) or "-"
        lines.append(f"| {e.benchmark} | {e.protocol} | {e.n if e.n is not None else '?'} | {e.accuracy:.3f} | "
                     f"{categories} |")
    lines += ["", "Protocols:"]
    for name in dict.fromkeys(e.protocol for e in entries):
        lines.append(f"- **{name}**: {PROTOCOLS[name]}.")
    for e in entries:
        if e.unanswered:
            lines.append(f"- {e.benchmark} ({e.protocol}): {e.unanswered} of {e.n} replies named no option.")
    return lines


def model_card(
    cfg: VLMConfig,
    *,
    n_params: int,
    summary: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> str:
    """A README.md with Hub metadata for a checkpoint of `cfg`, every statement taken from the checkpoint's data.

    `license` overrides the license derived from the base models (`card_license`).
    """
    base_models = [m for m in (cfg.vision.hub_id, cfg.language.hub_id) if m]
    dataset = str(summary["dataset"]) if summary and summary.get("dataset") else None
    shapes = dataset == "shapes"
    lic = card_license(base_models, license)
    meta = ["---", "library_name: nanovlm", "pipeline_tag: image-text-to-text", f"license: {lic.license}"]
    if lic.name:
        meta.append(f"license_name: {lic.name}")
    meta.append("tags:" + _yaml_list(["vision-language", "multimodal", "nanovlm"]))
    if base_models:
        meta.append("base_model:" + _yaml_list(base_models))
    if dataset and "/" in dataset:
        meta.append("datasets:" + _yaml_list([dataset]))
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
        for key in ("dataset", "steps", "samples_seen", "final_loss", "final_val_loss", "best_val_loss"):
            value = summary.get(key)
            if value is not None:
                lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        if isinstance(summary.get("wall_time_s"), (int, float)):
            lines.append(f"| wall time | {_duration(summary['wall_time_s'])} |")
        if summary.get("skipped"):
            lines.append(f"| skipped samples | {json.dumps(summary['skipped'], sort_keys=True)} |")
    entries = eval_entries(eval_results, (summary or {}).get("eval"))
    lines += _evaluation_lines(entries, bool(eval_results or (summary or {}).get("eval")))
    lines += ["", "## Intended use", ""]
    if shapes:
        lines.append("A demonstration and test model: it was trained only on nanovlm's synthetic shapes dataset "
                     "(one or a few flat shapes on a plain background) and answers questions about their colour, "
                     "shape, count, position and size. Use it to check a training or serving setup, not on real "
                     "photographs.")
    else:
        lines.append("Research and experimentation with small vision-language models: short answers and "
                     "descriptions of single images, and a starting point for fine-tuning on a task of your own.")
    lines += ["", "## Limitations", ""]
    limits = [(f"A small model ({n_params:,} parameters): expect wrong and made-up answers, and check its output "
              "before relying on it.")]
    if summary and summary.get("steps") is not None:
        limits.append(f"Trained for {summary['steps']} steps{f' on {dataset}' if dataset else ''}; it knows only "
                      "what that data shows.")
    elif not summary:
        limits.append("The checkpoint records no training summary: what it was trained on is not known here.")
    limits.append("The scores above cover only the benchmarks and protocols listed; on anything else it is untested."
                  if entries else "No evaluation result is recorded, so its accuracy is unknown.")
    if shapes:
        limits.append("Outside the shapes domain (real images, text in images, open conversation) its answers are "
                      "meaningless.")
    lines += [f"- {text}" for text in limits]
    lines += ["", "## License", "", lic.explanation]
    where = repo_id or "<this repo>"
    if shapes:
        question = _shapes_question(entries)
        image_step = ['python -c "from nanovlm_cli.data.shapes import render_example; render_example(\'shape.png\')"']
        image = "shape.png"
    else:
        question, image_step, image = "What is in this image?", [], "photo.jpg"
    lines += [
        "", "## Usage", "", "```bash", "pip install nanovlm-cli", *image_step,
        f'nanovlm generate {image} "{question}" --checkpoint {where}', "```", "",
        "```python", "from nanovlm_cli import VisionLanguageModel", "",
        f'model = VisionLanguageModel.from_pretrained("{where}")',
        f'print(model.generate("{image}", "{question}", greedy=True))', "```", "",
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


def prepare_upload_folder(checkpoint: Path, target: Path, *, repo_id: str, license: str | None = None) -> Path:
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
                                                 repo_id=repo_id, license=license))
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
    from nanovlm_cli.validation import validate_checkpoint

    report = validate_checkpoint(str(checkpoint), generate=False, device="cpu")
    problems = [f"{c.name}: {c.detail}" for c in report.problems if not c.skipped]
    if problems:
        raise HubError(f"{checkpoint} fails validation, nothing was uploaded ({'; '.join(problems)}); fix the "
                       f"checkpoint or push an earlier one (details: nanovlm validate {checkpoint} --no-generate)")


def _dry_run_target(path: str | Path) -> Path:
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise HubError(f"dry-run target {target} is a file; pass a new or empty directory")
    if target.is_dir() and any(target.iterdir()):
        raise HubError(f"dry-run directory {target} is not empty; pass a new or empty directory")
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise HubError(f"dry-run directory {target} cannot be created: {blocker} is a file; pass another directory")
    return target


def push_checkpoint(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run_dir: str | Path | None = None,
    license: str | None = None,
) -> PushResult:
    """Validate a checkpoint directory, then upload it as one commit (create_repo + upload_folder).

    The checks are `nanovlm validate`'s without the generation smoke test (`check_checkpoint`); a checkpoint that
    fails any of them is refused before anything is written or sent. With `dry_run_dir`, write exactly the folder
    that would be uploaded there instead and touch no network. `license` overrides the license derived from the
    base models. The token comes from HF_TOKEN or the login cache and is never printed or logged.
    """
    import tempfile

    checkpoint = Path(checkpoint)
    check_repo_id(repo_id)
    if not (checkpoint / "config.json").is_file():
        raise HubError(f"{checkpoint} is not a checkpoint directory (no config.json); pass the directory "
                       "`nanovlm train` saved")
    target = _dry_run_target(dry_run_dir) if dry_run_dir is not None else None
    check_checkpoint(checkpoint)
    if target is not None:
        try:
            prepare_upload_folder(checkpoint, target, repo_id=repo_id, license=license)
        except OSError as exc:
            raise HubError(f"cannot write the dry-run folder {target} ({type(exc).__name__}: {exc.strerror or exc}); "
                           "pass a writable directory") from exc
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
            folder = prepare_upload_folder(checkpoint, Path(tmp) / "upload", repo_id=repo_id, license=license)
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
