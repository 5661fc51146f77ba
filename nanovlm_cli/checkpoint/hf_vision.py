"""Hugging Face vision backbones -> our `VisionEncoder`: config translation and strict weight conversion.

Pure functions over a key-template table (torchtune style): every HF key is either mapped to exactly one of
ours, or explicitly ignored (text tower of a full SiglipModel, SigLIP's attention-pooling head, DINO's
pretraining mask token); anything else raises `CheckpointError` naming the key. HF key names live only here.
Both spellings HF has used are accepted: Hub checkpoints (`attention.attention.query` in DINOv2, `layer.N` in
DINOv3, a `vision_model.` prefix in SigLIP) and what `transformers` 5 holds in memory (`attention.q_proj`,
`model.layer.N`), so a checkpoint loads whichever version wrote it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from nanovlm_cli.checkpoint.files import check_and_copy, read_json, read_safetensors, resolve_source
from nanovlm_cli.config import VisionConfig
from nanovlm_cli.errors import CheckpointError
from nanovlm_cli.models.vision import VisionEncoder

logger = logging.getLogger(__name__)

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
         "gelu_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu", "swish": "silu"}

# Per-layer templates ("{}" is the layer index) shared by the two DINO families after spelling normalisation.
_DINO_LAYER = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.q_proj.weight": "attn.q_proj.weight", "attention.q_proj.bias": "attn.q_proj.bias",
    "attention.k_proj.weight": "attn.k_proj.weight", "attention.k_proj.bias": "attn.k_proj.bias",
    "attention.v_proj.weight": "attn.v_proj.weight", "attention.v_proj.bias": "attn.v_proj.bias",
    "attention.o_proj.weight": "attn.out_proj.weight", "attention.o_proj.bias": "attn.out_proj.bias",
    "layer_scale1.lambda1": "scale1", "layer_scale2.lambda1": "scale2",
    "mlp.fc1.weight": "mlp.up_proj.weight", "mlp.fc1.bias": "mlp.up_proj.bias",
    "mlp.fc2.weight": "mlp.down_proj.weight", "mlp.fc2.bias": "mlp.down_proj.bias",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.gate_proj.bias": "mlp.gate_proj.bias",
    "mlp.up_proj.weight": "mlp.up_proj.weight", "mlp.up_proj.bias": "mlp.up_proj.bias",
    "mlp.down_proj.weight": "mlp.down_proj.weight", "mlp.down_proj.bias": "mlp.down_proj.bias",
}

KEY_TABLES: dict[str, dict[str, str]] = {
    "siglip": {
        "embeddings.patch_embedding.weight": "patch_embed.weight",
        "embeddings.patch_embedding.bias": "patch_embed.bias",
        "embeddings.position_embedding.weight": "pos_embed",  # (g*g, D) -> (1, g*g, D)
        "encoder.layers.{}.layer_norm1.weight": "blocks.{}.norm1.weight",
        "encoder.layers.{}.layer_norm1.bias": "blocks.{}.norm1.bias",
        "encoder.layers.{}.layer_norm2.weight": "blocks.{}.norm2.weight",
        "encoder.layers.{}.layer_norm2.bias": "blocks.{}.norm2.bias",
        "encoder.layers.{}.self_attn.q_proj.weight": "blocks.{}.attn.q_proj.weight",
        "encoder.layers.{}.self_attn.q_proj.bias": "blocks.{}.attn.q_proj.bias",
        "encoder.layers.{}.self_attn.k_proj.weight": "blocks.{}.attn.k_proj.weight",
        "encoder.layers.{}.self_attn.k_proj.bias": "blocks.{}.attn.k_proj.bias",
        "encoder.layers.{}.self_attn.v_proj.weight": "blocks.{}.attn.v_proj.weight",
        "encoder.layers.{}.self_attn.v_proj.bias": "blocks.{}.attn.v_proj.bias",
        "encoder.layers.{}.self_attn.out_proj.weight": "blocks.{}.attn.out_proj.weight",
        "encoder.layers.{}.self_attn.out_proj.bias": "blocks.{}.attn.out_proj.bias",
        "encoder.layers.{}.mlp.fc1.weight": "blocks.{}.mlp.up_proj.weight",
        "encoder.layers.{}.mlp.fc1.bias": "blocks.{}.mlp.up_proj.bias",
        "encoder.layers.{}.mlp.fc2.weight": "blocks.{}.mlp.down_proj.weight",
        "encoder.layers.{}.mlp.fc2.bias": "blocks.{}.mlp.down_proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    },
    "dinov2": {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",  # (1, 1 + g*g, D); CLS row folded into cls_token below
        "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
        **{f"encoder.layer.{{}}.{k}": f"blocks.{{}}.{v}" for k, v in _DINO_LAYER.items()},
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    },
    "dinov3": {
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "registers",
        "embeddings.patch_embeddings.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.bias": "patch_embed.bias",
        **{f"layer.{{}}.{k}": f"blocks.{{}}.{v}" for k, v in _DINO_LAYER.items()},
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    },
}

# Older / newer HF spellings -> the spelling of the table above (applied in order, first match per pattern).
_SPELLINGS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^vision_model\."), ""),
    (re.compile(r"^model\.layer\."), "layer."),  # DINOv3 as transformers 5 holds it in memory
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),  # DINOv2 Hub checkpoints
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.mlp\.weights_out\."), ".mlp.down_proj."),  # DINOv2 SwiGLU (giant) Hub checkpoints
]

# Keys we knowingly drop: the SiglipModel text tower and logit scale/bias, SigLIP's attention-pooling head
# (we use patch tokens), and the DINO mask token (masked-image pretraining only).
_IGNORED = re.compile(r"^(text_model\.|logit_scale$|logit_bias$|head\.|embeddings\.mask_token$)")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _normalise(key: str) -> str:
    for pattern, replacement in _SPELLINGS:
        key = pattern.sub(replacement, key)
    return key


def convert_vision_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our `VisionEncoder` names and layouts. Unknown keys raise; missing ones are left to the loader."""
    table = KEY_TABLES[cfg.kind]
    out: dict[str, torch.Tensor] = {}
    for hf_key, tensor in hf_state.items():
        key = _normalise(hf_key)
        if _IGNORED.match(key):
            continue
        if key.endswith((".mlp.weights_in.weight", ".mlp.weights_in.bias")):
            # DINOv2 SwiGLU stores gate and up fused along the output dimension: [gate; up].
            gate, up = tensor.chunk(2, dim=0)
            suffix = key.rsplit(".", 1)[1]
            prefix = key[: -len(f"weights_in.{suffix}")]
            extra = {f"{prefix}gate_proj.{suffix}": gate, f"{prefix}up_proj.{suffix}": up}
        else:
            extra = {key: tensor}
        for k, t in extra.items():
            match = _LAYER_INDEX.search(k)
            template = _LAYER_INDEX.sub(".{}.", k, count=1) if match else k
            ours = table.get(template)
            if ours is None:
                raise CheckpointError(f"unknown key {hf_key!r} in a {cfg.kind} vision checkpoint; "
                                      "the weights do not match their config.json (model_type)")
            out[ours.format(match.group(1)) if match else ours] = t
    pos = out.get("pos_embed")
    if pos is not None and pos.ndim == 2:  # SigLIP stores an nn.Embedding table
        out["pos_embed"] = pos.unsqueeze(0)  # (1, g*g, D)
    if cfg.use_cls and pos is not None and "cls_token" in out and out["pos_embed"].shape[1] == cfg.grid_size**2 + 1:
        # DINOv2: the CLS position is a constant added to a constant, never resized -> fold it into the token.
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]  # (1, 1, D)
        out["pos_embed"] = out["pos_embed"][:, 1:]  # (1, g*g, D)
    return out


def _size(value: Any, name: str) -> int:
    """HF allows int or [h, w] for image/patch sizes; we need square ones."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{name}={value} is not square; only square {name} values are supported")
        value = value[0]
    return int(value)


def _act(name: str) -> str:
    if name not in _ACTS:
        raise CheckpointError(f"vision hidden_act={name!r} is not supported; use one of {', '.join(_ACTS)}")
    return _ACTS[name]


def vision_config_from_hf(hf_config: dict, *, hub_id: str | None = None) -> VisionConfig:
    """Our `VisionConfig` from a HF `config.json` (a vision model's, or a full SiglipModel's with `vision_config`).

    Missing fields take the defaults of the `transformers` config class, as `from_pretrained` would.
    """
    model_type = hf_config.get("model_type")
    if model_type == "siglip":
        return vision_config_from_hf({"model_type": "siglip_vision_model", **hf_config.get("vision_config", {})},
                                     hub_id=hub_id)
    c = hf_config.get
    if int(c("num_channels", 3)) != 3:
        raise CheckpointError(f"vision num_channels={c('num_channels')} is not supported; only RGB (3) encoders load")
    if model_type == "siglip_vision_model":
        return VisionConfig(
            kind="siglip", hub_id=hub_id, image_size=_size(c("image_size", 224), "image_size"),
            patch_size=_size(c("patch_size", 16), "patch_size"), hidden_dim=c("hidden_size", 768),
            intermediate_dim=c("intermediate_size", 3072), n_layers=c("num_hidden_layers", 12),
            n_heads=c("num_attention_heads", 12), layer_norm_eps=c("layer_norm_eps", 1e-6),
            act=_act(c("hidden_act", "gelu_pytorch_tanh")),
        )
    if model_type == "dinov2":
        hidden = c("hidden_size", 768)
        intermediate = int(hidden * c("mlp_ratio", 4))
        swiglu = bool(c("use_swiglu_ffn", False))
        if swiglu:  # HF keeps two thirds of the MLP width, rounded up to a multiple of 8
            intermediate = (int(intermediate * 2 / 3) + 7) // 8 * 8
        bias = bool(c("qkv_bias", True))
        return VisionConfig(
            kind="dinov2", hub_id=hub_id, image_size=_size(c("image_size", 224), "image_size"),
            patch_size=_size(c("patch_size", 14), "patch_size"), hidden_dim=hidden, intermediate_dim=intermediate,
            n_layers=c("num_hidden_layers", 12), n_heads=c("num_attention_heads", 12),
            layer_norm_eps=c("layer_norm_eps", 1e-6), act="silu" if swiglu else _act(c("hidden_act", "gelu")),
            gated_mlp=swiglu, use_cls=True, layer_scale=True, qkv_bias=(bias, bias, bias),
        )
    if model_type == "dinov3_vit":
        if not c("proj_bias", True):
            raise CheckpointError("DINOv3 config has proj_bias=false, which is not supported; "
                                  "only checkpoints with an attention output bias load")
        patch = _size(c("patch_size", 16), "patch_size")
        image = _size(c("image_size", 224), "image_size")
        rope_theta = c("rope_theta", (c("rope_parameters") or {}).get("rope_theta", 100.0))
        return VisionConfig(
            kind="dinov3", hub_id=hub_id, image_size=image // patch * patch, patch_size=patch,
            hidden_dim=c("hidden_size", 384), intermediate_dim=c("intermediate_size", 1536),
            n_layers=c("num_hidden_layers", 12), n_heads=c("num_attention_heads", 6),
            layer_norm_eps=c("layer_norm_eps", 1e-5), act=_act(c("hidden_act", "gelu")),
            gated_mlp=bool(c("use_gated_mlp", False)), use_cls=True, n_registers=c("num_register_tokens", 0),
            layer_scale=True, rope_theta=float(rope_theta),
            qkv_bias=(bool(c("query_bias", True)), bool(c("key_bias", False)), bool(c("value_bias", True))),
            mlp_bias=bool(c("mlp_bias", True)),
        )
    raise CheckpointError(f"vision model_type {model_type!r} is not supported; "
                          "use a siglip, siglip_vision_model, dinov2 or dinov3_vit checkpoint")


def load_vision_backbone(source: str, *, dtype: torch.dtype = torch.float32) -> VisionEncoder:
    """A `VisionEncoder` with the weights of a HF vision checkpoint (Hub id or local directory), in eval mode."""
    directory = resolve_source(source)
    cfg = vision_config_from_hf(read_json(directory / "config.json"), hub_id=source)
    state = convert_vision_state_dict(read_safetensors(directory), cfg)
    model = VisionEncoder(cfg).to(dtype)
    check_and_copy(model, state, source)
    logger.info("loaded %s vision encoder from %s (%d layers, hidden %d)", cfg.kind, source, cfg.n_layers,
                cfg.hidden_dim)
    return model.eval()
