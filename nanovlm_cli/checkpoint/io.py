"""Building, saving and loading whole models.

A nanovlm checkpoint directory is self-contained and loads offline:

    config.json          {"format_version": 1 (2 with LoRA adapters), "nanovlm_version": ..., "model": VLMConfig.to_dict()}
    model.safetensors    weights (safetensors only; tied weights stored once)
    tokenizer files      the tokenizer with its extra image tokens and chat template
    README.md            a model card generated from the config (and training summary when there is one)

A LoRA checkpoint is the same self-contained directory: model.safetensors holds the base weights under their usual
names plus the adapters (`...q_proj.lora_A`, `...q_proj.lora_B`), and config.json gains
`"lora": {"r", "alpha", "dropout", "modules", "base"}` (`models.lora.lora_spec` and the base the adapters were
trained on), so loading re-creates those adapters before the weights are checked and copied.

Loading reads `config.json` once and classifies it (`checkpoint_kind`, the one place that tells the kinds of
checkpoint apart): nanovlm's own, or the upstream nanoVLM repository's (flat `vit_*` / `lm_*` / `mp_*` config,
converted by `checkpoint.upstream`). Every kind yields a `CheckpointConfig`: the parsed `VLMConfig`, where the
checkpoint's tokenizer lives and how its weights map to ours. A config fixes everything the model needs, the image
token id included (set from the tokenizer when a model is created, saved with it); a config saved without the id
(upstream nanoVLM's, which never had one) gets it once, at load, from the checkpoint's own tokenizer
(`complete_config`). `FORMAT_VERSION` is the version of the format this code writes and the newest it reads: a file
without one is format 0 (written before the field existed; the same layout). Every write is atomic: files go to a
temporary sibling directory which is renamed into place, so a crash mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nanovlm_cli import __version__
from nanovlm_cli.checkpoint.card import model_card
from nanovlm_cli.checkpoint.files import check_and_copy, read_json, read_safetensors, resolve_checkpoint
from nanovlm_cli.checkpoint.hf_language import load_language_backbone
from nanovlm_cli.checkpoint.hf_vision import load_vision_backbone
from nanovlm_cli.checkpoint.idefics3 import idefics3_to_ours, is_idefics3_config, read_idefics3_config
from nanovlm_cli.checkpoint.upstream import config_from_upstream, convert_upstream_state_dict
from nanovlm_cli.config import VLMConfig
from nanovlm_cli.data.tokenizer import load_tokenizer, save_tokenizer
from nanovlm_cli.errors import CheckpointError
from nanovlm_cli.models.lora import lora_spec, restore_adapters
from nanovlm_cli.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2  # the newest layout of config.json + model.safetensors this code reads; bump on any change
# 1: config.json carries format_version. 2: LoRA adapters (a "lora" entry and `lora_A`/`lora_B` tensors). A checkpoint
# is written with the oldest version that holds it (1, or 2 with adapters), so one without adapters still loads in code
# that reads only format 1.

StateConverter = Callable[[Mapping[str, torch.Tensor], VLMConfig], dict[str, torch.Tensor]]


@dataclass
class LoadedModel:
    model: VisionLanguageModel
    tokenizer: Any  # a transformers PreTrainedTokenizerBase with the extra tokens
    cfg: VLMConfig
    directory: Path | None = None  # where it was loaded from (None when built from backbones)


def _stored_names(state: Mapping[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    return dict(state)  # nanovlm's own weights are stored under our names


@dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint's config.json, read once and classified."""

    kind: str  # "nanovlm" | "upstream" (see `checkpoint_kind`)
    cfg: VLMConfig  # image_token_id may be None for kinds saved without it; see `complete_config`
    format_version: int  # nanovlm's own format; 0 for files written before the field and for other kinds
    tokenizer_dir: Path | None  # the checkpoint's own tokenizer files; None: the tokenizer its config names
    convert_state: StateConverter = _stored_names  # stored weight names -> ours
    lora: Mapping[str, Any] | None = None  # config.json's "lora" entry: adapters to re-create before loading


def checkpoint_kind(config: Mapping[str, Any]) -> str | None:
    """Which kind of checkpoint a parsed config.json describes, None when none we know.

    The one place that tells the kinds apart: a new kind (e.g. transformers' Idefics3/SmolVLM) joins with one
    branch here and one reader in `_READERS`.
    """
    if "model" in config:
        return "nanovlm"
    if any(key.startswith("vit_") for key in config):
        return "upstream"
    if is_idefics3_config(config):
        return "idefics3"
    return None


def is_upstream_config(config: Mapping[str, Any]) -> bool:
    return checkpoint_kind(config) == "upstream"


def _read_nanovlm(raw: Mapping[str, Any], directory: Path) -> CheckpointConfig:
    version = raw.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"{directory / CONFIG_FILE} has format_version={version!r}, not a whole number; "
                              "re-save the checkpoint")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format {version} is newer than this nanovlm supports ({FORMAT_VERSION}); "
                              "upgrade nanovlm")
    if not isinstance(raw["model"], dict):
        raise CheckpointError(f"{directory / CONFIG_FILE} has a 'model' that is not a table of fields; re-save the "
                              "checkpoint")
    lora = raw.get("lora")
    if lora is not None and not isinstance(lora, dict):
        raise CheckpointError(f"{directory / CONFIG_FILE} has a 'lora' that is not a table; re-save the checkpoint")
    return CheckpointConfig("nanovlm", VLMConfig.from_dict(raw["model"]), version, directory, lora=lora)


def _read_upstream(raw: Mapping[str, Any], directory: Path) -> CheckpointConfig:
    # upstream saves no tokenizer files: its config names the tokenizer (`lm_tokenizer`) and its extra tokens
    return CheckpointConfig("upstream", config_from_upstream(raw), 0, None, convert_upstream_state_dict)


def _read_idefics3(raw: Mapping[str, Any], directory: Path) -> CheckpointConfig:
    # transformers' Idefics3/SmolVLM: tokenizer, image processor and chat template saved beside the weights
    return CheckpointConfig("idefics3", read_idefics3_config(raw, directory), 0, directory, idefics3_to_ours)


_READERS: dict[str, Callable[[Mapping[str, Any], Path], CheckpointConfig]] = {
    "nanovlm": _read_nanovlm,
    "upstream": _read_upstream,
    "idefics3": _read_idefics3,
}


def classify_config(raw: Mapping[str, Any], directory: Path) -> CheckpointConfig:
    """The `CheckpointConfig` of the parsed config.json `raw` of the checkpoint in `directory`."""
    kind = checkpoint_kind(raw)
    if kind is None:
        raise CheckpointError(f"{directory / CONFIG_FILE} is neither a nanovlm, an upstream nanoVLM nor an "
                              "Idefics3/SmolVLM config (no 'model', no 'vit_*' keys, model_type not idefics3 or "
                              "smolvlm); is this a VLM checkpoint directory?")
    return _READERS[kind](raw, directory)


def read_checkpoint_config(directory: Path) -> CheckpointConfig:
    """Read and classify the config.json of the checkpoint directory `directory` (see `resolve_checkpoint`)."""
    return classify_config(read_json(directory / CONFIG_FILE), directory)


def load_checkpoint_tokenizer(checkpoint: CheckpointConfig) -> Any:
    """The checkpoint's own tokenizer: its saved files, or (upstream) the one its config names, with the extra tokens."""
    return load_tokenizer(checkpoint.cfg, source=checkpoint.tokenizer_dir)


def complete_config(cfg: VLMConfig, tokenizer: Any) -> VLMConfig:
    """`cfg` with its image token id; the one place an id missing from a saved config is filled in.

    Upstream nanoVLM configs (and any nanovlm config written without the field) do not record the id; their own
    tokenizer defines it. A config that records it is returned unchanged (`nanovlm validate` checks it against the
    tokenizer).
    """
    if cfg.image_token_id is not None:
        return cfg
    token_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
    log.debug("config has no image_token_id; %s is id %s in the checkpoint's tokenizer", cfg.image_token, token_id)
    return cfg.replace(image_token_id=token_id)


def read_model_config(source: str | Path) -> VLMConfig:
    """The VLMConfig of a checkpoint (nanovlm or upstream format), complete enough to build the model from.

    Reads config.json once; only a config saved without the image token id also reads the tokenizer.
    """
    checkpoint = read_checkpoint_config(resolve_checkpoint(source))
    if checkpoint.cfg.image_token_id is not None:
        return checkpoint.cfg
    return complete_config(checkpoint.cfg, load_checkpoint_tokenizer(checkpoint))


def build_model(
    cfg: VLMConfig,
    *,
    load_backbones: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """A new VLM from a config: backbones loaded from their Hub ids / directories when set, the rest initialised.

    This is where a model is created, so this is where its config is fixed: the backbones' real architecture (read
    from their own config.json) and the image token id of the tokenizer it is created with (a preset's config
    carries the id such a tokenizer gives; the tokenizer's own id wins should they differ) go into the returned
    config, which `save_model` writes. A config naming whole pretrained weights (`cfg.hub_id`: the SmolVLM presets)
    starts from that checkpoint, its architecture and tokenizer included.
    """
    if load_backbones and cfg.hub_id:
        loaded = load_model(cfg.hub_id, device=device, dtype=dtype)
        loaded.model.cfg = loaded.cfg = loaded.cfg.replace(hub_id=cfg.hub_id)  # saved with it: where it started
        return loaded
    vision = language = None
    if load_backbones and cfg.vision.hub_id:
        vision = load_vision_backbone(cfg.vision.hub_id)
        cfg = cfg.replace(vision=vision.cfg)
    if load_backbones and cfg.language.hub_id:
        language = load_language_backbone(cfg.language.hub_id, extra_vocab_size=cfg.language.extra_vocab_size)
        cfg = cfg.replace(language=language.cfg.replace(tokenizer=cfg.language.tokenizer))
    tokenizer = load_tokenizer(cfg)
    token_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
    if cfg.image_token_id is not None and cfg.image_token_id != token_id:
        log.debug("the config's image_token_id %s is %s in the tokenizer %s; using the tokenizer's",
                  cfg.image_token_id, token_id, cfg.language.tokenizer_source)
    cfg = cfg.replace(image_token_id=token_id)
    model = VisionLanguageModel(cfg)
    if vision is not None:
        check_and_copy(model.vision, vision.state_dict(), cfg.vision.hub_id or "vision backbone")
    if language is not None:
        check_and_copy(model.language, language.state_dict(), cfg.language.hub_id or "language backbone")
    return LoadedModel(model.to(device=device, dtype=dtype), tokenizer, cfg)


def load_model(
    source: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a checkpoint (nanovlm or upstream nanoVLM format) from a Hub id, a checkpoint directory or a run directory.

    config.json is read once; the weights are checked key by key and shape by shape before anything is copied.
    """
    directory = resolve_checkpoint(source)
    checkpoint = read_checkpoint_config(directory)
    state = read_safetensors(directory)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    cfg = complete_config(checkpoint.cfg, tokenizer)
    model = VisionLanguageModel(cfg)
    if checkpoint.lora is not None:
        restore_adapters(model, checkpoint.lora, str(source))
    check_and_copy(model, checkpoint.convert_state(state, cfg), str(source))
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, cfg, directory)


def _atomic_replace(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` directory to `final`, replacing an older `final` only once `tmp` is complete."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def save_model(
    model: VisionLanguageModel,
    directory: str | Path,
    *,
    tokenizer: Any = None,
    summary: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    lora_base: str | None = None,
) -> Path:
    """Write a self-contained checkpoint atomically and return its directory.

    `extra_files` (name -> bytes) are written inside the same atomic step (e.g. training state for resume).
    A model with LoRA adapters records them in config.json's "lora" entry, with `lora_base`: what the adapters
    apply to (a checkpoint or backbones), for the reader; the base weights themselves are in the file.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        cfg = model.cfg
        adapters = lora_spec(model)
        config = {"format_version": 1 if adapters is None else 2, "nanovlm_version": __version__,
                  "model": cfg.to_dict()}
        if adapters is not None:
            config["lora"] = {**adapters, "base": lora_base}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "nanovlm_version": __version__})
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if summary is not None:
            (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_bytes(payload)
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / "README.md").write_text(model_card(cfg, n_params=n_params, summary=summary))
        _atomic_replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint to %s", final)
    return final
