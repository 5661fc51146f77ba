"""Named presets: a model config and a training config users select with `--preset NAME`.

Presets are data, not code paths: each is a `VLMConfig` + `TrainConfig` pair built from the backbone tables
below. `--vision-encoder`, `--dinov3-model` and `--language-model` swap one backbone of a preset for another;
the functions here return new configs and never mutate the ones they are given.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovlm_cli.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageConfig,
    LanguageConfig,
    ProjectorConfig,
    TrainConfig,
    VisionConfig,
    VLMConfig,
)
from nanovlm_cli.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: VLMConfig
    train: TrainConfig


# --- Backbones (architecture values as published; re-read from the backbone's config.json at load time) ---

SIGLIP_BASE_224 = VisionConfig(kind="siglip", hub_id="google/siglip-base-patch16-224", image_size=224)
SIGLIP2_BASE_512 = VisionConfig(kind="siglip", hub_id="google/siglip2-base-patch16-512", image_size=512)
DINOV2_VITS14 = VisionConfig(
    kind="dinov2", hub_id="facebook/dinov2-vits14", image_size=518, patch_size=14, hidden_dim=384,
    intermediate_dim=1536, n_heads=6, act="gelu", use_cls=True, layer_scale=True,
)
DINOV3_MODELS: dict[str, VisionConfig] = {
    "vits16": VisionConfig(
        kind="dinov3", hub_id="facebook/dinov3-vits16-pretrain-lvd1689m", hidden_dim=384, intermediate_dim=1536,
        n_heads=6, act="gelu", use_cls=True, n_registers=4, layer_scale=True, rope_theta=100.0,
        layer_norm_eps=1e-5, qkv_bias=(True, False, True),
    ),
    "vits16plus": VisionConfig(
        kind="dinov3", hub_id="facebook/dinov3-vits16plus-pretrain-lvd1689m", hidden_dim=384, intermediate_dim=1536,
        n_heads=6, act="silu", gated_mlp=True, use_cls=True, n_registers=4, layer_scale=True, rope_theta=100.0,
        layer_norm_eps=1e-5, qkv_bias=(True, False, True),
    ),
    "vitb16": VisionConfig(
        kind="dinov3", hub_id="facebook/dinov3-vitb16-pretrain-lvd1689m", hidden_dim=768, intermediate_dim=3072,
        n_heads=12, act="gelu", use_cls=True, n_registers=4, layer_scale=True, rope_theta=100.0,
        layer_norm_eps=1e-5, qkv_bias=(True, False, True),
    ),
    "vitl16": VisionConfig(
        kind="dinov3", hub_id="facebook/dinov3-vitl16-pretrain-lvd1689m", hidden_dim=1024, intermediate_dim=4096,
        n_layers=24, n_heads=16, act="gelu", use_cls=True, n_registers=4, layer_scale=True, rope_theta=100.0,
        layer_norm_eps=1e-5, qkv_bias=(True, False, True),
    ),
}
# DINOv3 ViT-L uses 16 px patches; "vitl14" is accepted as the name users sometimes type for it.
DINOV3_ALIASES = {"vitl14": "vitl16"}

SMOLLM2_135M = LanguageConfig(hub_id="HuggingFaceTB/SmolLM2-135M")
SMOLLM2_360M_INSTRUCT = LanguageConfig(
    hub_id="HuggingFaceTB/SmolLM2-360M-Instruct", hidden_dim=960, intermediate_dim=2560, n_layers=32, n_heads=15,
    n_kv_heads=5,
)
GEMMA3_270M_IT = LanguageConfig(
    hub_id="google/gemma-3-270m-it", vocab_size=262144, hidden_dim=640, intermediate_dim=2048, n_layers=18,
    n_heads=4, n_kv_heads=1, head_dim_override=256, max_position_embeddings=32768, rope_theta=1_000_000.0,
    rope_local_theta=10_000.0, rms_norm_eps=1e-6, norm_unit_offset=True, qk_norm=True, post_norms=True,
    embed_scale=True, act="gelu_tanh", sliding_window=512, query_pre_attn_scalar=256,
    layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)),
    bos_token_id=2, eos_token_id=106,
)
LANGUAGE_MODELS: dict[str, LanguageConfig] = {
    "smollm": SMOLLM2_360M_INSTRUCT,
    "llama": SMOLLM2_135M,
    "gemma": GEMMA3_270M_IT,
}


def _with_extra_vocab(model: VLMConfig) -> VLMConfig:
    """Size the extra embedding rows to exactly the extra tokens of this model's image processing, and fix the image
    token id a tokenizer of `vocab_size` tokens gives it: the extra tokens are appended after the vocabulary, in order
    (`data.tokenizer.add_extra_tokens`). So a preset's model is buildable from its config alone (memory estimates);
    the tokenizer a model is created with has the last word (`checkpoint.io.build_model`)."""
    n_extra = len(model.extra_tokens)
    language = model.language.replace(extra_vocab_size=n_extra)
    image_token_id = language.vocab_size + model.extra_tokens.index(model.image_token)
    return VLMConfig.from_dict({**model.to_dict(), "language": language.to_dict(), "image_token_id": image_token_id})


def _vlm(**kwargs) -> VLMConfig:
    # Build with a generous extra vocabulary first, then size it exactly.
    language = kwargs.pop("language")
    draft = VLMConfig(language=language.replace(extra_vocab_size=10_000), **kwargs)
    return _with_extra_vocab(draft)


# New SigLIP models train in the Idefics3 layout (transformers' Idefics3Processor, SmolVLM's 512px tiles and 2048px
# longest edge) with SigLIP's own normalisation, so `nanovlm export` can hand them to transformers exactly.
IDEFICS3_IMAGE = ImageConfig(mode="idefics3", tile_size=512, max_side=2048, max_grid=4)
IDEFICS3_TOKENS = {"image_token": "<image>", "global_image_token": "<global-img>"}


def _chat_template_for(language: LanguageConfig) -> str:
    return "gemma" if language.embed_scale else "chatml"


def _tiny_model() -> VLMConfig:
    return _vlm(
        vision=VisionConfig(
            kind="siglip", image_size=64, patch_size=8, hidden_dim=96, intermediate_dim=384, n_layers=3, n_heads=4,
        ),
        language=LanguageConfig(
            tokenizer="builtin:tiny", vocab_size=512, hidden_dim=128, intermediate_dim=384, n_layers=4, n_heads=4,
            n_kv_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
        ),
        projector=ProjectorConfig(pixel_shuffle_factor=2),
        image=ImageConfig(mode="fixed", tile_size=64),
        chat_template="chatml",
        max_images_per_sample=2,
    )


# --- SmolVLM (transformers' Idefics3/SmolVLM checkpoints), fine-tuned from the published weights ---
# The architecture values below are the published ones, for --dry-run and vram; loading reads the checkpoint's own
# config.json, image-processor settings and chat template (checkpoint.idefics3), which win. The 2B models
# (SmolVLM-Instruct, SmolVLM2-2.2B) are not here: their 384 px tiles are not a whole number of 14 px patches
# (transformers drops the last 6 px), which our encoder refuses.

SMOLVLM_CHAT_TEMPLATE = (  # SmolVLM-Instruct's, as its processor ships it
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] =="
    " 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' "
    "%}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_SIGLIP_B16_512 = VisionConfig(kind="siglip", image_size=512, patch_size=16)
_SMOLLM2_135M = LanguageConfig(vocab_size=49280, tie_embeddings=False)
_SMOLLM2_360M = LanguageConfig(vocab_size=49280, hidden_dim=960, intermediate_dim=2560, n_layers=32, n_heads=15,
                               n_kv_heads=5, tie_embeddings=False)


def _smolvlm(hub_id: str, vision: VisionConfig, language: LanguageConfig, factor: int, longest_edge: int) -> VLMConfig:
    """A SmolVLM checkpoint as our config: the Idefics3 image layout and chat template, its whole vocabulary."""
    return VLMConfig(
        hub_id=hub_id, vision=vision, language=language.replace(tokenizer=hub_id),
        projector=ProjectorConfig(pixel_shuffle_factor=factor),
        image=ImageConfig(mode="idefics3", tile_size=vision.image_size, max_side=longest_edge,
                          max_grid=longest_edge // vision.image_size, resample="lanczos"),
        chat_template="jinja", jinja_template=SMOLVLM_CHAT_TEMPLATE, end_of_turn="<end_of_utterance>",
        image_token="<image>", global_image_token="<global-img>", image_token_id=49190,  # <image> in their vocabulary
    )


def _smolvlm_train() -> TrainConfig:
    # a fine-tune of a trained model: small learning rates for all parts, the projector's too
    return TrainConfig(dataset="HuggingFaceM4/the_cauldron", dataset_config="vqav2", max_seq_len=2048, batch_size=4,
                       gradient_accumulation_steps=4, max_steps=2000, lr_mp=1e-5, lr_vision=1e-5, lr_language=2e-5)


_SMOLVLM_PRESETS = {
    "smolvlm-256m": ("HuggingFaceTB/SmolVLM-256M-Instruct", _SIGLIP_B16_512, _SMOLLM2_135M, 4, 2048),
    "smolvlm-500m": ("HuggingFaceTB/SmolVLM-500M-Instruct", _SIGLIP_B16_512, _SMOLLM2_360M, 4, 2048),
    "smolvlm2-256m": ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", _SIGLIP_B16_512, _SMOLLM2_135M, 4, 2048),
    "smolvlm2-500m": ("HuggingFaceTB/SmolVLM2-500M-Video-Instruct", _SIGLIP_B16_512, _SMOLLM2_360M, 4, 2048),
}


PRESETS: dict[str, Preset] = {
    "default": Preset(
        "default",
        "SigLIP2-base-512 + SmolLM2-360M-Instruct in the Idefics3 layout (exports to transformers): up to 4x4 tiles "
        "of 512px + the global view, 64 tokens per tile",
        _vlm(
            vision=SIGLIP2_BASE_512,
            language=SMOLLM2_360M_INSTRUCT,
            projector=ProjectorConfig(pixel_shuffle_factor=4),
            image=IDEFICS3_IMAGE,
            **IDEFICS3_TOKENS,
        ),
        TrainConfig(dataset="HuggingFaceM4/FineVision", max_seq_len=4096, batch_size=2,
                    gradient_accumulation_steps=8, max_steps=40000),
    ),
    "original_small": Preset(
        "original_small",
        "SigLIP-base-224 + SmolLM2-135M (the 222M nanoVLM), fixed 224px images, 49 tokens per image",
        _vlm(
            vision=SIGLIP_BASE_224,
            language=SMOLLM2_135M,
            projector=ProjectorConfig(pixel_shuffle_factor=2),
            image=ImageConfig(mode="fixed", tile_size=224, mean=None, std=None),
        ),
        TrainConfig(dataset="HuggingFaceM4/the_cauldron", dataset_config="vqav2", max_seq_len=1024,
                    batch_size=8, max_steps=5000),
    ),
    "dinov3_gemma": Preset(
        "dinov3_gemma",
        "DINOv3 ViT-S+/16 + Gemma-3-270M-it, aspect-preserving resize up to 1024px, dynamic token grid",
        _vlm(
            vision=DINOV3_MODELS["vits16plus"],
            language=GEMMA3_270M_IT,
            projector=ProjectorConfig(pixel_shuffle_factor=4),
            image=ImageConfig(mode="aspect", tile_size=224, max_side=1024, multiple_of=64,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD),
            chat_template="gemma",
        ),
        TrainConfig(dataset="HuggingFaceM4/FineVision", max_seq_len=4096, batch_size=2,
                    gradient_accumulation_steps=8, max_steps=20000),
    ),
    "dinov2_smollm": Preset(
        "dinov2_smollm",
        "DINOv2 ViT-S/14 at 224px + SmolLM2-135M",
        _vlm(
            vision=DINOV2_VITS14,
            language=SMOLLM2_135M,
            projector=ProjectorConfig(pixel_shuffle_factor=2),
            image=ImageConfig(mode="fixed", tile_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ),
        TrainConfig(dataset="HuggingFaceM4/the_cauldron", dataset_config="vqav2", max_seq_len=1024,
                    batch_size=8, max_steps=5000),
    ),
    "tiny": Preset(
        "tiny",
        "A ~1M-parameter from-scratch VLM trained on the built-in shapes dataset; runs offline on a CPU",
        _tiny_model(),
        # Four questions per image (more supervised answers per encoded image) and short answers only: measured,
        # a from-scratch model this size does not learn the option-letter lookup of multiple-choice answers within
        # the 5-minute CPU budget, and mixing them in slows down learning what is in the image.
        TrainConfig(dataset="shapes", dataset_size=6000, shapes_turns=4, shapes_multiple_choice=0.0,
                    max_seq_len=256, batch_size=16, max_steps=1200, lr_mp=1e-3, lr_vision=1e-3, lr_language=1e-3,
                    warmup_ratio=0.05, save_checkpoint_steps=400, validation_steps=200, console_log_interval=50,
                    eval_size=200, num_workers=2),
    ),
}
PRESETS.update({
    name: Preset(name, f"fine-tune {hub_id} (transformers' {'SmolVLM' if '2' in name else 'Idefics3'} format) from "
                 "its published weights, its own image layout and chat template", _smolvlm(hub_id, *rest),
                 _smolvlm_train())
    for name, (hub_id, *rest) in _SMOLVLM_PRESETS.items()
})


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def with_backbones(
    model: VLMConfig,
    *,
    vision_encoder: str | None = None,
    dinov3_model: str | None = None,
    language_model: str | None = None,
) -> VLMConfig:
    """Swap the vision encoder and/or language model of `model`, keeping its projector.

    Image processing follows the encoder: DINOv3 gets aspect-preserving resize with ImageNet statistics,
    DINOv2 a fixed 224px resize, SigLIP keeps the preset's processing when it already is SigLIP. A model that starts
    from whole pretrained weights (`model.hub_id`, the SmolVLM presets) keeps its backbones.
    """
    if model.hub_id is not None:
        if vision_encoder or dinov3_model or language_model:
            raise ConfigError(f"this preset fine-tunes the whole checkpoint {model.hub_id}, whose backbones cannot be "
                              "swapped; drop --vision-encoder/--dinov3-model/--language-model or pick another preset")
        return model
    vision, image = model.vision, model.image
    if dinov3_model is not None and vision_encoder is None:
        vision_encoder = "dinov3"
    if vision_encoder is not None:
        if vision_encoder == "siglip":
            if vision.kind != "siglip":
                vision, image = SIGLIP2_BASE_512, IDEFICS3_IMAGE
        elif vision_encoder == "dinov2":
            vision = DINOV2_VITS14
            image = ImageConfig(mode="fixed", tile_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        elif vision_encoder == "dinov3":
            size = DINOV3_ALIASES.get(dinov3_model or "vits16plus", dinov3_model or "vits16plus")
            if size not in DINOV3_MODELS:
                raise ConfigError(f"unknown --dinov3-model {dinov3_model!r}; choose one of {', '.join(DINOV3_MODELS)}")
            vision = DINOV3_MODELS[size]
            image = ImageConfig(mode="aspect", tile_size=224, max_side=1024, multiple_of=64,
                                mean=IMAGENET_MEAN, std=IMAGENET_STD)
        else:
            raise ConfigError(f"unknown --vision-encoder {vision_encoder!r}; choose one of siglip, dinov2, dinov3")
    language = model.language
    if language_model is not None:
        if language_model not in LANGUAGE_MODELS:
            raise ConfigError(
                f"unknown --language-model {language_model!r}; choose one of {', '.join(LANGUAGE_MODELS)}"
            )
        language = LANGUAGE_MODELS[language_model]
    data = model.to_dict()
    if image.mode == "idefics3" and model.image.mode != "idefics3":
        data.update(IDEFICS3_TOKENS)
    data.update(
        vision=vision.to_dict(),
        image=image.to_dict(),
        language=language.replace(extra_vocab_size=10_000).to_dict(),
        chat_template=_chat_template_for(language) if language_model else model.chat_template,
    )
    return _with_extra_vocab(VLMConfig.from_dict(data))
