"""Vision encoders against `transformers` on the same random weights (SigLIP/SigLIP2, DINOv2, DINOv3), loading
through the real `load_vision_backbone` path from a `save_pretrained` directory, plus strict-loading errors."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Dinov2Config,
    Dinov2Model,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from nanovlm_cli.checkpoint.hf_vision import convert_vision_state_dict, load_vision_backbone, vision_config_from_hf
from nanovlm_cli.config import VisionConfig
from nanovlm_cli.errors import CheckpointError, ImageError
from nanovlm_cli.models.vision import VisionEncoder

TOL = 1e-4


def _randomise(model: torch.nn.Module) -> None:
    """Random values everywhere, including norms, LayerScale, tokens and biases, so a wrong formula cannot pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):  # also layernorm, post_layernorm
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "lambda1" in name:
                p.copy_(0.5 + 0.5 * torch.rand_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def _save(model: torch.nn.Module, path) -> str:
    _randomise(model)
    model.eval()
    model.save_pretrained(path)
    return str(path)


def _max_diff(hf_model, ours: VisionEncoder, pixels: torch.Tensor, **hf_kwargs) -> float:
    with torch.no_grad():
        expected = hf_model(pixel_values=pixels, **hf_kwargs).last_hidden_state
        got = ours.forward_features(pixels)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


def _siglip(**overrides) -> SiglipVisionModel:
    kwargs = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    return SiglipVisionModel(SiglipVisionConfig(**{**kwargs, **overrides}))


def _dinov3(**overrides) -> DINOv3ViTModel:
    kwargs = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "patch_size": 16, "image_size": 64, "num_register_tokens": 4, "use_gated_mlp": True, "hidden_act": "silu"}
    return DINOv3ViTModel(DINOv3ViTConfig(**{**kwargs, **overrides}))


def test_siglip_matches_transformers(tmp_path):
    torch.manual_seed(0)
    hf = _siglip()
    ours = load_vision_backbone(_save(hf, tmp_path))
    assert ours.cfg.hub_id == str(tmp_path) and ours.cfg.kind == "siglip"
    assert _max_diff(hf, ours, torch.randn(2, 3, 32, 32)) <= TOL


def test_siglip2_fixed_resolution_matches_transformers(tmp_path):
    torch.manual_seed(1)
    hf = _siglip(image_size=64, patch_size=16, layer_norm_eps=1e-5, hidden_size=32, num_attention_heads=2)
    ours = load_vision_backbone(_save(hf, tmp_path))
    assert ours.cfg.layer_norm_eps == 1e-5
    assert _max_diff(hf, ours, torch.randn(2, 3, 64, 64)) <= TOL


@pytest.mark.parametrize("height,width", [(48, 48), (24, 40)])
def test_siglip_interpolated_positions_match_transformers(tmp_path, height, width):
    torch.manual_seed(2)
    hf = _siglip()
    ours = load_vision_backbone(_save(hf, tmp_path))
    assert _max_diff(hf, ours, torch.randn(1, 3, height, width), interpolate_pos_encoding=True) <= TOL


def test_full_siglip_model_directory_loads_vision_tower(tmp_path):
    torch.manual_seed(3)
    config = SiglipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "vocab_size": 100, "bos_token_id": None, "eos_token_id": None, "pad_token_id": 1},
    )
    hf = SiglipModel(config)
    ours = load_vision_backbone(_save(hf, tmp_path))
    assert ours.cfg.hidden_dim == 32 and ours.cfg.n_layers == 2
    assert _max_diff(hf.vision_model, ours, torch.randn(2, 3, 32, 32)) <= TOL


def test_dinov2_interpolated_positions_match_transformers(tmp_path):
    torch.manual_seed(4)
    hf = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                                  patch_size=14, layer_norm_eps=1e-6))
    ours = load_vision_backbone(_save(hf, tmp_path))
    assert ours.cfg.n_prefix_tokens == 1 and ours.cfg.intermediate_dim == 128
    assert _max_diff(hf, ours, torch.randn(2, 3, 42, 70)) <= TOL  # 3x5 grid from a 4x4 table
    assert _max_diff(hf, ours, torch.randn(2, 3, 56, 56)) <= TOL  # the training grid: no interpolation


@pytest.mark.parametrize("height,width", [(64, 64), (96, 160)])
def test_dinov3_with_registers_and_gated_mlp_matches_transformers(tmp_path, height, width):
    torch.manual_seed(5)
    hf = _dinov3()
    ours = load_vision_backbone(_save(hf, tmp_path))
    assert ours.cfg.n_registers == 4 and ours.cfg.gated_mlp and ours.cfg.qkv_bias == (True, False, True)
    assert _max_diff(hf, ours, torch.randn(2, 3, height, width)) <= TOL
    patches = ours(torch.randn(1, 3, height, width))
    assert patches.shape == (1, (height // 16) * (width // 16), 64)


def test_dinov3_plain_mlp_matches_transformers(tmp_path):
    torch.manual_seed(6)
    hf = _dinov3(use_gated_mlp=False, hidden_act="gelu", num_register_tokens=2)
    ours = load_vision_backbone(_save(hf, tmp_path))
    assert not ours.cfg.gated_mlp and ours.cfg.act == "gelu"
    assert _max_diff(hf, ours, torch.randn(2, 3, 48, 80)) <= TOL


def test_unknown_key_raises_naming_it(tmp_path):
    torch.manual_seed(7)
    path = _save(_siglip(), tmp_path)
    state = load_file(f"{path}/model.safetensors")
    state["encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    save_file(state, f"{path}/model.safetensors")
    with pytest.raises(CheckpointError, match="encoder.layers.0.self_attn.rotary.weight"):
        load_vision_backbone(path)


def test_missing_key_raises(tmp_path):
    torch.manual_seed(8)
    path = _save(_dinov3(), tmp_path)
    state = load_file(f"{path}/model.safetensors")
    del state["layer.1.layer_scale2.lambda1"]
    save_file(state, f"{path}/model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor blocks.1.scale2"):
        load_vision_backbone(path)


def test_unknown_model_type_raises_naming_it():
    with pytest.raises(CheckpointError, match="'clip_vision_model'"):
        vision_config_from_hf({"model_type": "clip_vision_model"})


def test_convert_reads_legacy_and_current_dinov2_spellings():
    cfg = VisionConfig(kind="dinov2", image_size=16, patch_size=8, hidden_dim=8, intermediate_dim=16, n_layers=1,
                       n_heads=2, use_cls=True, layer_scale=True)
    w = torch.randn(8, 8)
    legacy = convert_vision_state_dict({"encoder.layer.0.attention.attention.query.weight": w}, cfg)
    current = convert_vision_state_dict({"encoder.layer.0.attention.q_proj.weight": w}, cfg)
    assert list(legacy) == list(current) == ["blocks.0.attn.q_proj.weight"]
    assert torch.equal(legacy["blocks.0.attn.q_proj.weight"], w)


@pytest.mark.parametrize("height,width", [(30, 32), (32, 20), (0, 32)])
def test_input_not_multiple_of_patch_raises(height, width):
    encoder = VisionEncoder(VisionConfig(image_size=32, patch_size=8, hidden_dim=32, intermediate_dim=64,
                                         n_layers=1, n_heads=4))
    with pytest.raises(ImageError, match=f"{height}x{width}"):
        encoder(torch.randn(1, 3, height, width))


@pytest.mark.parametrize("kind", ["siglip", "dinov3"])
def test_gradient_checkpointing_gives_same_gradients(kind):
    torch.manual_seed(9)
    dino = {"use_cls": True, "n_registers": 2, "layer_scale": True, "rope_theta": 100.0, "gated_mlp": True,
            "act": "silu"}
    extra = dino if kind == "dinov3" else {}
    cfg = VisionConfig(kind=kind, image_size=32, patch_size=8, hidden_dim=32, intermediate_dim=64, n_layers=2,
                       n_heads=2, **extra)
    encoder = VisionEncoder(cfg).train()
    pixels = torch.randn(2, 3, 32, 48)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        encoder.zero_grad()
        encoder.gradient_checkpointing = checkpointing
        encoder(pixels).square().mean().backward()
        return {n: p.grad.clone() for n, p in encoder.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_fresh_encoder_init_and_output_shape():
    torch.manual_seed(10)
    cfg = VisionConfig(kind="dinov3", image_size=32, patch_size=8, hidden_dim=32, intermediate_dim=64, n_layers=1,
                       n_heads=2, use_cls=True, n_registers=4, layer_scale=True, rope_theta=100.0)
    encoder = VisionEncoder(cfg)
    assert encoder.pos_embed is None and encoder.registers.shape == (1, 4, 32)
    assert torch.all(encoder.blocks[0].norm1.weight == 1) and torch.all(encoder.blocks[0].attn.q_proj.bias == 0)
    assert 0.015 < encoder.blocks[0].mlp.up_proj.weight.std().item() < 0.025
    assert encoder.grid(96, 160) == (12, 20)
    out = encoder.forward_features(torch.randn(2, 3, 24, 40))
    assert out.shape == (2, 5 + 15, 32) and torch.isfinite(out).all()
