"""Resolve what a training run uses: preset -> backbone swaps -> config file -> flag overrides -> validated configs.

Each layer only names what it changes, and later layers win: a preset gives complete model and training configs,
`--vision-encoder` / `--dinov3-model` / `--language-model` swap a backbone, a `.toml`/`.json` file sets fields
(top-level `TrainConfig` fields plus an optional `model` table of `VLMConfig` fields, merged key by key into the
preset's), and command-line flags set single training fields. The result is built through the dataclasses, so an
impossible value fails here, before any weight is loaded, with a message naming the field. No torch import, no
mutation of the preset: `nanovlm train --dry-run` prints exactly what a run would use.

A resumed run (`resolve_resume_config`) starts instead from the run's own saved configs (`run_config.json`), so
`nanovlm train --resume DIR` alone continues the run as it was; the config file and flags given still override
single training fields, and the log names each change.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from nanovlm_cli.config import TrainConfig, VLMConfig, check_field_types, load_json_config
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.field_types import field_types
from nanovlm_cli.presets import get_preset, with_backbones

TRAIN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig))
BACKBONE_KEYS: tuple[str, ...] = ("vision_encoder", "dinov3_model", "language_model")
log = logging.getLogger(__name__)

# Optional text fields where the string "None" (as the original repository's scripts pass it) means "unset".
NULLABLE_TEXT_FIELDS: frozenset[str] = frozenset(
    name for name, tp in field_types(TrainConfig).items() if tp == str | None
)


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `changes` applied to `base`, recursing into nested tables (sub-configs)."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _split_config_file(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Read a config file into (train fields, model fields, backbone selectors); unknown keys raise."""
    data = load_json_config(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object of fields, got {type(data).__name__}")
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"config file {path}: 'model' must be a table of VLMConfig fields, got {model!r}")
    train = {k: v for k, v in data.items() if k in TRAIN_FIELDS}
    backbones = {k: v for k, v in data.items() if k in BACKBONE_KEYS}
    unknown = sorted(set(data) - set(TRAIN_FIELDS) - set(BACKBONE_KEYS) - {"model"})
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown field(s) {', '.join(unknown)}; use training fields "
            f"({', '.join(TRAIN_FIELDS)}), {', '.join(BACKBONE_KEYS)}, or a 'model' table of model fields"
        )
    check_field_types(TrainConfig, train, source=f"config file {path}")  # "false" is not False, 4.7 not a size
    check_field_types(VLMConfig, model, prefix="model.", source=f"config file {path}")
    return train, model, backbones


def _build_model(data: dict[str, Any], explicit_extra_vocab: bool) -> VLMConfig:
    """Build a VLMConfig; size the extra vocabulary to the extra tokens unless the file set it explicitly."""
    if explicit_extra_vocab:
        return VLMConfig.from_dict(data)
    # Draft with room for any number of extra tokens, then size exactly (as the presets do).
    language = dict(data["language"], extra_vocab_size=10_000)
    draft = VLMConfig.from_dict({**data, "language": language})
    language["extra_vocab_size"] = len(draft.extra_tokens)
    return VLMConfig.from_dict({**data, "language": language})


def _clean_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Drop unset (None) values; map the text "None" to an explicit None for optional text fields."""
    unknown = sorted(set(overrides) - set(TRAIN_FIELDS))
    if unknown:
        raise ConfigError(f"unknown training field(s) {', '.join(unknown)}; known fields are {', '.join(TRAIN_FIELDS)}")
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in NULLABLE_TEXT_FIELDS and isinstance(value, str) and value.strip() in ("None", "none", ""):
            value = None
        out[key] = value
    return out


def resolve_run_config(
    preset: str,
    *,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    vision_encoder: str | None = None,
    dinov3_model: str | None = None,
    language_model: str | None = None,
) -> tuple[VLMConfig, TrainConfig]:
    """The validated (model, train) configs of a run: preset, then backbones, then file, then flag overrides.

    `overrides` maps `TrainConfig` field names to values; None values are "not given" and skipped. Backbone
    selectors may also come from the config file (flags win). Raises `ConfigError` naming the bad field.
    """
    chosen = get_preset(preset)
    file_train: dict[str, Any] = {}
    file_model: dict[str, Any] = {}
    file_backbones: dict[str, Any] = {}
    if config_file is not None:
        file_train, file_model, file_backbones = _split_config_file(str(config_file))
    selectors = {
        "vision_encoder": vision_encoder or (None if dinov3_model else file_backbones.get("vision_encoder")),
        "dinov3_model": dinov3_model or file_backbones.get("dinov3_model"),
        "language_model": language_model or file_backbones.get("language_model"),
    }
    model = with_backbones(chosen.model, **selectors)
    if file_model:
        explicit = "extra_vocab_size" in file_model.get("language", {})
        model = _build_model(_deep_merge(model.to_dict(), file_model), explicit)
    train_data = {**chosen.train.to_dict(), **file_train, **_clean_overrides(overrides or {})}
    train = TrainConfig.from_dict(train_data)
    return model, train


# ------------------------------------------------------------------------------------------------ resume

RUN_CONFIG_FILE = "run_config.json"  # written by the training loop into every run directory
TRAINING_STATE_FILE = "training_state.pt"  # the training loop's checkpoint state (see training.state)


def runs_in(directory: Path) -> list[Path]:
    """Run directories directly inside `directory` (each holds a run_config.json), oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if (p / RUN_CONFIG_FILE).is_file()),
                  key=lambda p: (p.stat().st_mtime, p.name))


def find_run_dir(resume: str | Path) -> Path:
    """The run directory `--resume PATH` points into: PATH itself, or the run above a checkpoint inside it.

    An output directory that holds runs (or anything else) raises `ConfigError` naming the runs found there.
    """
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such directory; pass a run directory of `nanovlm train` "
                          "(OUTPUT_DIR/RUN_NAME) or one of its checkpoints")
    if (path / TRAINING_STATE_FILE).is_file():  # a checkpoint: <run>/checkpoints/step-N or <run>/final
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        if (run_dir / RUN_CONFIG_FILE).is_file():
            return run_dir
    if (path / RUN_CONFIG_FILE).is_file():
        return path
    runs = runs_in(path)
    if runs:
        names = ", ".join(p.name for p in runs[-5:]) + (f" and {len(runs) - 5} older" if len(runs) > 5 else "")
        raise ConfigError(f"--resume {resume} is an output directory holding {len(runs)} run(s) ({names}), not a "
                          f"run; pass one of them, e.g. --resume {runs[-1]}")
    raise ConfigError(f"--resume {resume} holds no {RUN_CONFIG_FILE}: it is not a run directory of `nanovlm train` "
                      "nor a checkpoint inside one; pass OUTPUT_DIR/RUN_NAME")


def resolve_resume_config(
    resume: str | Path,
    *,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[VLMConfig, TrainConfig]:
    """The (model, train) configs to resume `resume` with: the run's own saved configs, then the config file's
    training fields, then the flags given (`overrides`, None = not given). Each field changed from the saved value
    is logged. The model is the checkpoint's: a config file with a model table or backbone fields raises."""
    run_dir = find_run_dir(resume)
    saved = load_json_config(str(run_dir / RUN_CONFIG_FILE))
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) or "model" not in saved:
        raise ConfigError(f"{run_dir / RUN_CONFIG_FILE} has no 'model' and 'train' tables; it was not written by "
                          "`nanovlm train`: start a fresh run")
    changes: dict[str, Any] = {}
    if config_file is not None:
        file_train, file_model, file_backbones = _split_config_file(str(config_file))
        if file_model or file_backbones:
            named = ", ".join([*file_backbones, *file_model])
            raise ConfigError(f"config file {config_file} changes the model ({named}), but a resumed run keeps its "
                              "checkpoint's model; drop those fields or start a fresh run")
        changes.update(file_train)
    changes.update(_clean_overrides(overrides or {}))
    changes["resume"] = str(resume)
    train = TrainConfig.from_dict({**saved["train"], **changes})
    model = VLMConfig.from_dict(saved["model"])
    changed = {k: (saved["train"].get(k), v) for k, v in train.to_dict().items()
               if k in changes and k != "resume" and saved["train"].get(k) != v}
    if changed:
        log.info("resuming %s with its saved training config, except (from the command line%s): %s", run_dir,
                 " and the config file" if config_file else "",
                 ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    else:
        log.info("resuming %s with its saved training config", run_dir)
    return model, train
