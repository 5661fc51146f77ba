"""Checkpoints of the upstream nanoVLM repository (e.g. lusxvr/nanoVLM-450M), loaded unchanged.

Upstream saves a flat `config.json` (`vit_*`, `lm_*`, `mp_*`, `vlm_extra_tokens`, `lm_tokenizer`) and weights named
after its modules (`vision_encoder.blocks.0.attn.qkv_proj.weight`, `decoder.blocks.0.attn.q_proj.weight`,
`MP.proj.weight`). Its architecture is a SigLIP ViT (fused qkv, no CLS), a Llama decoder and the same pixel-shuffle
projector as ours; images are `ToTensor()` only (no mean/std), split into 512px tiles plus a global view, and image
tokens are spliced in place of `<|image|>` tokens. The conversion is a pure key-template table: an unknown key is an
error naming it, never a warning.

Five generations of upstream checkpoints load, each tested on fixtures written by that generation's own code
(tests/fixtures/upstream, made by scripts/make_upstream_fixtures.py):
- v0.1 (nanoVLM-222M era), no `vlm_extra_tokens`: image embeddings prepended to a plain "Question: ... Answer:"
  prompt; the "plain" chat template puts the image tokens first, which is the same sequence;
- v0.2, `vlm_extra_tokens` = {image_token} but no `lm_chat_template`: `<|image|>` placeholders before the same
  plain prompt;
- with `lm_chat_template` (ChatML), one fixed-size view per image;
- with `<row_i_col_j>` tokens but no global-image token: image splitting, tiles only;
- with the global-image token too (current main, nanoVLM-450M): global view first, then tiles, and
  `resize_to_max_side_len`.
Fixed-size views are resized bilinearly (torchvision's `Resize` default), tiles bicubically (`DynamicResize`).
The tied embedding is stored once: safetensors' `save_model` keeps `decoder.head.weight` and drops
`decoder.token_embedding.weight`; either name (or both, if equal) loads. Embedding rows for extra tokens upstream
did not have are appended as zeros; they only ever hold image placeholders, whose embeddings are replaced, and
generation never samples them. Upstream configs record no image token id: `config_from_upstream` leaves it unset and
loading takes it, once, from the checkpoint's tokenizer (`checkpoint.io.complete_config`). Not reproduced: upstream's
"dynamic" RoPE rescaling for positions beyond `lm_max_position_embeddings` (we refuse such prompts instead).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
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


# the only `lm_chat_template` upstream ever shipped (ChatML without a system turn), as its config.py spells it
_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _chat_template(config: Mapping[str, Any]) -> str:
    """Our template for an upstream config: "plain" before `lm_chat_template` existed, "chatml" for its ChatML."""
    template = config.get("lm_chat_template")
    if template is None:
        return "plain"  # v0.1 and v0.2: "Question: ... Answer:" with the image first
    if "".join(str(template).split()) != "".join(_CHATML.split()):
        raise CheckpointError(f"lm_chat_template {str(template)[:60]!r}... is not upstream nanoVLM's ChatML template, "
                              "the only one nanovlm renders for upstream checkpoints; convert the checkpoint with "
                              "its own template rendered as chatml, gemma or plain")
    return "chatml"


_REQUIRED = object()


def _field(config: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """config[key] checked as `kind` (a whole float passes as int, an int as float); one line naming it if not."""
    value = config.get(key, default)
    if value is _REQUIRED:
        raise CheckpointError(f"upstream nanoVLM config.json lacks {key}; the checkpoint is incomplete")
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        raise CheckpointError(f"upstream nanoVLM config.json has {key}={value!r}, expected {names[kind]}; "
                              "fix that field or re-save the checkpoint")
    return value


def config_from_upstream(config: Mapping[str, Any]) -> VLMConfig:
    """Our VLMConfig for an upstream flat config (no weights loaded)."""
    _require_keys(config, ["vit_hidden_dim", "vit_patch_size", "vit_img_size", "vit_n_heads", "vit_n_blocks",
                           "lm_hidden_dim", "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads", "lm_n_blocks",
                           "mp_pixel_shuffle_factor", "lm_tokenizer"])
    template = _chat_template(config)
    if config.get("vit_cls_flag"):
        raise CheckpointError("upstream checkpoints with vit_cls_flag=true are not supported (SigLIP has no CLS)")
    if _field(config, "lm_attn_scaling", float, 1.0) != 1.0:
        raise CheckpointError(f"lm_attn_scaling={config['lm_attn_scaling']} is not supported (only 1.0)")
    extra_tokens = dict(config.get("vlm_extra_tokens") or {})
    extra = list(extra_tokens.values())
    n_tiles = sum(1 for t in extra if t.startswith("<row_"))
    max_grid = round(n_tiles**0.5) if n_tiles else 1
    base_vocab = _field(config, "lm_base_vocab_size", int, _field(config, "lm_vocab_size", int, 49152))
    # rows the checkpoint holds; our extra tokens always include the image and global-image tokens
    vocab_total = max(_field(config, "lm_vocab_size", int, base_vocab + len(extra)), base_vocab + 2 + n_tiles)
    hidden = _field(config, "vit_hidden_dim", int)
    vision = VisionConfig(
        kind="siglip", hub_id=None, image_size=_field(config, "vit_img_size", int), patch_size=_field(config, "vit_patch_size", int),
        hidden_dim=hidden, intermediate_dim=_field(config, "vit_inter_dim", int, 4 * hidden),
        n_layers=_field(config, "vit_n_blocks", int), n_heads=_field(config, "vit_n_heads", int),
        layer_norm_eps=_field(config, "vit_ln_eps", float, 1e-6), act="gelu_tanh",
    )
    language = LanguageConfig(
        hub_id=None, tokenizer=_field(config, "lm_tokenizer", str), vocab_size=base_vocab,
        extra_vocab_size=vocab_total - base_vocab, hidden_dim=_field(config, "lm_hidden_dim", int),
        intermediate_dim=_field(config, "lm_inter_dim", int), n_layers=_field(config, "lm_n_blocks", int),
        n_heads=_field(config, "lm_n_heads", int), n_kv_heads=_field(config, "lm_n_kv_heads", int),
        max_position_embeddings=_field(config, "lm_max_position_embeddings", int, 8192),
        rope_theta=_field(config, "lm_re_base", float, 100000), rms_norm_eps=_field(config, "lm_rms_eps", float, 1e-5),
        tie_embeddings=_field(config, "lm_tie_weights", bool, True),
        eos_token_id=_field(config, "lm_eos_token_id", int) if config.get("lm_eos_token_id") is not None else None,
    )
    image = ImageConfig(
        mode="tiles" if n_tiles else "fixed", tile_size=_field(config, "vit_img_size", int),
        max_side=_field(config, "max_img_size", int, 2048), max_grid=max_grid, mean=None, std=None,
        global_view="global_image_token" in extra_tokens, resample="bicubic" if n_tiles else "bilinear",
        fill_max_side=_field(config, "resize_to_max_side_len", bool, False),
    )
    return VLMConfig(
        vision=vision, language=language,
        projector=ProjectorConfig(pixel_shuffle_factor=_field(config, "mp_pixel_shuffle_factor", int)),
        image=image, chat_template=template,
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
        # safetensors' save_model stores a shared tensor once, under whichever name it keeps (decoder.head.weight
        # in every upstream checkpoint we have seen); accept either name, or both when they are equal
        head = out.pop("language.lm_head.weight", None)
        embed = out.get("language.embed_tokens.weight")
        if embed is None and head is not None:
            out["language.embed_tokens.weight"] = head
        elif head is not None and embed is not None and not torch.equal(head, embed):
            raise CheckpointError("lm_tie_weights is true but decoder.head.weight differs from "
                                  "decoder.token_embedding.weight; the checkpoint is inconsistent, re-save it")
    return out


def _check_exportable(cfg: VLMConfig) -> None:
    """Refuse (one line, before anything is written) what upstream's code would compute differently."""
    v, l, ic = cfg.vision, cfg.language, cfg.image
    reasons = []
    if v.kind != "siglip" or v.use_cls or v.n_registers or v.gated_mlp or v.layer_scale or v.rope_theta is not None:
        reasons.append(f"its vision encoder is {v.kind} (upstream runs a plain SigLIP ViT)")
    if (l.norm_unit_offset or l.qk_norm or l.post_norms or l.embed_scale or l.act != "silu" or l.sliding_window
            or l.attention_bias or l.head_dim_override or l.rope_scaling_factor != 1.0):
        reasons.append("its decoder is not a plain Llama (upstream has no Gemma features)")
    if ic.mean is not None:
        reasons.append("it normalises pixels (upstream feeds ToTensor() pixels in [0, 1])")
    if ic.mode == "aspect" or (ic.mode == "fixed") != (ic.resample == "bilinear"):
        reasons.append(f"its image layout ({ic.mode}, {ic.resample}) is not upstream's (fixed + bilinear or tiles + "
                       "bicubic)")
    if cfg.chat_template == "gemma" or (cfg.chat_template == "plain" and ic.mode != "fixed"):
        reasons.append(f"its chat template {cfg.chat_template} with {ic.mode} images never existed upstream")
    if reasons:
        raise CheckpointError("cannot write this model in upstream nanoVLM's format: " + "; ".join(reasons)
                              + "; keep it in nanovlm's own format")


def _extra_tokens(cfg: VLMConfig) -> dict[str, str]:
    """`vlm_extra_tokens` in upstream's order (the order its tokenizer assigns ids)."""
    extra = {"image_token": cfg.image_token}
    if cfg.image.mode == "tiles" and cfg.image.global_view:
        extra["global_image_token"] = cfg.global_image_token
    if cfg.image.mode == "tiles":  # upstream always lists the full 8x8 table; ours has max_grid x max_grid
        extra.update({f"r{t[5:].split('_col_')[0]}c{t.split('_col_')[1][:-1]}": t for t in cfg.tile_tokens})
    return extra


def to_upstream(model_state: Mapping[str, torch.Tensor], cfg: VLMConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our weights and config as upstream nanoVLM's `save_pretrained` writes them (config.json, model.safetensors).

    As the original: the tied embedding stored once as `decoder.head.weight` (safetensors' `save_model` drops the
    duplicate name), the RoPE `inv_freq` buffer saved, `lm_vocab_size` = base vocabulary + extra tokens, and exactly
    the config keys of the generation whose code computes this model (plain prompt: v0.2; ChatML with one view:
    2025-07; tiles only: 2025-08; a global view: current main). Raises CheckpointError for a model upstream's code
    would compute differently.
    """
    _check_exportable(cfg)
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
        if template not in table:
            continue  # buffers of ours (e.g. RoPE tables) that upstream recomputes
        prefix = "vision_encoder." if part == "vision" else "decoder."
        state[prefix + table[template].replace("{i}", index or "")] = tensor
    for (index, kind), parts in qkv.items():
        state[f"vision_encoder.blocks.{index}.attn.qkv_proj.{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    v, l = cfg.vision, cfg.language
    extra = _extra_tokens(cfg)
    rows = l.vocab_size + len(extra)  # upstream's embedding: base vocabulary + its extra tokens, nothing more
    for name in ("decoder.token_embedding.weight", "decoder.head.weight"):
        if name in state:
            state[name] = state[name][:rows]
    if l.tie_embeddings and "decoder.token_embedding.weight" in state:
        state["decoder.head.weight"] = state.pop("decoder.token_embedding.weight")
    state["decoder.rotary_embd.inv_freq"] = 1.0 / (l.rope_theta ** (torch.arange(0, l.head_dim, 2).float() / l.head_dim))
    config: dict[str, Any] = {
        "vit_hidden_dim": v.hidden_dim, "vit_inter_dim": v.intermediate_dim, "vit_patch_size": v.patch_size,
        "vit_img_size": v.image_size, "vit_n_heads": v.n_heads, "vit_dropout": 0.0, "vit_n_blocks": v.n_layers,
        "vit_ln_eps": v.layer_norm_eps, "vit_cls_flag": False, "vit_model_type": v.hub_id or "",
        "lm_hidden_dim": l.hidden_dim, "lm_inter_dim": l.intermediate_dim, "lm_rms_eps": l.rms_norm_eps,
        "lm_re_base": l.rope_theta, "lm_max_position_embeddings": l.max_position_embeddings,
        "lm_base_vocab_size": l.vocab_size, "extra_token_amount": len(extra), "lm_vocab_size": rows,
        "lm_n_heads": l.n_heads, "lm_n_kv_heads": l.n_kv_heads, "lm_dropout": 0.0, "lm_n_blocks": l.n_layers,
        "lm_attn_scaling": 1.0, "lm_max_length": l.max_position_embeddings, "lm_use_tokens": False,
        "lm_tie_weights": l.tie_embeddings, "lm_model_type": l.hub_id or "", "lm_tokenizer": l.tokenizer_source,
    }
    # the keys of the generation whose code computes this model (each generation's VLMConfig refuses unknown keys)
    ic = cfg.image
    if cfg.chat_template == "plain":  # v0.2: placeholders before a plain "Question: ... Answer:" prompt
        config["lm_eos_token_id"] = l.eos_token_id if l.eos_token_id is not None else 0
    else:
        config["lm_chat_template"] = _CHATML
    config.update({"mp_pixel_shuffle_factor": cfg.projector.pixel_shuffle_factor,
                   "mp_image_token_length": cfg.image_tokens_per_tile})
    if ic.mode == "tiles":
        config["max_img_size"] = ic.max_side
        if ic.global_view or ic.fill_max_side:  # current main; tiles without either are the 2025-08 generation
            config["resize_to_max_side_len"] = ic.fill_max_side
    config.update({"vlm_extra_tokens": extra, "vlm_load_backbone_weights": False,
                   "vlm_checkpoint_path": "checkpoints", "hf_repo_name": "nanoVLM"})
    return config, state


def save_upstream(model_state: Mapping[str, torch.Tensor], cfg: VLMConfig, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` in upstream nanoVLM's format (see `to_upstream`)."""
    from safetensors.torch import save_file

    config, state = to_upstream(model_state, cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=4))
    save_file({k: t.detach().to("cpu").contiguous() for k, t in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory
