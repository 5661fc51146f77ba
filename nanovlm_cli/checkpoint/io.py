"""Building, saving and loading whole models.

A nanovlm checkpoint directory is self-contained and loads offline:

    config.json          {"nanovlm_version": ..., "model": VLMConfig.to_dict()}
    model.safetensors    weights (safetensors only; tied weights stored once)
    tokenizer files      the tokenizer with its extra image tokens and chat template
    README.md            a model card generated from the config (and training summary when there is one)

Directories saved by the upstream nanoVLM repository (flat `vit_*` / `lm_*` / `mp_*` config) load through
`checkpoint.upstream`. Every write is atomic: files go to a temporary sibling directory which is renamed into place,
so a crash mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nanovlm_cli import __version__
from nanovlm_cli.checkpoint.card import model_card
from nanovlm_cli.checkpoint.files import check_and_copy, read_json, read_safetensors, resolve_source
from nanovlm_cli.config import VLMConfig
from nanovlm_cli.errors import CheckpointError
from nanovlm_cli.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoadedModel:
    model: VisionLanguageModel
    tokenizer: Any  # a transformers PreTrainedTokenizerBase with the extra tokens
    cfg: VLMConfig
    directory: Path | None = None  # where it was loaded from (None when built from backbones)


def is_upstream_config(config: dict[str, Any]) -> bool:
    return "model" not in config and any(key.startswith("vit_") for key in config)


def read_model_config(directory: Path) -> VLMConfig:
    """The VLMConfig of a checkpoint directory, nanovlm or upstream format."""
    raw = read_json(directory / CONFIG_FILE)
    if is_upstream_config(raw):
        from nanovlm_cli.checkpoint.upstream import config_from_upstream

        return config_from_upstream(raw)
    if "model" not in raw:
        raise CheckpointError(f"{directory / CONFIG_FILE} is neither a nanovlm nor an upstream nanoVLM config "
                              "(no 'model' and no 'vit_*' keys); is this a VLM checkpoint directory?")
    return VLMConfig.from_dict(raw["model"])


def build_model(
    cfg: VLMConfig,
    *,
    load_backbones: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """A new VLM from a config: backbones loaded from their Hub ids / directories when set, the rest initialised.

    The tokenizer is loaded first so the image-token id (and the backbones' real architecture, read from their own
    config.json) are in the returned config.
    """
    from nanovlm_cli.data.tokenizer import load_tokenizer

    vision = language = None
    if load_backbones and cfg.vision.hub_id:
        from nanovlm_cli.checkpoint.hf_vision import load_vision_backbone

        vision = load_vision_backbone(cfg.vision.hub_id)
        cfg = cfg.replace(vision=vision.cfg)
    if load_backbones and cfg.language.hub_id:
        from nanovlm_cli.checkpoint.hf_language import load_language_backbone

        language = load_language_backbone(cfg.language.hub_id, extra_vocab_size=cfg.language.extra_vocab_size)
        cfg = cfg.replace(language=language.cfg.replace(tokenizer=cfg.language.tokenizer))
    tokenizer = load_tokenizer(cfg)
    cfg = cfg.replace(image_token_id=tokenizer.convert_tokens_to_ids(cfg.image_token))
    model = VisionLanguageModel(cfg)
    if vision is not None:
        check_and_copy(model.vision, vision.state_dict(), cfg.vision.hub_id or "vision backbone")
    if language is not None:
        check_and_copy(model.language, language.state_dict(), cfg.language.hub_id or "language backbone")
    return LoadedModel(model.to(device=device, dtype=dtype), tokenizer, cfg)


def load_model(
    source: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a checkpoint (nanovlm or upstream nanoVLM format) from a Hub id or a local directory."""
    from nanovlm_cli.data.tokenizer import load_tokenizer

    directory = resolve_source(source)
    raw = read_json(directory / CONFIG_FILE)
    state = read_safetensors(directory)
    if is_upstream_config(raw):
        from nanovlm_cli.checkpoint.upstream import config_from_upstream, convert_upstream_state_dict

        cfg = config_from_upstream(raw)
        tokenizer = load_tokenizer(cfg)
        cfg = cfg.replace(image_token_id=tokenizer.convert_tokens_to_ids(cfg.image_token))
        state = convert_upstream_state_dict(state, cfg)
    else:
        cfg = read_model_config(directory)
        tokenizer = load_tokenizer(cfg, source=directory)
    model = VisionLanguageModel(cfg)
    check_and_copy(model, state, str(source))
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
) -> Path:
    """Write a self-contained checkpoint atomically and return its directory.

    `extra_files` (name -> bytes) are written inside the same atomic step (e.g. training state for resume).
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        cfg = model.cfg
        config = {"nanovlm_version": __version__, "model": cfg.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "nanovlm_version": __version__})
        if tokenizer is not None:
            from nanovlm_cli.data.tokenizer import save_tokenizer

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
