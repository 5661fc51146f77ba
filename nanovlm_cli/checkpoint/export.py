"""Export to transformers: a checkpoint becomes a directory that plain `transformers` runs as Idefics3.

    config.json               Idefics3Config: SigLIP vision config, the decoder's own text config (llama, or
                              gemma3_text: measured exact inside Idefics3), scale_factor = the pixel shuffle factor
    model.safetensors         weights under transformers' names (the key table of `checkpoint/idefics3.py`)
    processor_config.json     Idefics3Processor: image_seq_len and the image processor settings (size.longest_edge,
    preprocessor_config.json  max_image_size, resample, mean/std, do_image_splitting) exactly as our processor resizes
    tokenizer files           our tokenizer with its special tokens and the chat template (chat_template.jinja)
    generation_config.json    stops at the end-of-turn token (and EOS), as `nanovlm generate` does
    README.md                 the model card (`checkpoint/card.py`), with transformers usage

Main design choice: only what transformers computes *exactly* as we do is exported. `export_problems` names every
reason a config cannot be (upstream nanoVLM layout, a non-SigLIP encoder, another image layout, pixels without
normalisation, a decoder transformers' Idefics3 cannot hold) and `export_transformers` refuses before anything is
written. Files go to a temporary sibling directory renamed into place at the end, so a failure leaves nothing.
One thing is adapted rather than refused: a tile size other than the encoder's training resolution. We resize the
learned positions bicubically to the tile grid, Idefics3 looks them up by bucket; every Idefics3 view is one tile,
so the resized table is computed once here and saved as the position embedding of a `tile_size` encoder (exact
when Idefics3's bucketize gives a full tile the identity positions, checked by `export_problems`).
Idefics3Processor adds <end_of_utterance> to a tokenizer that lacks it (ours do, unless imported from SmolVLM), so
transformers would hold a token id past our embedding; the export pads the embedding and head with zero rows up to
the processor's tokenizer and lists those ids in `suppress_tokens`, so they are never generated (no row of ours moves).
Imported SmolVLM2 checkpoints (model_type smolvlm) export as Idefics3 too: the same architecture and image string,
and Idefics3Processor needs no extra package (SmolVLMProcessor needs num2words and a video processor).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nanovlm_cli import __version__
from nanovlm_cli.checkpoint.card import model_card
from nanovlm_cli.checkpoint.files import new_or_empty_dir
from nanovlm_cli.checkpoint.idefics3 import (
    HEAD_KEY,
    TEXT_PREFIX,
    full_tile_position_ids,
    idefics3_config,
    image_processor_config,
    ours_to_idefics3,
)
from nanovlm_cli.checkpoint.io import LoadedModel, _atomic_replace, load_model, read_model_config
from nanovlm_cli.config import LanguageConfig, VLMConfig
from nanovlm_cli.errors import CheckpointError
from nanovlm_cli.models.lora import has_lora, merge_lora
from nanovlm_cli.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

# Idefics3Processor's own token strings (fixed inside transformers, vLLM and llama.cpp).
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"


class ExportError(CheckpointError):
    """A checkpoint that has no exact transformers form (the message names the reason and the fix)."""


@dataclass
class ExportResult:
    """What `export_transformers` wrote."""

    directory: str
    text_model_type: str  # "llama" or "gemma3_text"
    n_params: int
    files: list[dict[str, Any]] = field(default_factory=list)  # {"name", "size"}

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "model_type": "idefics3", "text_model_type": self.text_model_type,
                "n_params": self.n_params, "files": self.files}


# ----------------------------------------------------------------------------------------------------------------
# What can be exported


_LLAMA = "llama"
_GEMMA3 = "gemma3_text"


def text_model_type(lc: LanguageConfig) -> str | None:
    """The transformers text model holding this decoder exactly ("llama", "gemma3_text"), or None."""
    gemma = (lc.norm_unit_offset, lc.qk_norm, lc.post_norms, lc.embed_scale)
    if not any(gemma) and lc.act == "silu" and lc.layer_types is None and lc.sliding_window is None \
            and lc.query_pre_attn_scalar is None and lc.rope_local_theta is None:
        return _LLAMA
    if all(gemma) and lc.act == "gelu_tanh" and lc.query_pre_attn_scalar is not None \
            and float(lc.query_pre_attn_scalar).is_integer() and not lc.attention_bias:
        return _GEMMA3
    return None


def export_problems(cfg: VLMConfig) -> list[str]:
    """Why `cfg` has no exact transformers (Idefics3) form, one line each with its fix; empty when it exports."""
    problems: list[str] = []
    if cfg.source_format == "upstream":
        problems.append("it is an upstream nanoVLM checkpoint, whose image-token layout (global view first, no "
                        "<fake_token_around_image> wrappers) and unnormalised pixels transformers' Idefics3 cannot "
                        "reproduce; fine-tune a model in the Idefics3 layout instead (e.g. nanovlm train --preset "
                        "default) and export that")
        return problems
    v = cfg.vision
    siglip = (v.kind == "siglip" and not v.use_cls and v.n_registers == 0 and not v.layer_scale
              and v.rope_theta is None and not v.gated_mlp and v.qkv_bias == (True, True, True) and v.mlp_bias)
    if not siglip:
        problems.append(f"its vision encoder is {v.kind} (CLS/register tokens, LayerScale or RoPE), but transformers' "
                        "Idefics3 holds only a SigLIP encoder; train with --vision-encoder siglip to export")
    if cfg.image.mode != "idefics3":
        problems.append(f"its image layout is {cfg.image.mode!r}, not the Idefics3 layout transformers' processor "
                        "produces (tiles with <row_i_col_j> wrappers, global view last); train with image.mode "
                        "'idefics3' (the default preset does) to export")
    elif cfg.image.mean is None:
        problems.append("its pixels are not normalised (image.mean/std unset), and transformers' Idefics3 drops "
                        "all-zero tiles as padding, so black images would differ; train with the encoder's mean/std "
                        "to export")
    if text_model_type(cfg.language) is None:
        problems.append("its decoder mixes Llama and Gemma-3 features (norm offset, q/k norms, post norms, embedding "
                        "scale, activation, sliding window), which no transformers text model inside Idefics3 "
                        "computes; use a Llama-family (SmolLM2) or a Gemma-3 decoder to export")
    tokens = (cfg.image_token, cfg.fake_image_token, cfg.global_image_token)
    if cfg.image.mode == "idefics3" and tokens != (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN):
        problems.append(f"its image tokens are {', '.join(tokens)} but Idefics3Processor writes {IMAGE_TOKEN}, "
                        f"{FAKE_IMAGE_TOKEN}, {GLOBAL_IMAGE_TOKEN}; train with the Idefics3 token names to export")
    grid = cfg.image.tile_size // v.patch_size
    if cfg.image.mode == "idefics3" and not torch.equal(full_tile_position_ids(grid), torch.arange(grid * grid)):
        problems.append(f"a {grid}x{grid} patch tile gets non-identity positions in transformers' Idefics3 vision "
                        "embeddings (bucketize rounding), so it would read other position embeddings; choose a "
                        "tile size whose patch grid is, e.g. 16, 26, 27 or 32 patches")
    return problems


def check_exportable(cfg: VLMConfig) -> None:
    """Raise `ExportError` with the first reason `cfg` cannot be exported exactly (see `export_problems`)."""
    problems = export_problems(cfg)
    if problems:
        raise ExportError(f"cannot export to transformers: {problems[0]}")


# ----------------------------------------------------------------------------------------------------------------
# Configs


def _text_config(lc: LanguageConfig, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    kind = text_model_type(lc)
    common = {
        "model_type": kind, "vocab_size": vocab_size, "hidden_size": lc.hidden_dim,
        "intermediate_size": lc.intermediate_dim, "num_hidden_layers": lc.n_layers,
        "num_attention_heads": lc.n_heads, "num_key_value_heads": lc.n_kv_heads, "head_dim": lc.head_dim,
        "max_position_embeddings": lc.max_position_embeddings, "rms_norm_eps": lc.rms_norm_eps,
        "attention_bias": lc.attention_bias, "tie_word_embeddings": lc.tie_embeddings,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": lc.rope_theta}
    if lc.rope_scaling_factor != 1.0:
        rope = {"rope_type": "linear", "rope_theta": lc.rope_theta, "factor": lc.rope_scaling_factor}
    if kind == _LLAMA:  # the architecture name published SmolVLM configs carry (llama.cpp's converter reads it)
        return {**common, "architectures": ["VLlama3ForCausalLM"], "hidden_act": "silu", "mlp_bias": False,
                "rope_parameters": rope}
    layer_types = list(lc.layer_types or ["full_attention"] * lc.n_layers)
    local = {"rope_type": "default", "rope_theta": lc.rope_local_theta or lc.rope_theta}
    return {**common, "architectures": ["Gemma3ForCausalLM"], "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": layer_types,
            "sliding_window": lc.sliding_window or lc.max_position_embeddings,
            "query_pre_attn_scalar": int(lc.query_pre_attn_scalar),  # type: ignore[arg-type]
            "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "rope_parameters": {"full_attention": rope, "sliding_attention": local}}


def hf_config(cfg: VLMConfig, tokenizer: Any, dtype: torch.dtype = torch.float32,
              vocab_size: int | None = None) -> dict[str, Any]:
    """The exported `config.json`: `idefics3_config` for a `tile_size` encoder, with the decoder's own text config
    (`_text_config`: llama with its RoPE scaling, or gemma3_text) and the tokenizer's special-token ids.
    `vocab_size` (default: the model's) counts the rows padded for tokens transformers' processor adds."""
    tile_cfg = _tile_config(cfg)
    return {
        **idefics3_config(tile_cfg), "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "text_config": _text_config(cfg.language, tokenizer, vocab_size or cfg.language.total_vocab_size),
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True, "dtype": str(dtype).removeprefix("torch."), "transformers_version": _transformers_version(),
        "nanovlm_version": __version__,
    }


def _tile_config(cfg: VLMConfig) -> VLMConfig:
    """`cfg` with an encoder at the tile resolution (see the module docstring)."""
    return cfg.replace(vision=cfg.vision.replace(image_size=cfg.image.tile_size))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def generation_settings(cfg: VLMConfig, tokenizer: Any, vocab_size: int | None = None) -> dict[str, Any]:
    """`generation_config.json`: stop at the end-of-turn token first, then at whatever else ours stops at, and never
    sample an image placeholder token (ours blocks them too: `generation.Engine`) nor a padded row."""
    from nanovlm_cli.data.processor import Processor
    from nanovlm_cli.data.tokenizer import end_of_turn_token

    stops = Processor(cfg, tokenizer).stop_token_ids
    token = cfg.end_of_turn or end_of_turn_token(cfg.chat_template)
    eot = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
    eos = [i for i in dict.fromkeys([eot, *stops]) if i is not None]
    vocab = tokenizer.get_vocab()
    total = cfg.language.total_vocab_size
    placeholders = {cfg.image_token_id, *(vocab[t] for t in cfg.extra_tokens if t in vocab),
                    *range(total, vocab_size or total)}
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": tokenizer.pad_token_id,
            "suppress_tokens": sorted(i for i in placeholders if i is not None and i < (vocab_size or total)),
            "transformers_version": _transformers_version()}


# ----------------------------------------------------------------------------------------------------------------
# Weights and files


def hf_state_dict(model: VisionLanguageModel, cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """Our weights under the names transformers' Idefics3 uses (a tied `lm_head` is not stored, as transformers
    saves it), the position table resized to the tile grid when the tile is not the encoder's resolution. LoRA
    adapters are merged into their layers first (W + (alpha/r)·B@A, on a copy: `model` keeps them)."""
    if has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    grid = cfg.image.tile_size // cfg.vision.patch_size
    if grid != cfg.vision.grid_size and "vision.pos_embed" in state:  # see the module docstring
        with torch.no_grad():
            state["vision.pos_embed"] = model.vision._positions(grid, grid, torch.float32).cpu().contiguous()
    return {k: v.contiguous() for k, v in ours_to_idefics3(state, _tile_config(cfg)).items()}


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is not valid JSON; the model card leaves it out", path)
        return None
    return data if isinstance(data, dict) else None


def _processor(cfg: VLMConfig, tokenizer: Any) -> Any:
    """Idefics3Processor over a copy of our tokenizer (its constructor adds <end_of_utterance> when it is missing)."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    from nanovlm_cli.data.tokenizer import chat_template_jinja

    tokenizer = copy.deepcopy(tokenizer)
    template = tokenizer.chat_template or chat_template_jinja(cfg.chat_template, IMAGE_TOKEN)
    tokenizer.chat_template = template
    image_processor = Idefics3ImageProcessor(**image_processor_config(cfg))
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=cfg.image_tokens_per_tile,
                             chat_template=template)


def _write_processor(processor: Any, directory: Path) -> None:
    """Tokenizer files, chat_template.jinja, processor_config.json and preprocessor_config.json."""
    processor.save_pretrained(str(directory))
    processor.image_processor.save_pretrained(str(directory))  # preprocessor_config.json: llama.cpp's converter


def _pad_vocabulary(state: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Zero embedding (and head) rows up to `rows`, for tokens transformers' processor adds (see the module docstring)."""
    for key in (f"{TEXT_PREFIX}embed_tokens.weight", HEAD_KEY):
        if key in state and state[key].shape[0] < rows:
            weight = state[key]
            state[key] = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])
    return state


def _write_files(loaded: LoadedModel, tmp: Path, source_dir: Path | None) -> tuple[int, str]:
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    processor = _processor(cfg, tokenizer)
    vocab = max(cfg.language.total_vocab_size, max(processor.tokenizer.get_vocab().values()) + 1)
    state = _pad_vocabulary(hf_state_dict(loaded.model, cfg), vocab)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "nanovlm_version": __version__})
    config = hf_config(cfg, tokenizer, next(iter(state.values())).dtype, vocab_size=vocab)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_processor(processor, tmp)
    generation = generation_settings(cfg, tokenizer, vocab_size=vocab)
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    summary = _read_optional_json(source_dir / "training_summary.json") if source_dir else None
    results = _read_optional_json(source_dir / "eval_results.json") if source_dir else None
    n_params = sum(p.numel() for p in loaded.model.parameters())
    (tmp / "README.md").write_text(model_card(cfg, n_params=n_params, summary=summary, eval_results=results,
                                              library="transformers"))
    _check_loadable(tmp)
    return n_params, config["text_config"]["model_type"]


def _check_loadable(directory: Path) -> None:
    """transformers must accept the config it will be given (cheap: no weights are read)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises several types for a bad config
        raise ExportError(f"transformers does not accept the exported config ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); this is a bug, please report it") from exc


def _load(source: VisionLanguageModel | LoadedModel | str | Path, tokenizer: Any) -> tuple[LoadedModel, Path | None]:
    """The model to export, refused (by config alone, before any weight is read) when it has no exact form."""
    if isinstance(source, LoadedModel):
        check_exportable(source.cfg)
        return source, source.directory
    if isinstance(source, VisionLanguageModel):
        check_exportable(source.cfg)
        if tokenizer is None:
            from nanovlm_cli.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(source.cfg)
        return LoadedModel(source, tokenizer, source.cfg), None
    from nanovlm_cli.checkpoint.files import resolve_source

    directory = resolve_source(source)
    check_exportable(read_model_config(directory))
    return load_model(directory), directory


def export_transformers(
    model_or_checkpoint: VisionLanguageModel | LoadedModel | str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
) -> ExportResult:
    """Write `out_dir` so that `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained(out_dir)` run the model.

    `model_or_checkpoint` is a checkpoint directory or Hub id, a `LoadedModel`, or a `VisionLanguageModel` (with
    `tokenizer`, else the one its config names). A model without an
    exact transformers form raises `ExportError` before anything is written (see `export_problems`); `out_dir`
    must be new or empty, and is written atomically (all files or none).
    """
    final = new_or_empty_dir(out_dir, "export directory", ExportError)
    loaded, source_dir = _load(model_or_checkpoint, tokenizer)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        n_params, text_type = _write_files(loaded, tmp, source_dir)
        files = [{"name": p.name, "size": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()]
        _atomic_replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (Idefics3 with a %s decoder)", source_dir or "the model", final, text_type)
    return ExportResult(str(final), text_type, n_params, files)
