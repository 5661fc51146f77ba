"""The memory model against real CPU measurements, freezing, gradient checkpointing, and `nanovlm vram`."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.memory import scaled
from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.memory import (
    estimate_memory,
    max_batch_size,
    measure_in_subprocess,
    optimizer_state_bytes,
    prepare_model,
    sample_shape,
    synthetic_batch,
    train_step,
)
from nanovlm_cli.presets import get_preset

CPU = torch.device("cpu")


def tiny() -> VLMConfig:
    return get_preset("tiny").model


def model_20m() -> VLMConfig:
    return scaled(vision_layers=4, vision_dim=256, lm_layers=6, lm_dim=384, lm_heads=6, lm_kv_heads=2,
                  intermediate=1024, vocab=16384)


@pytest.mark.parametrize("name,cfg,seq_len,batch_size", [
    ("tiny", tiny(), 512, 4),
    pytest.param("20M", model_20m(), 512, 2, marks=pytest.mark.slow),
])
def test_estimate_is_within_20_percent_of_the_measured_cpu_peak(name, cfg, seq_len, batch_size):
    shape = sample_shape(cfg, seq_len)
    estimate = estimate_memory(cfg, shape, batch_size, device_type="cpu")
    measured = measure_in_subprocess(cfg, TrainConfig(), shape, batch_size, timeout_s=300)
    assert measured.error is None and measured.measured_peak_bytes
    assert 0.8 <= estimate.total / measured.measured_peak_bytes <= 1.2, (name, estimate, measured)
    assert measured.optimizer_state_bytes == pytest.approx(estimate.optimizer, rel=0.01)


def test_state_counted_on_the_meta_device_matches_a_real_model():
    cfg = model_20m()
    estimate = estimate_memory(cfg, sample_shape(cfg, 256), 1)
    model, _ = prepare_model(cfg, TrainConfig(), CPU)
    n_params = sum(p.numel() for p in model.parameters())
    assert 19e6 < n_params < 21e6
    assert estimate.grads == 4 * n_params and estimate.optimizer == 8 * n_params
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert estimate.weights == 4 * n_params + buffers


def _optimizer_bytes_after_one_step(cfg: VLMConfig, train: TrainConfig) -> int:
    torch.manual_seed(0)
    model, optimizer = prepare_model(cfg, train, CPU)
    train_step(model, optimizer, synthetic_batch(cfg, sample_shape(cfg, 64), 1), CPU)
    return optimizer_state_bytes(optimizer)


def test_freezing_the_vision_encoder_shrinks_estimate_and_measured_optimizer_state():
    cfg = tiny()
    shape = sample_shape(cfg, 128)
    frozen_cfg = TrainConfig(freeze_vision_encoder=True)
    full, frozen = estimate_memory(cfg, shape, 2), estimate_memory(cfg, shape, 2, train=frozen_cfg)
    assert frozen.total < full.total and frozen.optimizer < full.optimizer and frozen.grads < full.grads
    assert frozen.vision_activations < full.vision_activations
    measured_full = _optimizer_bytes_after_one_step(cfg, TrainConfig())
    measured_frozen = _optimizer_bytes_after_one_step(cfg, frozen_cfg)
    assert measured_frozen < measured_full
    n_vision = sum(p.numel() for p in prepare_model(cfg, TrainConfig(), CPU)[0].vision.parameters())
    assert measured_full - measured_frozen == pytest.approx(8 * n_vision, rel=0.01)  # two fp32 moments each
    assert full.optimizer - frozen.optimizer == 8 * n_vision


def _grads(cfg: VLMConfig, checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = prepare_model(cfg, TrainConfig(gradient_checkpointing=checkpointing), CPU)
    model.loss(synthetic_batch(cfg, sample_shape(cfg, 96), 2, seed=1)).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_keeps_gradients_and_lowers_the_estimate():
    cfg = tiny()
    plain, checkpointed = _grads(cfg, False), _grads(cfg, True)
    assert plain.keys() == checkpointed.keys()
    assert any(name.startswith("vision.blocks") for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    shape = sample_shape(cfg, 512)
    for device_type in ("cpu", "cuda"):
        on = estimate_memory(cfg, shape, 4, train=TrainConfig(gradient_checkpointing=True), device_type=device_type)
        off = estimate_memory(cfg, shape, 4, device_type=device_type)
        assert on.decoder_activations < off.decoder_activations / 2 and on.total < off.total


def test_bf16_autocast_and_efficient_attention_need_less_than_fp32_and_math_attention():
    cfg = get_preset("default").model
    shape = sample_shape(cfg, 4096)
    cuda, cpu = estimate_memory(cfg, shape, 2), estimate_memory(cfg, shape, 2, device_type="cpu")
    assert cuda.activations < cpu.activations
    math_attention = estimate_memory(cfg, shape, 2, attention="math")
    assert math_attention.activations > cuda.activations


def test_sample_shape_follows_the_image_mode():
    default = sample_shape(get_preset("default").model, 4096)  # 512 px tiles, at most 2048 px: 4x4 + global
    assert (default.n_views, default.view_height, default.tokens_per_view) == (17, 512, 64)
    assert default.image_tokens == 1088
    fixed = sample_shape(get_preset("original_small").model, 1024, images_per_sample=2)
    assert (fixed.n_views, fixed.view_height, fixed.tokens_per_view) == (2, 224, 49)
    aspect = sample_shape(get_preset("dinov3_gemma").model, 4096)  # 1024 px, patch 16, shuffle 4: 16x16 tokens
    assert (aspect.n_views, aspect.view_height, aspect.tokens_per_view) == (1, 1024, 256)
    shrunk = sample_shape(get_preset("default").model, 512)  # tiles shrink until the images leave room for text
    assert shrunk.image_tokens <= 512 * 3 // 4
    with pytest.raises(ConfigError, match="--seq-len"):
        sample_shape(tiny(), 16)


def test_synthetic_batch_fills_every_image_token_position():
    cfg = tiny().replace(image_token_id=5)
    shape = sample_shape(cfg, 64)
    batch = synthetic_batch(cfg, shape, 3)
    assert batch.input_ids.shape == (3, 64) and len(batch.images) == 3 * shape.n_views
    assert int((batch.input_ids == 5).sum()) == 3 * shape.image_tokens
    assert int((batch.labels != -100).sum()) == 3 * (64 - 1 - shape.image_tokens)


def test_max_batch_size_is_the_largest_that_fits():
    cfg = tiny()
    shape = sample_shape(cfg, 512)
    budget = 0.5 * 1024**3
    n = max_batch_size(cfg, shape, budget)
    assert n >= 1
    assert estimate_memory(cfg, shape, n).total <= budget < estimate_memory(cfg, shape, n + 1).total
    assert max_batch_size(cfg, shape, 1024) == 0


@pytest.mark.slow
def test_vram_command_json_reports_measured_and_estimated_rows(capsys):
    from nanovlm_cli.cli import app

    code = app.run(["vram", "--preset", "tiny", "--batch-sizes", "1", "2", "--seq-len", "128", "--json",
                    "--device", "cpu", "--max-batch-size-for", "24"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["device"] == "cpu" and [r["batch_size"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["measured_peak_bytes"] > 0 and row["estimated_peak_bytes"] > 0 and row["oom"] is False
    assert report["rows"][1]["estimated_peak_bytes"] > report["rows"][0]["estimated_peak_bytes"]
    assert report["max_batch_size"] > 2


def test_vram_measures_only_cuda_or_cpu_and_auto_never_picks_mps(monkeypatch):
    from nanovlm_cli.memory.sweep import _measured_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert _measured_device("auto") == CPU
    with pytest.raises(ConfigError, match=r"--device mps is not supported here \(vram measures CUDA or CPU memory\)"):
        _measured_device("mps")
