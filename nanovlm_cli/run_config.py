"""Resolve what a training run uses: preset -> backbone swaps -> config file -> flag overrides -> validated configs.

Each layer only names what it changes, and later layers win: a preset gives complete model and training configs,
`--vision-encoder` / `--dinov3-model` / `--language-model` swap a backbone, a `.toml`/`.json` file sets fields
(top-level `TrainConfig` fields plus an optional `model` table of `VLMConfig` fields, merged key by key into the
preset's), and command-line flags set single training fields. The result is built through the dataclasses, so an
impossible value fails here, before any weight is loaded, with a message naming the field. No torch import, no
mutation of the preset: `nanovlm train --dry-run` prints exactly what a run would use.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from nanovlm_cli.config import TrainConfig, VLMConfig, check_field_types, load_json_config
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.presets import get_preset, with_backbones

TRAIN_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig))
BACKBONE_KEYS: tuple[str, ...] = ("vision_encoder", "dinov3_model", "language_model")

# Optional text fields where the string "None" (as the original repository's scripts pass it) means "unset".
NULLABLE_TEXT_FIELDS: frozenset[str] = frozenset(
    f.name for f in fields(TrainConfig) if f.type in ("str | None", "Optional[str]")
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
