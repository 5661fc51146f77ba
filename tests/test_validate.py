"""Checkpoint pre-flight checks: a sound checkpoint passes every check; each kind of damage is named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovlm_cli.checkpoint.io import build_model, save_model
from nanovlm_cli.cli.app import run
from nanovlm_cli.presets import get_preset
from nanovlm_cli.validation import validate_checkpoint

EMBED = "language.embed_tokens.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.manual_seed(0)
    loaded = build_model(get_preset("tiny").model, load_backbones=False)
    return save_model(loaded.model, tmp_path_factory.mktemp("validate") / "good", tokenizer=loaded.tokenizer)


@pytest.fixture
def copy(good, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(good, target)
    return target


def _edit_weights(directory, edit) -> None:
    state = load_file(str(directory / "model.safetensors"))
    edit(state)
    save_file(state, str(directory / "model.safetensors"))


def _check(report, name):
    return next(c for c in report.checks if c.name == name)


def _failed(report) -> set[str]:
    return {c.name for c in report.checks if not c.ok and not c.skipped}


def test_good_checkpoint_passes_every_check_including_generation(good):
    report = validate_checkpoint(good)
    assert report.ok, report.to_dict()
    assert [c.name for c in report.checks] == ["files", "config", "tensors", "finite", "tied weights", "tokenizer",
                                               "image processing", "generation"]
    assert not any(c.skipped for c in report.checks)
    assert "tokens in" in _check(report, "generation").detail


def test_no_generate_skips_only_the_generation(good):
    report = validate_checkpoint(good, generate=False)
    assert report.ok and _check(report, "generation").skipped


def test_missing_tensor_is_named(copy):
    _edit_weights(copy, lambda s: s.pop("projector.proj.weight"))
    report = validate_checkpoint(copy)
    assert not report.ok and _failed(report) == {"tensors"}
    assert "1 missing: projector.proj.weight" in _check(report, "tensors").detail
    assert _check(report, "generation").skipped


def test_unexpected_and_wrongly_shaped_tensors_are_named(copy):
    def edit(state):
        state["language.norm.weight"] = torch.ones(7)
        state["extra.weight"] = torch.zeros(2)

    _edit_weights(copy, edit)
    detail = _check(validate_checkpoint(copy, generate=False), "tensors").detail
    assert "unexpected: extra.weight" in detail
    assert "wrong shape: language.norm.weight [7] (expected [128])" in detail


def test_nan_weight_is_found(copy):
    def edit(state):
        state["vision.blocks.1.mlp.up_proj.weight"][3, 4] = float("nan")

    _edit_weights(copy, edit)
    report = validate_checkpoint(copy)
    assert _failed(report) == {"finite"}
    assert "vision.blocks.1.mlp.up_proj.weight" in _check(report, "finite").detail


def test_truncated_safetensors_is_reported_not_raised(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = validate_checkpoint(copy)
    assert not report.ok
    assert "truncated or corrupt" in _check(report, "tensors").detail
    assert _check(report, "finite").skipped and _check(report, "generation").skipped


def test_missing_tokenizer_files_fail_files_and_tokenizer_checks(copy):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (copy / name).unlink(missing_ok=True)
    report = validate_checkpoint(copy)
    assert {"files", "tokenizer"} <= _failed(report)
    assert "no tokenizer files" in _check(report, "files").detail
    assert _check(report, "tensors").ok  # the weights themselves are still checked


def test_tied_config_with_a_different_head_tensor_fails(copy):
    _edit_weights(copy, lambda s: s.__setitem__("language.lm_head.weight", s[EMBED] + 1.0))
    report = validate_checkpoint(copy, generate=False)
    assert "tied weights" in _failed(report)
    assert "differs from" in _check(report, "tied weights").detail


def test_inconsistent_config_is_reported(copy):
    config = json.loads((copy / "config.json").read_text())
    config["model"]["language"]["n_heads"] = 3  # does not divide hidden_dim 128
    (copy / "config.json").write_text(json.dumps(config))
    report = validate_checkpoint(copy)
    assert "config" in _failed(report) and "language.n_heads=3" in _check(report, "config").detail
    assert _check(report, "tensors").skipped


def test_an_image_token_id_the_tokenizer_does_not_give_is_one_clear_error(copy):
    path = copy / "config.json"
    raw = json.loads(path.read_text())
    raw["model"]["image_token_id"] = 7
    path.write_text(json.dumps(raw))
    report = validate_checkpoint(copy, generate=False)
    assert _failed(report) == {"tokenizer"}
    detail = _check(report, "tokenizer").detail
    assert "image_token_id=7" in detail and "maps <|image|> to id 512" in detail and "disagree" in detail


def test_unrecorded_image_preprocessing_fails(copy):
    config = json.loads((copy / "config.json").read_text())
    del config["model"]["image"]["mean"], config["model"]["image"]["std"]
    (copy / "config.json").write_text(json.dumps(config))
    report = validate_checkpoint(copy, generate=False)
    assert _failed(report) == {"image processing"}


def test_validate_command_exits_0_when_sound_and_1_naming_each_problem(good, copy, capsys):
    assert run(["validate", str(good), "--no-generate", "--device", "cpu"]) == 0
    assert "image processing" in capsys.readouterr().out
    _edit_weights(copy, lambda s: s.pop("projector.proj.weight"))
    (copy / "tokenizer.json").unlink()
    assert run(["validate", str(copy), "--device", "cpu", "--json"]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["ok"] is False
    assert "error: tensors: 1 missing: projector.proj.weight" in captured.err
    assert "error: files:" in captured.err


def test_missing_directory_is_one_failed_check(tmp_path):
    report = validate_checkpoint(tmp_path / "nope")
    assert not report.ok and "does not exist" in _check(report, "files").detail


def _upstream_checkpoint(directory, *, tamper=None):
    """A tiny model saved in upstream nanoVLM's layout (flat config, fused qkv, decoder.head.weight stored)."""
    from nanovlm_cli.checkpoint.upstream import to_upstream
    from nanovlm_cli.config import ImageConfig, VLMConfig
    from nanovlm_cli.presets import _with_extra_vocab

    data = get_preset("tiny").model.to_dict()
    data["image"] = ImageConfig(mode="tiles", tile_size=64, max_side=128, max_grid=2, mean=None, std=None).to_dict()
    data["language"]["extra_vocab_size"] = 100  # trimmed to what the tokenizer needs by _with_extra_vocab
    torch.manual_seed(0)
    native = build_model(_with_extra_vocab(VLMConfig.from_dict(data)), load_backbones=False)
    config, state = to_upstream(native.model.state_dict(), native.cfg)
    state = {k: v.clone().contiguous() for k, v in state.items()}
    if tamper is not None:
        tamper(state)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    save_file(state, str(directory / "model.safetensors"))
    return directory


def test_upstream_format_checkpoint_passes(tmp_path):
    report = validate_checkpoint(_upstream_checkpoint(tmp_path / "up"))
    assert report.ok, report.to_dict()
    assert "upstream nanoVLM format" in _check(report, "config").detail
    assert "stored once as decoder.head.weight" in _check(report, "tied weights").detail  # as upstream writes it
    assert "ToTensor only" in _check(report, "image processing").detail


def test_upstream_format_with_a_wrong_fused_qkv_shape_is_named(tmp_path):
    def tamper(state):
        key = "vision_encoder.blocks.0.attn.qkv_proj.weight"
        state[key] = state[key][:, :-1].contiguous()

    report = validate_checkpoint(_upstream_checkpoint(tmp_path / "up", tamper=tamper), generate=False)
    assert _failed(report) == {"tensors"}
    assert "vision.blocks.0.attn.q_proj.weight" in _check(report, "tensors").detail
