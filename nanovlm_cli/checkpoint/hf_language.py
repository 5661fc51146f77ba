"""Hugging Face decoder checkpoints (Llama/SmolLM2, Gemma-3) -> our `LanguageConfig` and `LanguageModel`.

Pure functions over dicts: `language_config_from_hf` reads a `config.json` (transformers 4.x and 5.x spellings),
`convert_language_state_dict` renames tensors through a strict key-template table (an unknown key or a missing
key raises `CheckpointError` naming it), `load_language_backbone` puts both together for a Hub id or a local
directory. HF key names live only in this module.

Note the trap this table guards: in a Llama checkpoint `post_attention_layernorm` is the norm *before* the MLP,
in a Gemma-3 checkpoint it is the norm *after* attention (Gemma's pre-MLP norm is `pre_feedforward_layernorm`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import Tensor

from nanovlm_cli.checkpoint.files import check_and_copy, read_json, read_safetensors, resolve_source
from nanovlm_cli.config import LanguageConfig
from nanovlm_cli.errors import CheckpointError, ConfigError
from nanovlm_cli.models.language import LanguageModel

logger = logging.getLogger(__name__)

# Defaults of transformers' Gemma3TextConfig: the text_config of multimodal Gemma-3 repos omits many of them.
_GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6, "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 2, "eos_token_id": 1, "attention_bias": False,
}
_LLAMA_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False,
}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}

# Per-layer tensors: HF suffix (after "layers.{i}.") -> our suffix (after "blocks.{i}."), by norm layout.
_LAYER_COMMON = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "input_layernorm.weight": "attn_norm.weight",
}
_LAYER_BIAS = {f"self_attn.{p}_proj.bias": f"attn.{p}_proj.bias" for p in "qkvo"}
_LAYER_QK_NORM = {"self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight"}
_LAYER_PRE_NORM = {"post_attention_layernorm.weight": "mlp_norm.weight"}  # Llama: the pre-MLP norm
_LAYER_POST_NORMS = {  # Gemma-3: four norms per layer
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
}
# Where the decoder lives: CausalLM ("model."), multimodal Gemma-3 in transformers 5.x and 4.x.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")
# Tensors of a multimodal checkpoint that are not the language backbone (skipped, never guessed at).
_NON_TEXT_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def _rope(hf: dict[str, Any], layer_type: str | None, legacy_theta_key: str, default_theta: float) -> tuple[float, float]:
    """(theta, linear factor) of one layer type from 5.x `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        params = params.get(layer_type or "full_attention")
    elif layer_type == "sliding_attention":
        params = None  # a flat (or no) rope_parameters describes the global layers only
    if not isinstance(params, dict):
        params = {} if layer_type == "sliding_attention" else dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get(legacy_theta_key, default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"RoPE type {rope_type!r} is not supported (only default and linear); "
                          "use a checkpoint with plain or linearly scaled RoPE")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported; it must be 1.0")
    return float(params.get("rope_theta", default_theta)), float(params.get("factor", 1.0) if rope_type == "linear" else 1.0)


def _token_id(value: Any) -> int | None:
    # Gemma-3 -it lists [<eos>, <end_of_turn>]; the chat turn ends with the last one.
    if isinstance(value, list):
        return int(value[-1]) if value else None
    return None if value is None else int(value)


def language_config_from_hf(hf_config: dict, *, hub_id: str | None = None, extra_vocab_size: int = 0) -> LanguageConfig:
    """Our config for a HF `config.json` of model_type llama, gemma3_text or gemma3 (its text_config)."""
    model_type = hf_config.get("model_type")
    if model_type == "gemma3":
        hf_config = {"model_type": "gemma3_text", **(hf_config.get("text_config") or {})}
        model_type = "gemma3_text"
    if model_type == "gemma3_text":
        hf = {**_GEMMA3_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is not None:
                raise ConfigError(f"{key}={hf[key]} is not supported (Gemma-3 has none); use a Gemma-3 checkpoint")
        if hf.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention=true is not supported by a causal decoder")
        n_layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % hf["sliding_window_pattern"] else "full_attention" for i in range(n_layers)
        ]
        theta, factor = _rope(hf, "full_attention", "rope_theta", 1_000_000.0)
        local_theta, local_factor = _rope(hf, "sliding_attention", "rope_local_base_freq", 10_000.0)
        if local_factor != 1.0:
            raise ConfigError(f"RoPE scaling factor {local_factor} on sliding layers is not supported")
        flags = {"norm_unit_offset": True, "qk_norm": True, "post_norms": True, "embed_scale": True,
                 "sliding_window": hf["sliding_window"], "layer_types": tuple(layer_types),
                 "query_pre_attn_scalar": hf["query_pre_attn_scalar"], "rope_local_theta": local_theta}
        act_key = "hidden_activation"
    elif model_type == "llama":
        hf = {**_LLAMA_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
        if hf.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported; use a Llama checkpoint without MLP biases")
        theta, factor = _rope(hf, None, "rope_theta", 10_000.0)
        flags = {}
        act_key = "hidden_act"
    else:
        raise ConfigError(f"language model type {model_type!r} is not supported; use llama (SmolLM2) or gemma3_text")
    act = _ACTIVATIONS.get(hf.get(act_key, "silu"))
    if act is None:
        raise ConfigError(f"activation {hf.get(act_key)!r} is not supported; use silu or gelu_pytorch_tanh")
    try:
        hidden, n_heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hidden // n_heads
        return LanguageConfig(
            hub_id=hub_id, vocab_size=hf["vocab_size"], extra_vocab_size=extra_vocab_size, hidden_dim=hidden,
            intermediate_dim=hf["intermediate_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim_override=head_dim if head_dim * n_heads != hidden else None,
            max_position_embeddings=hf["max_position_embeddings"], rope_theta=theta, rope_scaling_factor=factor,
            rms_norm_eps=hf["rms_norm_eps"], act=act, tie_embeddings=bool(hf["tie_word_embeddings"]),
            attention_bias=bool(hf["attention_bias"]), bos_token_id=_token_id(hf.get("bos_token_id")),
            eos_token_id=_token_id(hf.get("eos_token_id")), **flags,
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json has no {exc.args[0]!r} for model_type {model_type}; "
                              "the backbone config is incomplete") from exc


def _key_table(cfg: LanguageConfig, prefix: str) -> dict[str, str]:
    """Every HF key this config expects (with the decoder prefix) -> our key."""
    layer = dict(_LAYER_COMMON)
    if cfg.attention_bias:
        layer.update(_LAYER_BIAS)
    if cfg.qk_norm:
        layer.update(_LAYER_QK_NORM)
    layer.update(_LAYER_POST_NORMS if cfg.post_norms else _LAYER_PRE_NORM)
    table = {f"{prefix}embed_tokens.weight": "embed_tokens.weight", f"{prefix}norm.weight": "norm.weight"}
    for i in range(cfg.n_layers):
        table.update({f"{prefix}layers.{i}.{hf}": f"blocks.{i}.{ours}" for hf, ours in layer.items()})
    return table


def convert_language_state_dict(hf_state: dict[str, Tensor], cfg: LanguageConfig) -> dict[str, Tensor]:
    """Rename a HF decoder state dict to ours; unknown or missing keys raise `CheckpointError` naming the key.

    The embedding (and an untied head) keep the checkpoint's `cfg.vocab_size` rows here; the extra rows are
    added by `load_language_backbone`. A tied checkpoint's `lm_head.weight`, if present, is dropped.
    """
    embed_re = re.compile(r"^(.*?)embed_tokens\.weight$")
    prefixes = [p for p in _TEXT_PREFIXES if f"{p}embed_tokens.weight" in hf_state]
    if not prefixes:
        found = [k for k in hf_state if embed_re.match(k)]
        raise CheckpointError(f"no token embedding found (expected model.embed_tokens.weight, got {found[:3] or 'none'}); "
                              "this is not a Llama/Gemma-3 decoder checkpoint")
    table = _key_table(cfg, prefixes[0])
    head_key = next((k for k in _HEAD_KEYS if k in hf_state), None)
    out: dict[str, Tensor] = {}
    for key, tensor in hf_state.items():
        if key in table:
            out[table[key]] = tensor
        elif key == head_key:
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = tensor
        elif not key.startswith(_NON_TEXT_PREFIXES):
            raise CheckpointError(f"unknown tensor {key} in the language checkpoint; it does not fit the "
                                  f"{'Gemma-3' if cfg.post_norms else 'Llama'} layout of this config")
    missing = [k for k in table if k not in hf_state]
    if not cfg.tie_embeddings and head_key is None:
        missing.append("lm_head.weight")
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]} in the language checkpoint"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + "; the checkpoint is incomplete or does not match its config.json")
    return out


def _extend_rows(weight: Tensor, extra: int) -> Tensor:
    """Append `extra` rows equal to the mean of the existing rows (new tokens start as an average token)."""
    if extra == 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, D)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)  # (V + extra, D)


def load_language_backbone(source: str, *, extra_vocab_size: int = 0, dtype: torch.dtype = torch.float32) -> LanguageModel:
    """A pretrained decoder from a Hub id or a local directory, with `extra_vocab_size` mean-initialised rows."""
    directory = resolve_source(source)
    cfg = language_config_from_hf(read_json(directory / "config.json"), hub_id=str(source),
                                  extra_vocab_size=extra_vocab_size)
    state = convert_language_state_dict(read_safetensors(directory), cfg)
    for key in ("embed_tokens.weight", "lm_head.weight"):
        if key in state:
            if state[key].shape[0] != cfg.vocab_size:
                raise CheckpointError(f"{source}: {key} has {state[key].shape[0]} rows but config.json says "
                                      f"vocab_size={cfg.vocab_size}; the config and the weights disagree")
            state[key] = _extend_rows(state[key], extra_vocab_size)
    with torch.device("meta"):
        model = LanguageModel(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.reset_buffers()
    check_and_copy(model, state, str(source))
    logger.info("loaded %s decoder from %s (%d layers, +%d vocabulary rows)",
                "Gemma-3" if cfg.post_norms else "Llama", source, cfg.n_layers, extra_vocab_size)
    return model
