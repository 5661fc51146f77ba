"""Checkpoints written by earlier nanovlm code keep loading, bit-exactly.

Each tests/fixtures/checkpoint_vN/ was written once, by the code of its format, with scripts/make_checkpoint_fixtures.py
(the save path `nanovlm train` uses) and is never rewritten: v0 before config.json had a format version, v1 with
`"format_version": 1`. The current code must read every stored tensor unchanged and compute the very same logits on the
fixed input stored beside it; a change of the format (a renamed key, a new config default) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanovlm_cli.checkpoint.io import load_model

FIXTURES = Path(__file__).parent / "fixtures"
VERSIONS = sorted(p.name for p in FIXTURES.glob("checkpoint_v*") if (p / "expected.safetensors").is_file())


def test_every_format_has_a_fixture():
    assert VERSIONS == ["checkpoint_v0"]


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
