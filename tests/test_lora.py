import copy

import pytest
import torch
from torch import nn

from nanovlm_cli.errors import ConfigError
from nanovlm_cli.models.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    lora_spec,
    merge_lora,
    parameter_counts,
    restore_adapters,
)
from tests.helpers import single_row_batch, tiny_model

LANGUAGE_PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _batch(model, seed: int = 0):
    """One row: 6 text tokens, one image's tokens, 9 supervised text tokens."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((model.cfg.image_tokens_per_tile,), model.cfg.image_token_id)
    ids = torch.cat([torch.randint(5, 200, (6,), generator=g), image, torch.randint(5, 200, (9,), generator=g)])
    labels = torch.full_like(ids, -100)
    labels[-9:] = ids[-9:]
    return single_row_batch(ids, labels, [torch.rand(3, 64, 64, generator=g) * 2 - 1])


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(batch.input_ids, batch.images, position_ids=batch.position_ids))


def _adapted(cfg: LoRAConfig | None = None, seed: int = 0):
    model = tiny_model(seed).model
    base = copy.deepcopy(model).eval()
    torch.manual_seed(seed + 1)
    names = apply_lora(model, cfg or LoRAConfig(r=4, alpha=8.0))
    return base, model, names


def _train_steps(model, steps: int = 5, lr: float = 1e-2) -> torch.optim.Optimizer:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        model.loss(_batch(model, seed=i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_docstring_example_merge_equals_the_adapter_forward():
    layer = LoRALinear(nn.Linear(2, 2, bias=False), r=1, alpha=2.0)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
        layer.lora_A.copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[0.5], [0.0]]))
    x = torch.tensor([[1.0, 2.0]])
    assert layer(x).tolist() == [[4.0, 2.0]]
    assert layer.merged_weight().tolist() == [[2.0, 1.0], [0.0, 1.0]]


def test_default_targets_are_the_language_models_attention_and_mlp_projections():
    _, model, names = _adapted()
    n_layers = model.cfg.language.n_layers
    assert names == [f"language.blocks.{i}.{p}" for i in range(n_layers) for p in LANGUAGE_PROJECTIONS]
    assert isinstance(model.language.blocks[0].attn.q_proj, LoRALinear)
    assert not isinstance(model.vision.blocks[0].attn.q_proj, LoRALinear)
    assert not isinstance(model.projector.proj, LoRALinear)
    # base keys are unchanged (no `base_layer`): the adapters only add lora_A / lora_B
    keys = set(model.state_dict())
    base_keys = set(tiny_model().model.state_dict())
    assert base_keys <= keys and keys - base_keys == {f"{n}.{a}" for n in names for a in ("lora_A", "lora_B")}


def test_vision_and_projector_are_opt_in_by_pattern_or_alias():
    _, _, names = _adapted(LoRAConfig(r=2, targets=("vision", "projector"), train_projector=False))
    assert "projector.proj" in names and all(n.startswith(("vision.", "projector.")) for n in names)
    _, _, names = _adapted(LoRAConfig(r=2, targets=("language.blocks.0.attn.q_proj", "language.*.mlp.down_proj")))
    assert names == ["language.blocks.0.attn.q_proj", *[f"language.blocks.{i}.mlp.down_proj" for i in range(4)]]


def test_bad_targets_and_conflicts_are_one_line_errors():
    with pytest.raises(ConfigError, match="matches no linear layer"):
        _adapted(LoRAConfig(targets=("language.*.attn.qkv",)))
    with pytest.raises(ConfigError, match="--no-lora-train-projector"):
        _adapted(LoRAConfig(targets=("projector",)))
    with pytest.raises(ConfigError, match="lora.r=0"):
        LoRAConfig(r=0)
    with pytest.raises(ConfigError, match="lora.dropout"):
        LoRAConfig(dropout=1.0)


def test_step_zero_logits_equal_the_base_models():
    base, model, _ = _adapted(LoRAConfig(r=4, alpha=8.0, targets=("language", "vision"), dropout=0.1))
    model.eval()
    batch = _batch(model)
    assert torch.equal(_logits(model, batch), _logits(base, batch))


def test_after_training_the_merged_model_equals_the_adapter_model():
    base, model, _ = _adapted(LoRAConfig(r=4, alpha=8.0, targets=("language", "vision"), dropout=0.05,
                                         train_projector=True))
    _train_steps(model)
    model.eval()
    batch = _batch(model, seed=99)
    adapted = _logits(model, batch)
    assert (adapted - _logits(base, batch)).abs().max() > 1e-3  # the adapters really changed the model
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())  # plain base keys again
    assert (_logits(merged, batch) - adapted).abs().max() <= 1e-5


def test_base_weights_get_no_gradient_and_never_change():
    base, model, _ = _adapted()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    model.loss(_batch(model)).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    _train_steps(model, steps=2)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen_before.items())
    assert not torch.equal(after["projector.proj.weight"], base.projector.proj.weight)  # trains fully by default


def test_optimizer_state_exists_only_for_trainable_parameters():
    from nanovlm_cli.presets import get_preset
    from nanovlm_cli.training.optim import build_optimizer

    _, model, _ = _adapted()
    optimizer = build_optimizer(model, get_preset("tiny").train, torch.device("cpu"))
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_groups == trainable
    model.train()
    model.loss(_batch(model)).loss.backward()
    optimizer.step()
    assert {id(p) for p in optimizer.state} == trainable
    assert all(("lora_" in n or n.startswith("projector.")) == p.requires_grad for n, p in model.named_parameters())


def test_trainable_and_frozen_counts():
    plain = tiny_model().model
    total = sum(p.numel() for p in plain.parameters())
    assert parameter_counts(plain).trainable == total and parameter_counts(plain).frozen == 0
    _, model, names = _adapted(LoRAConfig(r=4, train_projector=True))
    adapters = sum(4 * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n in names)
    projector = plain.projector.proj.weight.numel()
    counts = parameter_counts(model)
    assert counts.trainable == adapters + projector
    assert counts.frozen == total - projector and counts.total == total + adapters
    _, model, _ = _adapted(LoRAConfig(r=4, train_projector=False))
    assert parameter_counts(model).trainable == adapters


def test_spec_restores_the_same_adapters_and_adapter_state_dict_holds_only_them():
    _, model, names = _adapted(LoRAConfig(r=2, alpha=3.0, dropout=0.1))
    _train_steps(model, steps=2)
    spec = lora_spec(model)
    assert spec == {"r": 2, "alpha": 3.0, "dropout": 0.1, "modules": names}
    fresh = tiny_model(seed=5).model
    restore_adapters(fresh, spec)
    fresh.load_state_dict(model.state_dict())
    model.eval()
    fresh.eval()
    batch = _batch(model)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))
    adapters = adapter_state_dict(model)
    assert set(adapters) == {f"{n}.{a}" for n in names for a in ("lora_A", "lora_B")}
    assert lora_spec(tiny_model().model) is None
    with pytest.raises(ConfigError, match="does not exist"):
        restore_adapters(tiny_model().model, {**spec, "modules": ["language.blocks.9.attn.q_proj"]})


def test_an_adapter_checkpoint_is_self_contained_and_loads_and_validates(tmp_path):
    import json

    from nanovlm_cli.checkpoint.io import load_model, save_model
    from nanovlm_cli.validation import validate_checkpoint

    loaded = tiny_model()
    model = loaded.model
    torch.manual_seed(1)
    names = apply_lora(model, LoRAConfig(r=2, alpha=4.0))
    _train_steps(model, steps=2)
    directory = save_model(model, tmp_path / "ckpt", tokenizer=loaded.tokenizer, lora_base="runs/base/final")
    lora = json.loads((directory / "config.json").read_text())["lora"]
    assert lora == {"r": 2, "alpha": 4.0, "dropout": 0.0, "modules": names, "base": "runs/base/final"}
    again = load_model(directory).model
    assert [n for n, m in again.named_modules() if isinstance(m, LoRALinear)] == names
    model.eval()
    batch = _batch(model)
    assert torch.equal(_logits(again, batch), _logits(model, batch))
    report = validate_checkpoint(directory, generate=False)
    assert report.ok, report.to_dict()
    merged = save_model(merge_lora(again), tmp_path / "merged", tokenizer=loaded.tokenizer)
    assert "lora" not in json.loads((merged / "config.json").read_text())
    assert (_logits(load_model(merged).model, batch) - _logits(model, batch)).abs().max() <= 1e-5
