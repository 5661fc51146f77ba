import json

import pytest

from nanovlm_cli.config import ImageConfig, LanguageConfig, ProjectorConfig, TrainConfig, VisionConfig, VLMConfig
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.presets import DINOV3_MODELS, PRESETS, get_preset, with_backbones


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name):
    preset = get_preset(name)
    model = VLMConfig.from_dict(json.loads(preset.model.to_json()))
    train = TrainConfig.from_dict(json.loads(preset.train.to_json()))
    assert model == preset.model
    assert train == preset.train
    # a SmolVLM checkpoint's vocabulary holds its image tokens already: no extra rows
    assert model.language.extra_vocab_size == (0 if model.hub_id else len(model.extra_tokens))


def test_default_preset_has_64_tokens_per_tile_and_4x4_idefics3_tiles():
    cfg = get_preset("default").model
    assert cfg.image_tokens_per_tile == 64
    assert cfg.image.mode == "idefics3" and cfg.image_token == "<image>"  # exportable to transformers (issue 15)
    assert len(cfg.tile_tokens) == 16 and cfg.tile_tokens[0] == "<row_1_col_1>" and cfg.tile_tokens[-1] == "<row_4_col_4>"
    assert 400e6 < cfg.n_params_estimate() < 520e6


def test_original_small_is_the_222m_model():
    assert 210e6 < get_preset("original_small").model.n_params_estimate() < 235e6


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: LanguageConfig(hidden_dim=100, n_heads=3), "n_heads"),
        (lambda: LanguageConfig(n_heads=9, n_kv_heads=2), "n_kv_heads"),
        (lambda: VisionConfig(image_size=230, patch_size=16), "image_size"),
        (lambda: VisionConfig(hidden_dim=100, n_heads=3), "n_heads"),
        (lambda: VLMConfig(vision=VisionConfig(image_size=224, patch_size=16), image=ImageConfig(tile_size=224),
                           projector=ProjectorConfig(pixel_shuffle_factor=4),
                           language=LanguageConfig(extra_vocab_size=2)), "pixel_shuffle_factor"),
        (lambda: LanguageConfig(n_layers=2, layer_types=("sliding_attention", "full_attention")), "sliding_window"),
        (lambda: TrainConfig(batch_size=0), "batch_size"),
        (lambda: TrainConfig(report_to="mlflow"), "report_to"),
    ],
)
def test_impossible_config_fails_naming_the_field(build, field):
    with pytest.raises(ConfigError, match=field):
        build()


def test_unknown_field_in_dict_is_named():
    data = get_preset("tiny").model.to_dict()
    data["vision"]["n_layer"] = 3
    with pytest.raises(ConfigError, match="n_layer"):
        VLMConfig.from_dict(data)


def test_with_backbones_swaps_encoder_and_processing():
    base = get_preset("default").model
    dino = with_backbones(base, vision_encoder="dinov3", dinov3_model="vitb16", language_model="gemma")
    assert dino.vision == DINOV3_MODELS["vitb16"]
    assert dino.image.mode == "aspect" and dino.image.mean == (0.485, 0.456, 0.406)
    assert dino.chat_template == "gemma" and dino.language.embed_scale
    assert dino.language.extra_vocab_size == len(dino.extra_tokens) == 2
    assert base.vision.kind == "siglip"  # the input is not mutated
    assert with_backbones(base, dinov3_model="vitl14").vision == DINOV3_MODELS["vitl16"]
    with pytest.raises(ConfigError, match="vision-encoder"):
        with_backbones(base, vision_encoder="clip")
