"""The model card: a checkpoint's README.md, generated from its real config, training summary and results.

Main design choice: every statement is taken from what the checkpoint contains (backbones and their licenses,
parameter count, image processing, training summary, every evaluation protocol it recorded), never from a
hard-coded template. Saving (`checkpoint/io.py`) writes it beside the weights; publishing (`hub.py`) writes it
again with the repo id, the evaluation results and the chosen license.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nanovlm_cli import __version__
from nanovlm_cli.config import VLMConfig
from nanovlm_cli.data.shapes import QUESTIONS


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


def _metadata(lic: CardLicense, base_models: list[str], dataset: str | None, library: str) -> str:
    """The card's YAML front matter (what the Hub reads)."""
    meta = ["---", f"library_name: {library}", "pipeline_tag: image-text-to-text", f"license: {lic.license}"]
    if lic.name:
        meta.append(f"license_name: {lic.name}")
    meta.append("tags:" + _yaml_list(["vision-language", "multimodal", "nanovlm"]))
    if base_models:
        meta.append("base_model:" + _yaml_list(base_models))
    if dataset and "/" in dataset:
        meta.append("datasets:" + _yaml_list([dataset]))
    meta.append("---")
    return "\n".join(meta)


def _model_lines(cfg: VLMConfig, n_params: int) -> list[str]:
    vision = cfg.vision.hub_id or f"{cfg.vision.kind} ViT trained from scratch"
    language = cfg.language.hub_id or "decoder trained from scratch"
    return [
        "| part | value |", "| --- | --- |",
        (f"| vision encoder | {vision} ({cfg.vision.n_layers} layers, {cfg.vision.hidden_dim} wide, "
         f"patch {cfg.vision.patch_size}) |"),
        f"| projector | pixel shuffle x{cfg.projector.pixel_shuffle_factor} + linear |",
        f"| language model | {language} ({cfg.language.n_layers} layers, {cfg.language.hidden_dim} wide) |",
        f"| parameters | {n_params:,} |",
        f"| image processing | {cfg.image.mode}, {cfg.image.tile_size}px tiles, max side {cfg.image.max_side} |",
        f"| chat template | {cfg.chat_template} |",
    ]


def _training_lines(summary: dict[str, Any] | None) -> list[str]:
    if not summary:
        return []
    lines = ["", "## Training", "", "| metric | value |", "| --- | --- |"]
    for key in ("dataset", "steps", "samples_seen", "final_loss", "final_val_loss", "best_val_loss"):
        value = summary.get(key)
        if value is not None:
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if isinstance(summary.get("wall_time_s"), (int, float)):
        lines.append(f"| wall time | {_duration(summary['wall_time_s'])} |")
    if summary.get("skipped"):
        lines.append(f"| skipped samples | {json.dumps(summary['skipped'], sort_keys=True)} |")
    return lines


def _use_and_limits_lines(n_params: int, summary: dict[str, Any] | None, dataset: str | None,
                          evaluated: bool) -> list[str]:
    """The "Intended use" and "Limitations" sections: what the training data makes the model good for."""
    shapes = dataset == "shapes"
    lines = ["", "## Intended use", ""]
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
                  if evaluated else "No evaluation result is recorded, so its accuracy is unknown.")
    if shapes:
        limits.append("Outside the shapes domain (real images, text in images, open conversation) its answers are "
                      "meaningless.")
    return lines + [f"- {text}" for text in limits]


def _nanovlm_usage(where: str, image: str, question: str, image_step: list[str]) -> list[str]:
    """The usage section of a nanovlm checkpoint: the command line and the Python API."""
    return [
        "", "## Usage", "", "```bash", "pip install nanovlm-cli", *image_step,
        f'nanovlm generate {image} "{question}" --checkpoint {where}', "```", "",
        "```python", "from nanovlm_cli import VisionLanguageModel", "",
        f'model = VisionLanguageModel.from_pretrained("{where}")',
        f'print(model.generate("{image}", "{question}", greedy=True))', "```", "",
    ]


def model_card(
    cfg: VLMConfig,
    *,
    n_params: int,
    summary: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    library: str = "nanovlm",
) -> str:
    """A README.md with Hub metadata for a checkpoint of `cfg`, every statement taken from the checkpoint's data.

    `license` overrides the license derived from the base models (`card_license`). `library` "transformers" is the
    card of an exported directory (`checkpoint/export.py`): its metadata and usage name transformers.
    """
    base_models = [m for m in (cfg.vision.hub_id, cfg.language.hub_id) if m]
    dataset = str(summary["dataset"]) if summary and summary.get("dataset") else None
    lic = card_license(base_models, license)
    lines = [
        _metadata(lic, base_models, dataset, library), "", f"# {repo_id or 'nanovlm model'}", "",
        f"A vision-language model trained with [nanovlm](https://pypi.org/project/nanovlm-cli/) {__version__}.", "",
        *_model_lines(cfg, n_params), *_training_lines(summary),
    ]
    entries = eval_entries(eval_results, (summary or {}).get("eval"))
    lines += _evaluation_lines(entries, bool(eval_results or (summary or {}).get("eval")))
    lines += _use_and_limits_lines(n_params, summary, dataset, bool(entries))
    lines += ["", "## License", "", lic.explanation]
    where = repo_id or "<this repo>"
    if dataset == "shapes":
        question = _shapes_question(entries)
        image_step = ['python -c "from nanovlm_cli.data.shapes import render_example; render_example(\'shape.png\')"']
        image = "shape.png"
    else:
        question, image_step, image = "What is in this image?", [], "photo.jpg"
    usage = _transformers_usage if library == "transformers" else _nanovlm_usage
    return "\n".join(lines + usage(where, image, question, image_step))


def _transformers_usage(where: str, image: str, question: str, image_step: list[str]) -> list[str]:
    """The usage section of an exported (transformers) directory."""
    setup = ["", "```bash", "pip install nanovlm-cli  # only to draw the example image", *image_step, "```"]
    return [
        "", "## Usage", "", ("This directory is in the transformers Idefics3 format (`nanovlm export`); plain "
                             "transformers runs it, nanovlm is not needed."), *(setup if image_step else []), "",
        "```python", "from transformers import pipeline", "",
        f'pipe = pipeline("image-text-to-text", model="{where}")',
        (f'messages = [{{"role": "user", "content": [{{"type": "image", "url": "{image}"}}, '
         f'{{"type": "text", "text": "{question}"}}]}}]'),
        'print(pipe(text=messages, max_new_tokens=32, return_full_text=False)[0]["generated_text"])', "```", "",
    ]
