"""Idefics3 / SmolVLM checkpoints (transformers' `Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

Both hold exactly our architecture: a SigLIP ViT (`model.vision_model.*`, separate q/k/v, `post_layernorm`), a
pixel shuffle by `scale_factor` then one bias-free linear (`model.connector.modality_projection.proj.weight`), and a
Llama decoder (`model.text_model.*`, `lm_head.weight` unless tied). The key table is a strict two-way mapping built
from the SigLIP and Llama tables of `hf_vision` / `hf_language`: an unknown key or a missing key is an error naming
it, in both directions. Only two tensors change layout: the position table is (g*g, D) there and (1, g*g, D) here,
and a tied `lm_head.weight` is not stored here.

The public functions, both directions: `key_table` (theirs -> ours), `idefics3_to_ours` / `ours_to_idefics3` (state
dicts), `config_from_idefics3` / `read_idefics3_config` (config.json + image processor + chat template -> VLMConfig)
and `idefics3_config` / `image_processor_config` (VLMConfig -> their config.json / image-processor fields).
`checkpoint.io` loads these checkpoints through `checkpoint_kind` ("idefics3") like any other.

Facts checked against transformers' own code (and by tests/test_idefics3.py):
- `Idefics3Connector.pixel_shuffle` groups f x f blocks with channels ordered (row-in-block, col-in-block, C) and
  tokens row-major over the blocks, which is `models.projector.pixel_shuffle`, so the projector maps 1:1.
- `Idefics3VisionEmbeddings` looks positions up through `bucketize` of fractional patch coordinates. For a full tile
  of a grid n x n that is the identity for the grids the published models use (26, 27, 32) but not for every n
  (n = 19: patch 12 reads position 11), so `full_tile_position_ids` reproduces it and an n for which it is not the
  identity is refused instead of loaded wrongly. Tiles must be the encoder's resolution (`max_image_size` equal to
  the vision `image_size`): their positions are never interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nanovlm_cli.checkpoint.files import read_json
from nanovlm_cli.checkpoint.hf_language import _key_table as language_key_table
from nanovlm_cli.checkpoint.hf_language import language_config_from_hf
from nanovlm_cli.checkpoint.hf_vision import KEY_TABLES as VISION_KEY_TABLES
from nanovlm_cli.checkpoint.hf_vision import vision_config_from_hf
from nanovlm_cli.config import ImageConfig, ProjectorConfig, VLMConfig
from nanovlm_cli.errors import CheckpointError

MODEL_TYPES = ("idefics3", "smolvlm")
VISION_PREFIX = "model.vision_model."
TEXT_PREFIX = "model.text_model."
PROJECTOR_KEY = "model.connector.modality_projection.proj.weight"
HEAD_KEY = "lm_head.weight"
MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the resized longest edge

# Defaults of transformers' Idefics3VisionConfig / SmolVLMVisionConfig (not SigLIP's): a config.json omits them.
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# PIL's resampling codes as image-processor configs store them
_RESAMPLE = {1: "lanczos", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_CODES = {name: code for code, name in _RESAMPLE.items()}


def is_idefics3_config(config: Mapping[str, Any]) -> bool:
    """Whether a `config.json` is transformers' Idefics3 or SmolVLM (model_type idefics3 / smolvlm)."""
    return config.get("model_type") in MODEL_TYPES


# ----------------------------------------------------------------------------------------------------------------
# The key table


def key_table(cfg: VLMConfig) -> dict[str, str]:
    """Every Idefics3/SmolVLM state-dict key this config has -> our `VisionLanguageModel` key.

    The table is complete (the same set both ways); a tied model has no `lm_head.weight` entry (transformers does not
    store it either).
    """
    table: dict[str, str] = {}
    for theirs, ours in VISION_KEY_TABLES["siglip"].items():
        if "{}" in theirs:
            for i in range(cfg.vision.n_layers):
                table[VISION_PREFIX + theirs.format(i)] = "vision." + ours.format(i)
        else:
            table[VISION_PREFIX + theirs] = "vision." + ours
    table[PROJECTOR_KEY] = "projector.proj.weight"
    for theirs, ours in language_key_table(cfg.language, TEXT_PREFIX).items():
        table[theirs] = "language." + ours
    if not cfg.language.tie_embeddings:
        table[HEAD_KEY] = "language.lm_head.weight"
    return table


def _missing_or_unknown(found: set[str], expected: set[str], what: str) -> None:
    unknown, missing = sorted(found - expected), sorted(expected - found)
    if unknown:
        raise CheckpointError(f"unknown tensor {unknown[0]} in {what}" + (f" (and {len(unknown) - 1} more)" if
                              len(unknown) > 1 else "") + "; it does not fit the Idefics3/SmolVLM layout of its "
                              "config.json")
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]} in {what}" + (f" (and {len(missing) - 1} more)" if
                              len(missing) > 1 else "") + "; the checkpoint is incomplete or does not match its "
                              "config.json")


def idefics3_to_ours(state: Mapping[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """Idefics3/SmolVLM tensors -> our names and layouts (strict: an unknown or a missing key raises, naming it).

    A tied checkpoint may still carry `lm_head.weight` (some writers keep both names): it must then equal the
    embedding, and is dropped.
    """
    table = key_table(cfg)
    state = dict(state)
    if cfg.language.tie_embeddings and HEAD_KEY in state:
        head = state.pop(HEAD_KEY)
        embed = state.get(TEXT_PREFIX + "embed_tokens.weight")
        if embed is not None and not torch.equal(head, embed):
            raise CheckpointError("tie_word_embeddings is true but lm_head.weight differs from "
                                  "model.text_model.embed_tokens.weight; the checkpoint is inconsistent, re-save it")
    _missing_or_unknown(set(state), set(table), "the Idefics3/SmolVLM checkpoint")
    return dict(_to_ours(key, tensor, table) for key, tensor in state.items())


def _to_ours(key: str, tensor: torch.Tensor, table: Mapping[str, str]) -> tuple[str, torch.Tensor]:
    ours = table[key]
    if ours == "vision.pos_embed" and tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)  # (g*g, D) -> (1, g*g, D)
    return ours, tensor


def idefics3_tensor_to_ours(key: str, tensor: torch.Tensor, cfg: VLMConfig) -> tuple[str, torch.Tensor] | None:
    """One stored tensor under our name and layout (None for a key the table lacks), for checks such as `validate`
    that look at tensors one by one; loading goes through the strict `idefics3_to_ours`."""
    table = key_table(cfg)
    return _to_ours(key, tensor, table) if key in table else None


def ours_to_idefics3(state: Mapping[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """Our `VisionLanguageModel` tensors -> Idefics3/SmolVLM names and layouts (strict, the inverse of
    `idefics3_to_ours`: `idefics3_to_ours(ours_to_idefics3(s, cfg), cfg)` gives `s` back tensor for tensor)."""
    inverse = {ours: theirs for theirs, ours in key_table(cfg).items()}
    _missing_or_unknown(set(state), set(inverse), "our model's state dict")
    out = {inverse[key]: tensor for key, tensor in state.items()}
    pos_key = VISION_PREFIX + "embeddings.position_embedding.weight"
    out[pos_key] = out[pos_key].reshape(-1, out[pos_key].shape[-1])  # (1, g*g, D) -> (g*g, D)
    return out


def full_tile_position_ids(grid: int) -> torch.Tensor:
    """The position ids `Idefics3VisionEmbeddings` gives a full grid x grid tile (row-major), computed as it does."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    coords = torch.clamp(torch.arange(grid, dtype=torch.float32) * (1.0 / torch.tensor([grid]))[0], max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)  # (grid,)
    return (buckets[:, None] * grid + buckets[None, :]).reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# Configs


def _image_config(image_processor: Mapping[str, Any]) -> ImageConfig:
    """Our ImageConfig for an Idefics3/SmolVLM image-processor config (preprocessor_config.json)."""
    p = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
         "do_image_splitting": True, "resample": 1, "size": {"longest_edge": 4 * 364},
         "max_image_size": {"longest_edge": 364}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
         **{k: v for k, v in image_processor.items() if v is not None}}
    if not p["do_resize"] or not p["do_rescale"] or not math.isclose(p["rescale_factor"], 1 / 255):
        raise CheckpointError(f"image processor with do_resize={p['do_resize']}, do_rescale={p['do_rescale']}, "
                              f"rescale_factor={p['rescale_factor']} is not supported; only the published setting "
                              "(resize, rescale by 1/255) loads: fix preprocessor_config.json")
    resample = p["resample"]
    if resample not in _RESAMPLE:
        raise CheckpointError(f"image processor resample={resample!r} is not supported; use 1 (lanczos), 2 (bilinear) "
                              "or 3 (bicubic) in preprocessor_config.json")
    try:
        longest, tile = int(p["size"]["longest_edge"]), int(p["max_image_size"]["longest_edge"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"image processor size={p['size']!r} / max_image_size={p['max_image_size']!r} lack "
                              "'longest_edge'; only longest-edge sizes are supported") from exc
    normalise = bool(p["do_normalize"])
    return ImageConfig(mode="idefics3", tile_size=tile, max_side=longest, max_grid=max(1, math.ceil(longest / tile)),
                       resample=_RESAMPLE[resample], split=bool(p["do_image_splitting"]),
                       mean=tuple(p["image_mean"]) if normalise else None,
                       std=tuple(p["image_std"]) if normalise else None)


def config_from_idefics3(config: Mapping[str, Any], *, image_processor: Mapping[str, Any],
                         image_seq_len: int | None, chat_template: str | None) -> VLMConfig:
    """Our VLMConfig for an Idefics3/SmolVLM `config.json`, its image-processor settings and chat template.

    vision = our SigLIP encoder, language = our Llama decoder (the checkpoint's whole vocabulary, no extra rows),
    projector = pixel shuffle by `scale_factor` + the bias-free linear, images in the "idefics3" layout, the chat
    template rendered from its own Jinja source. Raises CheckpointError for what we would compute differently.
    """
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not idefics3 or smolvlm")
    vision_raw = {**_VISION_DEFAULTS, **dict(config.get("vision_config") or {})}
    if int(vision_raw["image_size"]) % int(vision_raw["patch_size"]):
        raise CheckpointError(f"vision image_size {vision_raw['image_size']} is not a multiple of patch_size "
                              f"{vision_raw['patch_size']} (transformers drops the remainder, e.g. SmolVLM-Instruct's "
                              "384 px tiles of 14 px patches); such checkpoints are not supported")
    vision = vision_config_from_hf({**vision_raw, "model_type": "siglip_vision_model"})
    text_raw = dict(config.get("text_config") or {})
    if not text_raw:
        raise CheckpointError(f"{model_type} config.json has no text_config; the checkpoint is incomplete")
    text_type = text_raw.get("model_type", "llama")
    if text_type != "llama":
        raise CheckpointError(f"{model_type} text_config.model_type={text_type!r} is not supported; only a Llama "
                              "decoder (SmolLM2) loads")
    # transformers 5 ties the head by the top-level flag (Idefics3Config: false unless set, and every config it
    # writes has it); a config without one (older writers) follows its text_config, as transformers 4 did
    tied = config.get("tie_word_embeddings")
    tied = bool(text_raw.get("tie_word_embeddings", False) if tied is None else tied)
    language = language_config_from_hf({**text_raw, "model_type": "llama", "tie_word_embeddings": tied})
    factor = int(config.get("scale_factor", 2))
    image = _image_config(image_processor)
    if image.tile_size != vision.image_size:
        raise CheckpointError(f"max_image_size {image.tile_size} differs from the vision image_size "
                              f"{vision.image_size}; tiles must be the encoder's resolution (positions are never "
                              "interpolated there), fix preprocessor_config.json")
    grid = vision.grid_size
    if not torch.equal(full_tile_position_ids(grid), torch.arange(grid * grid)):
        raise CheckpointError(f"a {grid}x{grid} patch grid gets non-identity position ids in transformers' "
                              "Idefics3 vision embeddings (bucketize rounding); this checkpoint cannot be run "
                              "exactly by our encoder")
    if not chat_template:
        raise CheckpointError("the checkpoint has no chat template (chat_template.jinja, chat_template.json, or "
                              "chat_template in tokenizer_config.json); it is needed to build prompts")
    cfg = VLMConfig(
        vision=vision, language=language, projector=ProjectorConfig(pixel_shuffle_factor=factor), image=image,
        chat_template="jinja", jinja_template=chat_template, end_of_turn=_end_of_turn(chat_template),
        image_token="<image>", global_image_token="<global-img>", fake_image_token="<fake_token_around_image>",
        image_token_id=config.get("image_token_id"), max_images_per_sample=8,
    )
    if image_seq_len is not None and image_seq_len != cfg.image_tokens_per_tile:
        raise CheckpointError(f"processor image_seq_len={image_seq_len} differs from the {cfg.image_tokens_per_tile} "
                              "tokens a tile makes ((image_size / patch_size)^2 / scale_factor^2); fix "
                              "processor_config.json")
    return cfg


# End-of-turn markers a chat template may close its turns with: SmolVLM's own, then ChatML and Gemma's (what
# `nanovlm export` writes for models trained with those templates).
END_OF_TURN_MARKERS = ("<end_of_utterance>", "<|im_end|>", "<end_of_turn>")


def _end_of_turn(chat_template: str) -> str:
    """The end-of-turn token the checkpoint's own template closes turns with (labels are masked up to it)."""
    return next((marker for marker in END_OF_TURN_MARKERS if marker in chat_template), END_OF_TURN_MARKERS[0])


def idefics3_config(cfg: VLMConfig) -> dict[str, Any]:
    """The Idefics3 `config.json` fields for our config (the inverse of `config_from_idefics3` for its fields)."""
    v, l = cfg.vision, cfg.language
    return {
        "model_type": "idefics3", "architectures": ["Idefics3ForConditionalGeneration"],
        "image_token_id": cfg.image_token_id, "scale_factor": cfg.projector.pixel_shuffle_factor,
        "tie_word_embeddings": l.tie_embeddings,
        "vision_config": {"model_type": "idefics3_vision", "hidden_size": v.hidden_dim,
                          "intermediate_size": v.intermediate_dim, "num_hidden_layers": v.n_layers,
                          "num_attention_heads": v.n_heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_act": "gelu_pytorch_tanh" if v.act == "gelu_tanh" else v.act,
                          "layer_norm_eps": v.layer_norm_eps},
        "text_config": {"model_type": "llama", "vocab_size": l.total_vocab_size, "hidden_size": l.hidden_dim,
                        "intermediate_size": l.intermediate_dim, "num_hidden_layers": l.n_layers,
                        "num_attention_heads": l.n_heads, "num_key_value_heads": l.n_kv_heads,
                        "head_dim": l.head_dim, "max_position_embeddings": l.max_position_embeddings,
                        "rope_theta": l.rope_theta, "rms_norm_eps": l.rms_norm_eps, "hidden_act": "silu",
                        "attention_bias": l.attention_bias, "tie_word_embeddings": l.tie_embeddings,
                        "bos_token_id": l.bos_token_id, "eos_token_id": l.eos_token_id},
    }


def image_processor_config(cfg: VLMConfig) -> dict[str, Any]:
    """The image-processor fields (preprocessor_config.json) that reproduce `cfg.image` ("idefics3" mode)."""
    ic = cfg.image
    if ic.mode != "idefics3":
        raise CheckpointError(f"image.mode={ic.mode!r} is not the idefics3 layout; only that layout has an Idefics3 "
                              "image processor")
    return {"do_resize": True, "size": {"longest_edge": ic.max_side}, "max_image_size": {"longest_edge": ic.tile_size},
            "resample": _RESAMPLE_CODES[ic.resample], "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": ic.mean is not None, "image_mean": list(ic.mean or (0.0, 0.0, 0.0)),
            "image_std": list(ic.std or (1.0, 1.0, 1.0)), "do_image_splitting": ic.split, "do_pad": True,
            "do_convert_rgb": True}


def read_processor_files(directory: str | Path) -> tuple[dict[str, Any], int | None, str | None]:
    """(image-processor settings, image_seq_len, Jinja chat template) of a checkpoint directory.

    The image-processor settings are `preprocessor_config.json` (the published repositories) or the `image_processor`
    table nested in `processor_config.json` (transformers 5); the chat template comes from `chat_template.jinja`,
    `chat_template.json`, `processor_config.json` or `tokenizer_config.json`, the first that has one.
    """
    directory = Path(directory)
    files = {name: read_json(directory / name) for name in ("processor_config.json", "preprocessor_config.json",
                                                             "chat_template.json", "tokenizer_config.json")
             if (directory / name).is_file()}
    processor = files.get("processor_config.json", {})
    image_processor = files.get("preprocessor_config.json") or processor.get("image_processor")
    if not isinstance(image_processor, dict):
        raise CheckpointError(f"{directory} has no image-processor settings (preprocessor_config.json, or "
                              "image_processor in processor_config.json); the checkpoint is incomplete")
    seq_len = processor.get("image_seq_len", image_processor.get("image_seq_len"))
    template = None
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if template is None and isinstance(files.get(name, {}).get("chat_template"), str):
            template = files[name]["chat_template"]
    return image_processor, None if seq_len is None else int(seq_len), template


def read_idefics3_config(config: Mapping[str, Any], directory: str | Path) -> VLMConfig:
    """Our VLMConfig for the Idefics3/SmolVLM checkpoint in `directory` whose parsed config.json is `config`."""
    image_processor, image_seq_len, chat_template = read_processor_files(directory)
    return config_from_idefics3(config, image_processor=image_processor, image_seq_len=image_seq_len,
                                chat_template=chat_template)
