"""Checkpoints of the upstream nanoVLM repository (e.g. lusxvr/nanoVLM-450M), loaded unchanged.

Upstream saves a flat `config.json` (`vit_*`, `lm_*`, `mp_*`, `vlm_extra_tokens`, `lm_tokenizer`) and weights named
after its modules (`vision_encoder.blocks.0.attn.qkv_proj.weight`, `decoder.blocks.0.attn.q_proj.weight`,
`MP.proj.weight`). Its architecture is a SigLIP ViT (fused qkv, no CLS), a Llama decoder and the same pixel-shuffle
projector as ours; images are `ToTensor()` only (no mean/std), split into 512px tiles plus a global view, and image
tokens are spliced in place of `<|image|>` tokens. The conversion is a pure key-template table: an unknown key is an
error naming it, never a warning.

Three generations of upstream configs load:
- with `vlm_extra_tokens` holding the global-image and `<row_i_col_j>` tokens (image splitting, e.g. nanoVLM-450M):
  "tiles" processing, ChatML;
- with `vlm_extra_tokens` holding only `<|image|>`: one fixed-size view per image, ChatML;
- the earliest ones without `vlm_extra_tokens`, which prepended the image embeddings to a plain
  "Question: ... Answer:" prompt: the "plain" chat template puts the image tokens first, which is the same sequence.
Embedding rows for extra tokens upstream did not have are appended as zeros; they only ever hold image placeholders,
whose embeddings are replaced, and generation never samples them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from nanovlm_cli.config import ImageConfig, LanguageConfig, ProjectorConfig, VisionConfig, VLMConfig
from nanovlm_cli.errors import CheckpointError

# upstream key template -> ours; {i} is a block index. qkv_proj is split separately.
_VISION_KEYS = {
    "patch_embedding.conv.weight": "patch_embed.weight",
    "patch_embedding.conv.bias": "patch_embed.bias",
    "patch_embedding.position_embedding": "pos_embed",
    "layer_norm.weight": "norm.weight",
    "layer_norm.bias": "norm.bias",
    "blocks.{i}.ln1.weight": "blocks.{i}.norm1.weight",
    "blocks.{i}.ln1.bias": "blocks.{i}.norm1.bias",
    "blocks.{i}.ln2.weight": "blocks.{i}.norm2.weight",
    "blocks.{i}.ln2.bias": "blocks.{i}.norm2.bias",
    "blocks.{i}.attn.out_proj.weight": "blocks.{i}.attn.out_proj.weight",
    "blocks.{i}.attn.out_proj.bias": "blocks.{i}.attn.out_proj.bias",
    "blocks.{i}.mlp.fc1.weight": "blocks.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.fc1.bias": "blocks.{i}.mlp.up_proj.bias",
    "blocks.{i}.mlp.fc2.weight": "blocks.{i}.mlp.down_proj.weight",
    "blocks.{i}.mlp.fc2.bias": "blocks.{i}.mlp.down_proj.bias",
}
_LANGUAGE_KEYS = {
    "token_embedding.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "head.weight": "lm_head.weight",
    "blocks.{i}.norm1.weight": "blocks.{i}.attn_norm.weight",
    "blocks.{i}.norm2.weight": "blocks.{i}.mlp_norm.weight",
    "blocks.{i}.attn.q_proj.weight": "blocks.{i}.attn.q_proj.weight",
    "blocks.{i}.attn.k_proj.weight": "blocks.{i}.attn.k_proj.weight",
    "blocks.{i}.attn.v_proj.weight": "blocks.{i}.attn.v_proj.weight",
    "blocks.{i}.attn.out_proj.weight": "blocks.{i}.attn.o_proj.weight",
    "blocks.{i}.mlp.gate_proj.weight": "blocks.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.up_proj.weight": "blocks.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.down_proj.weight": "blocks.{i}.mlp.down_proj.weight",
}
_IGNORED = re.compile(r"^decoder\.rotary_embd\.inv_freq$")
_BLOCK = re.compile(r"\.(\d+)\.")


def _template(key: str) -> tuple[str, str | None]:
    match = _BLOCK.search(key)
    if match is None:
        return key, None
    return key[: match.start()] + ".{i}." + key[match.end():], match.group(1)


def _require_keys(config: Mapping[str, Any], keys: list[str]) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise CheckpointError(f"upstream nanoVLM config.json lacks {', '.join(missing)}; the checkpoint is incomplete")


def config_from_upstream(config: Mapping[str, Any]) -> VLMConfig:
    """Our VLMConfig for an upstream flat config (no weights loaded)."""
    _require_keys(config, ["vit_hidden_dim", "vit_patch_size", "vit_img_size", "vit_n_heads", "vit_n_blocks",
                           "lm_hidden_dim", "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads", "lm_n_blocks",
                           "mp_pixel_shuffle_factor", "lm_tokenizer"])
    prefix_format = "vlm_extra_tokens" not in config  # images prepended to a "Question: ... Answer:" prompt
    if config.get("vit_cls_flag"):
        raise CheckpointError("upstream checkpoints with vit_cls_flag=true are not supported (SigLIP has no CLS)")
    if float(config.get("lm_attn_scaling", 1.0)) != 1.0:
        raise CheckpointError(f"lm_attn_scaling={config['lm_attn_scaling']} is not supported (only 1.0)")
    extra_tokens = dict(config.get("vlm_extra_tokens") or {})
    extra = list(extra_tokens.values())
    n_tiles = sum(1 for t in extra if t.startswith("<row_"))
    max_grid = round(n_tiles**0.5) if n_tiles else 1
    base_vocab = int(config.get("lm_base_vocab_size", config.get("lm_vocab_size", 49152)))
    # rows the checkpoint holds; our extra tokens always include the image and global-image tokens
    vocab_total = max(int(config.get("lm_vocab_size", base_vocab + len(extra))), base_vocab + 2 + n_tiles)
    hidden = int(config["vit_hidden_dim"])
    vision = VisionConfig(
        kind="siglip", hub_id=None, image_size=int(config["vit_img_size"]), patch_size=int(config["vit_patch_size"]),
        hidden_dim=hidden, intermediate_dim=int(config.get("vit_inter_dim", 4 * hidden)),
        n_layers=int(config["vit_n_blocks"]), n_heads=int(config["vit_n_heads"]),
        layer_norm_eps=float(config.get("vit_ln_eps", 1e-6)), act="gelu_tanh",
    )
    language = LanguageConfig(
        hub_id=None, tokenizer=str(config["lm_tokenizer"]), vocab_size=base_vocab,
        extra_vocab_size=vocab_total - base_vocab, hidden_dim=int(config["lm_hidden_dim"]),
        intermediate_dim=int(config["lm_inter_dim"]), n_layers=int(config["lm_n_blocks"]),
        n_heads=int(config["lm_n_heads"]), n_kv_heads=int(config["lm_n_kv_heads"]),
        max_position_embeddings=int(config.get("lm_max_position_embeddings", 8192)),
        rope_theta=float(config.get("lm_re_base", 100000)), rms_norm_eps=float(config.get("lm_rms_eps", 1e-5)),
        tie_embeddings=bool(config.get("lm_tie_weights", True)),
    )
    image = ImageConfig(
        mode="tiles" if n_tiles else "fixed", tile_size=int(config["vit_img_size"]),
        max_side=int(config.get("max_img_size", 2048)), max_grid=max_grid, mean=None, std=None,
    )
    return VLMConfig(
        vision=vision, language=language,
        projector=ProjectorConfig(pixel_shuffle_factor=int(config["mp_pixel_shuffle_factor"])),
        image=image, chat_template="plain" if prefix_format else "chatml",
        image_token=extra_tokens.get("image_token", "<|image|>"),
        global_image_token=extra_tokens.get("global_image_token", "<|global_image|>"),
        source_format="upstream",
    )


def convert_upstream_state_dict(state: Mapping[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """Upstream weight names -> ours. Unknown keys raise; missing ones are caught when copying."""
    out: dict[str, torch.Tensor] = {}
    dim = cfg.vision.hidden_dim
    for key, tensor in state.items():
        if _IGNORED.match(key):
            continue
        if key == "MP.proj.weight":
            out["projector.proj.weight"] = tensor
            continue
        prefix, _, rest = key.partition(".")
        template, index = _template(rest)
        if prefix == "vision_encoder" and template in ("blocks.{i}.attn.qkv_proj.weight",
                                                       "blocks.{i}.attn.qkv_proj.bias"):
            kind = template.rsplit(".", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(dim, dim=0)):
                out[f"vision.blocks.{index}.attn.{name}.{kind}"] = part.contiguous()
            continue
        table = {"vision_encoder": _VISION_KEYS, "decoder": _LANGUAGE_KEYS}.get(prefix)
        if table is None or template not in table:
            raise CheckpointError(f"unknown upstream nanoVLM tensor {key}; this is not a checkpoint layout we know")
        ours = ("vision." if prefix == "vision_encoder" else "language.") + table[template].replace("{i}", index or "")
        out[ours] = tensor
    rows = cfg.language.total_vocab_size
    for name in ("language.embed_tokens.weight", "language.lm_head.weight"):
        tensor = out.get(name)
        if tensor is not None and tensor.shape[0] < rows:  # extra-token rows upstream did not have
            out[name] = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], tensor.shape[1])])
    if cfg.language.tie_embeddings:
        head = out.pop("language.lm_head.weight", None)
        embed = out.get("language.embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            raise CheckpointError("lm_tie_weights is true but decoder.head.weight differs from the token embedding")
    return out


def to_upstream(model_state: Mapping[str, torch.Tensor], cfg: VLMConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our weights and config in upstream's layout (for tests and for sharing with upstream users)."""
    inverse_v = {v: k for k, v in _VISION_KEYS.items()}
    inverse_l = {v: k for k, v in _LANGUAGE_KEYS.items()}
    state: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in model_state.items():
        part, _, rest = key.partition(".")
        if part == "projector":
            state["MP.proj.weight"] = tensor
            continue
        template, index = _template(rest)
        m = re.fullmatch(r"blocks\.\{i\}\.attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", template)
        if part == "vision" and m:
            qkv.setdefault((index or "", m.group(2)), {})[m.group(1)] = tensor
            continue
        table = inverse_v if part == "vision" else inverse_l
        prefix = "vision_encoder." if part == "vision" else "decoder."
        state[prefix + table[template].replace("{i}", index or "")] = tensor
    for (index, kind), parts in qkv.items():
        state[f"vision_encoder.blocks.{index}.attn.qkv_proj.{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    if cfg.language.tie_embeddings:
        state["decoder.head.weight"] = state["decoder.token_embedding.weight"]
    v, l = cfg.vision, cfg.language
    extra = {"image_token": cfg.image_token, "global_image_token": cfg.global_image_token}
    extra.update({f"r{t[5:].split('_col_')[0]}c{t.split('_col_')[1][:-1]}": t for t in cfg.tile_tokens})
    config = {
        "vit_hidden_dim": v.hidden_dim, "vit_inter_dim": v.intermediate_dim, "vit_patch_size": v.patch_size,
        "vit_img_size": v.image_size, "vit_n_heads": v.n_heads, "vit_dropout": 0.0, "vit_n_blocks": v.n_layers,
        "vit_ln_eps": v.layer_norm_eps, "vit_cls_flag": False, "vit_model_type": v.hub_id or "",
        "lm_hidden_dim": l.hidden_dim, "lm_inter_dim": l.intermediate_dim, "lm_rms_eps": l.rms_norm_eps,
        "lm_re_base": l.rope_theta, "lm_max_position_embeddings": l.max_position_embeddings,
        "lm_base_vocab_size": l.vocab_size, "extra_token_amount": len(extra), "lm_vocab_size": l.total_vocab_size,
        "lm_n_heads": l.n_heads, "lm_n_kv_heads": l.n_kv_heads, "lm_dropout": 0.0, "lm_n_blocks": l.n_layers,
        "lm_attn_scaling": 1.0, "lm_max_length": l.max_position_embeddings, "lm_use_tokens": False,
        "lm_tie_weights": l.tie_embeddings, "lm_model_type": l.hub_id or "", "lm_tokenizer": l.tokenizer_source,
        "mp_pixel_shuffle_factor": cfg.projector.pixel_shuffle_factor,
        "mp_image_token_length": cfg.image_tokens_per_tile, "max_img_size": cfg.image.max_side,
        "vlm_extra_tokens": extra, "vlm_load_backbone_weights": False,
    }
    return config, state
