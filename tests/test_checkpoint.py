import json

import pytest
import torch
from safetensors.torch import save_file

from nanovlm_cli.checkpoint import io as ckpt_io
from nanovlm_cli.checkpoint.io import build_model, load_model, save_model
from nanovlm_cli.checkpoint.upstream import to_upstream
from nanovlm_cli.config import ImageConfig, ProjectorConfig, VisionConfig
from nanovlm_cli.errors import CheckpointError
from nanovlm_cli.presets import _with_extra_vocab
from tests.helpers import tiny_config, tiny_model


def _inputs(model, n_images=1, n_text=6):
    ids = [torch.randint(5, 200, (n_text,))]
    for _ in range(n_images):
        ids.append(torch.full((model.cfg.image_tokens_per_tile,), model.cfg.image_token_id))
        ids.append(torch.randint(5, 200, (2,)))
    return torch.cat(ids)[None], [torch.rand(3, 64, 64) for _ in range(n_images)]


@torch.no_grad()
def test_save_then_load_reproduces_outputs_exactly_offline(tmp_path):
    loaded = tiny_model(seed=1)
    directory = save_model(loaded.model, tmp_path / "ckpt", tokenizer=loaded.tokenizer)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
    again = load_model(directory)
    ids, views = _inputs(loaded.model)
    loaded.model.eval()
    assert torch.equal(loaded.model(ids, views), again.model(ids, views))
    assert again.cfg == loaded.cfg
    assert again.tokenizer.convert_tokens_to_ids("<|image|>") == loaded.cfg.image_token_id


def test_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    loaded = tiny_model()
    target = save_model(loaded.model, tmp_path / "ckpt", tokenizer=loaded.tokenizer)
    before = (target / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_file", crash)
    with pytest.raises(OSError):
        save_model(loaded.model, target, tokenizer=loaded.tokenizer)
    assert (target / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_missing_weights_and_unknown_tensor_are_named(tmp_path):
    loaded = tiny_model()
    directory = save_model(loaded.model, tmp_path / "ckpt", tokenizer=loaded.tokenizer)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    state["vision.extra_thing"] = torch.zeros(2)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="vision.extra_thing"):
        load_model(directory)
    del state["vision.extra_thing"], state["projector.proj.weight"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="projector.proj.weight"):
        load_model(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(directory)


def _upstream_like_config():
    """A tiny model in upstream's shape: SigLIP ViT, tiles + global view, no normalisation."""
    base = tiny_config()
    data = base.to_dict()
    data["image"] = ImageConfig(mode="tiles", tile_size=64, max_side=128, max_grid=2, mean=None, std=None).to_dict()
    data["vision"] = VisionConfig(kind="siglip", image_size=64, patch_size=8, hidden_dim=64, intermediate_dim=128,
                                  n_layers=2, n_heads=4).to_dict()
    data["projector"] = ProjectorConfig(pixel_shuffle_factor=2).to_dict()
    data["language"]["extra_vocab_size"] = 100
    from nanovlm_cli.config import VLMConfig

    return _with_extra_vocab(VLMConfig.from_dict(data))


@torch.no_grad()
def test_upstream_checkpoint_loads_unchanged_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    native = build_model(_upstream_like_config(), load_backbones=False)
    native.model.eval()
    config, state = to_upstream(native.model.state_dict(), native.cfg)
    assert "vision_encoder.blocks.0.attn.qkv_proj.weight" in state and "MP.proj.weight" in state
    assert "decoder.blocks.0.attn.q_proj.weight" in state
    state["decoder.rotary_embd.inv_freq"] = torch.ones(4)  # upstream saves this buffer; it must be ignored
    directory = tmp_path / "upstream"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    loaded = load_model(directory)
    assert loaded.cfg.source_format == "upstream" and loaded.cfg.image.mean is None
    assert loaded.cfg.image_token_id == native.cfg.image_token_id
    ids, views = _inputs(native.model, n_images=2)
    assert torch.equal(native.model(ids, views), loaded.model(ids, views))


def test_upstream_unknown_key_is_refused(tmp_path):
    torch.manual_seed(0)
    native = build_model(_upstream_like_config(), load_backbones=False)
    config, state = to_upstream(native.model.state_dict(), native.cfg)
    directory = tmp_path / "up"
    directory.mkdir()
    state["decoder.blocks.0.attn.mystery.weight"] = torch.zeros(1)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.blocks.0.attn.mystery.weight"):
        load_model(directory)


def test_a_run_directory_loads_its_final_checkpoint_else_its_newest_step(tmp_path):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="training run without a saved checkpoint yet"):
        load_model(run)
    save_model(first.model, run / "checkpoints" / "step-000010", tokenizer=first.tokenizer)
    save_model(second.model, run / "checkpoints" / "step-000200", tokenizer=second.tokenizer)
    assert load_model(run).directory == run / "checkpoints" / "step-000200"
    save_model(first.model, run / "final", tokenizer=first.tokenizer)
    loaded = load_model(run)
    assert loaded.directory == run / "final"
    assert torch.equal(loaded.model.language.norm.weight, first.model.language.norm.weight)
    assert ckpt_io.read_model_config(run) == first.cfg


def test_a_directory_that_is_no_checkpoint_names_the_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing from"):
        load_model(tmp_path)


def test_a_preset_config_carries_the_image_token_id_its_tokenizer_gives():
    """Presets build without a tokenizer (memory estimates): the id they carry is the one creation fixes."""
    preset = tiny_config()
    assert preset.image_token_id == preset.language.vocab_size
    assert build_model(preset, load_backbones=False).cfg.image_token_id == preset.image_token_id
