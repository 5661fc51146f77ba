"""Checkpoints written by earlier nanovlm code keep loading, bit-exactly.

Each tests/fixtures/checkpoint_vN/ was written once, by the code of its format, with scripts/make_checkpoint_fixtures.py
(the save path `nanovlm train` uses) and is never rewritten: v0 before config.json had a format version, v1 with
`"format_version": 1`. The current code must read every stored tensor unchanged and compute the very same logits on the
fixed input stored beside it; a change of the format (a renamed key, a new config default) fails here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanovlm_cli.checkpoint.io import FORMAT_VERSION, load_model, read_model_config, save_model
from nanovlm_cli.errors import CheckpointError
from nanovlm_cli.models.lora import LoRAConfig, apply_lora
from nanovlm_cli.validation import validate_checkpoint
from tests.helpers import tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
VERSIONS = sorted(p.name for p in FIXTURES.glob("checkpoint_v*") if (p / "expected.safetensors").is_file())


def test_every_format_has_a_fixture():
    assert VERSIONS == ["checkpoint_v0", "checkpoint_v1", "checkpoint_v2"]
    assert f"checkpoint_v{FORMAT_VERSION}" == VERSIONS[-1]  # a new format adds its fixture
    for version in VERSIONS:
        raw = json.loads((FIXTURES / version / "config.json").read_text())
        assert raw.get("format_version", 0) == int(version.removeprefix("checkpoint_v"))


@pytest.mark.parametrize("version", VERSIONS)
def test_fixture_loads_every_tensor_unchanged(version):
    directory = FIXTURES / version
    loaded = load_model(directory)
    stored = load_file(directory / "model.safetensors")
    state = loaded.model.state_dict()
    assert sorted(state) == sorted(stored)
    for key, tensor in stored.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


def _stored_part(current: dict, stored: dict) -> dict:
    """`current` restricted to the keys `stored` has (fields added since take their defaults; the logits judge them)."""
    return {k: _stored_part(current[k], v) if isinstance(v, dict) and isinstance(current.get(k), dict)
            else current.get(k, "<missing>") for k, v in stored.items()}


@pytest.mark.parametrize("version", VERSIONS)
def test_fixture_config_reads_back_every_stored_field(version):
    directory = FIXTURES / version
    raw = json.loads((directory / "config.json").read_text())
    loaded = load_model(directory)
    assert _stored_part(loaded.cfg.to_dict(), raw["model"]) == raw["model"]
    assert loaded.cfg.image_token_id == loaded.tokenizer.convert_tokens_to_ids(loaded.cfg.image_token)


@pytest.mark.parametrize("version", VERSIONS)
@torch.no_grad()
def test_fixture_logits_are_bit_exact(version):
    directory = FIXTURES / version
    expected = load_file(directory / "expected.safetensors")
    loaded = load_model(directory)
    logits = loaded.model.logits(loaded.model(expected["input_ids"], list(expected["pixel_values"])))[0]
    assert logits.shape == expected["logits"].shape
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max().item()


@torch.no_grad()
def test_negative_control_one_changed_weight_changes_the_logits():
    """The logit check can fail: a change of 1e-4 to one of the model's 63k weights shows in the logits."""
    directory = FIXTURES / VERSIONS[0]
    expected = load_file(directory / "expected.safetensors")
    loaded = load_model(directory)
    weight = loaded.model.language.blocks[0].attn.q_proj.weight
    weight[0, 0] += 1e-4
    logits = loaded.model.logits(loaded.model(expected["input_ids"], list(expected["pixel_values"])))[0]
    assert not torch.equal(logits, expected["logits"])


def _copy(version: str, tmp_path: Path) -> Path:
    target = tmp_path / version
    shutil.copytree(FIXTURES / version, target)
    return target


def _edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_save_writes_the_current_format_version(tmp_path):
    loaded = tiny_model()
    directory = save_model(loaded.model, tmp_path / "ckpt", tokenizer=loaded.tokenizer)
    # a checkpoint without adapters is written as format 1, so code that reads only format 1 still loads it
    assert json.loads((directory / "config.json").read_text())["format_version"] == 1
    assert FORMAT_VERSION == 2


def test_a_lora_checkpoint_is_written_as_format_2(tmp_path):
    loaded = tiny_model()
    apply_lora(loaded.model, LoRAConfig(r=2, alpha=4.0))
    directory = save_model(loaded.model, tmp_path / "ckpt", tokenizer=loaded.tokenizer)
    raw = json.loads((directory / "config.json").read_text())
    assert raw["format_version"] == 2 and raw["lora"]["r"] == 2


def test_a_newer_format_is_refused_in_one_line(tmp_path):
    directory = _copy(VERSIONS[-1], tmp_path)
    _edit_config(directory, lambda raw: raw.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    assert str(info.value) == (f"checkpoint format {FORMAT_VERSION + 1} is newer than this nanovlm supports "
                               f"({FORMAT_VERSION}); upgrade nanovlm")
    report = validate_checkpoint(directory, generate=False)
    assert not report.ok and "is newer than this nanovlm supports" in _check(report, "config").detail


def test_a_format_version_that_is_not_a_number_is_named(tmp_path):
    directory = _copy(VERSIONS[-1], tmp_path)
    _edit_config(directory, lambda raw: raw.update(format_version="one"))
    with pytest.raises(CheckpointError, match="format_version='one', not a whole number"):
        load_model(directory)


@torch.no_grad()
def test_a_config_without_image_token_id_takes_it_from_its_own_tokenizer(tmp_path):
    """Configs saved without the id (upstream's never had one) get it once, at load, from the checkpoint's tokenizer."""
    directory = _copy(VERSIONS[0], tmp_path)
    stored_id = json.loads((directory / "config.json").read_text())["model"]["image_token_id"]
    _edit_config(directory, lambda raw: raw["model"].pop("image_token_id"))
    loaded = load_model(directory)
    assert loaded.cfg.image_token_id == stored_id == loaded.tokenizer.convert_tokens_to_ids("<|image|>")
    assert read_model_config(directory).image_token_id == stored_id
    expected = load_file(directory / "expected.safetensors")
    logits = loaded.model.logits(loaded.model(expected["input_ids"], list(expected["pixel_values"])))[0]
    assert torch.equal(logits, expected["logits"])
    assert validate_checkpoint(directory, generate=False).ok


def _check(report, name):
    return next(c for c in report.checks if c.name == name)
