"""resolve_run_config: preset -> backbones -> config file -> flag overrides, validated, preset untouched."""

import json

import pytest

from nanovlm_cli.config import TrainConfig
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.presets import PRESETS, get_preset
from nanovlm_cli.run_config import TRAIN_FIELDS, resolve_run_config


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_preset_alone_gives_the_preset_configs():
    model, train = resolve_run_config("tiny")
    assert model == get_preset("tiny").model
    assert train == get_preset("tiny").train


def test_resolving_never_mutates_the_preset(tmp_path):
    before = {name: (p.model.to_dict(), p.train.to_dict()) for name, p in PRESETS.items()}
    cfg = write(tmp_path, "run.toml", "batch_size = 3\n[model.language]\nintermediate_dim = 256\n")
    resolve_run_config("tiny", config_file=cfg, overrides={"max_steps": 7}, language_model="gemma")
    after = {name: (p.model.to_dict(), p.train.to_dict()) for name, p in PRESETS.items()}
    assert after == before


def test_toml_file_sets_train_fields_and_merges_model_table(tmp_path):
    cfg = write(tmp_path, "run.toml", 'batch_size = 3\nrun_name = "x"\n[model]\nchat_template = "plain"\n'
                                      "[model.language]\nn_layers = 2\n")
    model, train = resolve_run_config("tiny", config_file=cfg)
    assert (train.batch_size, train.run_name) == (3, "x")
    assert model.chat_template == "plain"
    assert model.language.n_layers == 2
    assert model.language.hidden_dim == get_preset("tiny").model.language.hidden_dim  # merged, not replaced


def test_json_file_with_model_key(tmp_path):
    data = {"max_steps": 11, "model": {"projector": {"pixel_shuffle_factor": 1}}}
    cfg = write(tmp_path, "run.json", json.dumps(data))
    model, train = resolve_run_config("tiny", config_file=cfg)
    assert train.max_steps == 11
    assert model.projector.pixel_shuffle_factor == 1


def test_extra_vocab_is_resized_when_the_file_changes_the_image_tokens(tmp_path):
    cfg = write(tmp_path, "run.toml", '[model.image]\nmode = "tiles"\nmax_grid = 2\n')
    model, _ = resolve_run_config("tiny", config_file=cfg)
    assert model.language.extra_vocab_size == len(model.extra_tokens) == 2 + 4


def test_flags_override_the_file_and_none_means_not_given(tmp_path):
    cfg = write(tmp_path, "run.toml", "batch_size = 3\nmax_steps = 9\n")
    _, train = resolve_run_config("tiny", config_file=cfg, overrides={"batch_size": 5, "max_steps": None})
    assert (train.batch_size, train.max_steps) == (5, 9)


def test_unknown_field_in_file_is_named(tmp_path):
    cfg = write(tmp_path, "run.toml", "batch_sise = 3\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        resolve_run_config("tiny", config_file=cfg)


def test_unknown_model_field_in_file_is_named(tmp_path):
    cfg = write(tmp_path, "run.toml", "[model.language]\nn_layer = 2\n")
    with pytest.raises(ConfigError, match="n_layer"):
        resolve_run_config("tiny", config_file=cfg)


def test_bad_value_in_file_fails_naming_the_field(tmp_path):
    cfg = write(tmp_path, "run.toml", "batch_size = 0\n")
    with pytest.raises(ConfigError, match="batch_size"):
        resolve_run_config("tiny", config_file=cfg)


def test_missing_and_unparsable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_run_config("tiny", config_file=str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not parse"):
        resolve_run_config("tiny", config_file=write(tmp_path, "bad.toml", "batch_size = = 3\n"))


def test_text_none_unsets_optional_text_fields(tmp_path):
    cfg = write(tmp_path, "run.toml", 'hf_repo_name = "me/my-vlm"\n')
    _, train = resolve_run_config("tiny", config_file=cfg)
    assert train.hf_repo_name == "me/my-vlm"
    _, train = resolve_run_config("tiny", config_file=cfg, overrides={"hf_repo_name": "None"})
    assert train.hf_repo_name is None


def test_backbone_selectors_from_file_and_flags_win(tmp_path):
    cfg = write(tmp_path, "run.toml", 'language_model = "gemma"\nvision_encoder = "dinov2"\n')
    model, _ = resolve_run_config("default", config_file=cfg)
    assert (model.language.hub_id, model.vision.kind) == ("google/gemma-3-270m-it", "dinov2")
    model, _ = resolve_run_config("default", config_file=cfg, language_model="llama", dinov3_model="vitb16")
    assert model.language.hub_id == "HuggingFaceTB/SmolLM2-135M"
    assert model.vision.hub_id == "facebook/dinov3-vitb16-pretrain-lvd1689m"


def test_unknown_override_and_unknown_preset_are_rejected():
    with pytest.raises(ConfigError, match="batch_sise"):
        resolve_run_config("tiny", overrides={"batch_sise": 3})
    with pytest.raises(ConfigError, match="tinyy"):
        resolve_run_config("tinyy")


def test_train_fields_are_the_dataclass_fields():
    assert set(TRAIN_FIELDS) == set(TrainConfig().to_dict())
