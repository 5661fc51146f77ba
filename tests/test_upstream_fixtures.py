"""Checkpoints written by the original nanoVLM repository's own code load here and compute what that code computes.

The fixtures in tests/fixtures/upstream/ were made by scripts/make_upstream_fixtures.py, which ran the original
repository's `VisionLanguageModel`, `save_pretrained`, processors and `generate()` at five pinned commits (one per
checkpoint generation; each `reference.json` names its commit and the shims it needed). Nothing here was written
by our own `to_upstream`: `config.json` and `model.safetensors` are exactly what the original wrote (the tied
embedding stored once, as `decoder.head.weight`, plus the `decoder.rotary_embd.inv_freq` buffer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nanovlm_cli.checkpoint.io import load_model
from nanovlm_cli.checkpoint.upstream import save_upstream, to_upstream
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.errors import CheckpointError
from nanovlm_cli.generation import Engine, SamplingConfig, user_message

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
GENERATIONS = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.json").exists())


def _reference(generation: str) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = FIXTURES / generation
    return json.loads((directory / "reference.json").read_text()), load_file(directory / "reference.safetensors")


def _prompt(processor: Processor, case: dict):
    image = Image.open(FIXTURES / "images" / case["image"]).convert("RGB")
    return processor.encode_prompt(user_message(case["question"], 1), [image])


def test_every_generation_has_a_fixture():
    assert GENERATIONS == ["chat-image-token", "tiles", "tiles-global", "v0.1-prefix", "v0.2-image-token"]


@pytest.mark.parametrize("generation", GENERATIONS)
def test_fixture_is_what_the_original_writes(generation):
    """Guards the fixtures themselves: the layout that broke our loader must be the one under test."""
    from safetensors import safe_open

    with safe_open(FIXTURES / generation / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "decoder.head.weight" in keys and "decoder.token_embedding.weight" not in keys
    assert "decoder.rotary_embd.inv_freq" in keys
    # recorded by the script: the original code's own from_pretrained read what our save_upstream wrote
    meta, _ = _reference(generation)
    assert meta["to_upstream_round_trip"]["max_abs_logit_diff"] < 1e-5


@pytest.mark.parametrize("generation", GENERATIONS)
@torch.no_grad()
def test_inputs_and_logits_equal_the_original_code(generation):
    meta, ref = _reference(generation)
    loaded = load_model(FIXTURES / generation)
    processor = Processor(loaded.cfg, loaded.tokenizer)
    for k, case in enumerate(meta["cases"]):
        sample = _prompt(processor, case)
        ids = sample.input_ids.tolist()
        if meta["prompt_style"] == "prefix":  # v0.1 concatenates the image embeddings in front of the text ids
            n_image = loaded.cfg.image_tokens_per_tile
            assert ids[:n_image] == [loaded.cfg.image_token_id] * n_image
            ids = ids[n_image:]
        assert ids == ref[f"case{k}.input_ids"].tolist(), f"{generation} case {k} prompt ids"
        pixels = ref[f"case{k}.pixel_values"]
        assert len(sample.images) == pixels.shape[0]
        for view, expected in zip(sample.images, pixels):
            assert view.shape == expected.shape
            torch.testing.assert_close(view, expected, atol=1e-6, rtol=0)
        logits = loaded.model.logits(loaded.model(sample.input_ids[None], sample.images))[0]
        expected = ref[f"case{k}.logits"]
        n = expected.shape[-1]  # rows beyond the original vocabulary are ours (zero embeddings, never sampled)
        assert (logits[:, :n] - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("generation", GENERATIONS)
def test_greedy_answers_equal_the_original_generate(generation):
    meta, ref = _reference(generation)
    loaded = load_model(FIXTURES / generation)
    processor = Processor(loaded.cfg, loaded.tokenizer)
    engine = Engine(loaded.model, processor)
    for k, case in enumerate(meta["cases"]):
        original = ref[f"case{k}.generated_ids"].tolist()
        eos = loaded.tokenizer.eos_token_id
        # the original generates max_new_tokens and then overwrites everything after the first EOS with EOS;
        # ours stops at EOS and does not return it
        expected = original[: original.index(eos)] if eos in original else original
        result = engine.generate([_prompt(processor, case)], SamplingConfig(max_new_tokens=len(original),
                                                                            temperature=0.0))
        assert result.token_ids[0] == expected, f"{generation} case {k}"
        assert result.finish_reasons[0] == ("eos" if eos in original else "length")
        assert result.texts[0].strip() == case["answer"].strip()


def test_negative_control_a_bicubic_fixed_view_is_not_the_original():
    """The pixel check can fail: upstream's fixed views are torchvision's bilinear Resize, not bicubic."""
    meta, ref = _reference("v0.2-image-token")
    loaded = load_model(FIXTURES / "v0.2-image-token")
    cfg = loaded.cfg.replace(image=loaded.cfg.image.replace(resample="bicubic"))
    sample = _prompt(Processor(cfg, loaded.tokenizer), meta["cases"][0])
    assert (sample.images[0] - ref["case0.pixel_values"][0]).abs().max().item() > 1e-3


# --- our writer for that format writes what the original writes ---------------------------------------------------

_NAMES = {"vit_model_type", "lm_model_type", "lm_max_length", "vlm_checkpoint_path", "hf_repo_name"}  # not the model


@pytest.mark.parametrize("generation", [g for g in GENERATIONS if g != "v0.1-prefix"])
def test_to_upstream_reproduces_the_original_files(generation):
    """Loaded with our loader and written back with `to_upstream`: the same tensors under the same names as the
    original's own `save_pretrained` wrote, and the same config values (v0.1 is written in v0.2's layout)."""
    directory = FIXTURES / generation
    loaded = load_model(directory)
    config, state = to_upstream(loaded.model.state_dict(), loaded.cfg)
    original = load_file(directory / "model.safetensors")
    assert sorted(state) == sorted(original)
    for key, tensor in original.items():
        torch.testing.assert_close(state[key], tensor, atol=0, rtol=0, msg=key)
    written = json.loads((directory / "config.json").read_text())
    shared = (set(config) & set(written)) - _NAMES
    assert {k: config[k] for k in shared} == {k: written[k] for k in shared}
    assert list(config) == list(written)  # that generation's keys, in its order


def test_to_upstream_round_trip_loads_and_computes_the_same(tmp_path):
    directory = FIXTURES / "tiles-global"
    loaded = load_model(directory)
    save_upstream(loaded.model.state_dict(), loaded.cfg, tmp_path / "again")
    again = load_model(tmp_path / "again")
    meta, ref = _reference("tiles-global")
    processor = Processor(again.cfg, again.tokenizer)
    sample = _prompt(processor, meta["cases"][0])
    with torch.no_grad():
        logits = again.model.logits(again.model(sample.input_ids[None], sample.images))[0]
    assert (logits - ref["case0.logits"]).abs().max().item() < 1e-5


def test_to_upstream_refuses_what_upstream_would_compute_differently():
    from tests.helpers import tiny_config

    cfg = tiny_config()  # normalised pixels (mean/std set), as every native preset
    with pytest.raises(CheckpointError, match="normalises pixels"):
        to_upstream({}, cfg)


# --- the CLI on these checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", GENERATIONS)
def test_validate_passes_original_checkpoints(generation):
    from nanovlm_cli.validation import validate_checkpoint

    report = validate_checkpoint(FIXTURES / generation, generate=True)
    assert report.ok, [(c.name, c.detail) for c in report.checks if not c.ok]


def test_cli_generate_answers_like_the_original(tmp_path):
    from typer.testing import CliRunner

    from nanovlm_cli.cli.app import app

    meta, _ = _reference("tiles-global")
    case = meta["cases"][1]
    result = CliRunner().invoke(app, ["generate", "-c", str(FIXTURES / "tiles-global"),
                                      str(FIXTURES / "images" / case["image"]), case["question"], "--greedy",
                                      "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == case["answer"].strip()


def test_push_dry_run_keeps_an_original_checkpoint_loadable(tmp_path):
    from typer.testing import CliRunner

    from nanovlm_cli.cli.app import app

    source = tmp_path / "up"
    shutil.copytree(FIXTURES / "chat-image-token", source)
    out = tmp_path / "staged"
    result = CliRunner().invoke(app, ["push", str(source), "me/up-model", "--dry-run", str(out)])
    assert result.exit_code == 0, result.output
    meta, ref = _reference("chat-image-token")
    staged = load_model(out)
    sample = _prompt(Processor(staged.cfg, staged.tokenizer), meta["cases"][0])
    with torch.no_grad():
        logits = staged.model.logits(staged.model(sample.input_ids[None], sample.images))[0]
    n = ref["case0.logits"].shape[-1]
    assert (logits[:, :n] - ref["case0.logits"]).abs().max().item() < 1e-5
