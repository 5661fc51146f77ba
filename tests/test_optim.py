"""The optimiser choice: AdamW everywhere by default, or Muon on the hidden weight matrices with AdamW on the rest."""

import copy

import torch

from nanovlm_cli.checkpoint.io import build_model
from nanovlm_cli.presets import get_preset
from nanovlm_cli.training.optim import MuonWithAdamW, build_optimizer, build_scheduler, muon_parameters

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    return build_model(get_preset("tiny").model, load_backbones=False).model


def _fake_step(model, optimizer, scheduler, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def test_adamw_is_the_default_and_has_one_group_per_part():
    cfg = get_preset("tiny").train.replace(optimizer="adamw")
    optimizer = build_optimizer(_model(), cfg, CPU)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["name"] for g in optimizer.param_groups] == ["projector", "vision", "language"]


def test_muon_owns_linear_matrices_and_adamw_the_embeddings_norms_and_patch_conv():
    model = _model()
    cfg = get_preset("tiny").train.replace(optimizer="muon", lr_muon=0.02)
    optimizer = build_optimizer(model, cfg, CPU)
    assert isinstance(optimizer, MuonWithAdamW)
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == {id(p) for p in model.parameters()}
    assert all(p.ndim == 2 for g in optimizer.muon.param_groups for p in g["params"])
    assert id(model.language.embed_tokens.weight) in adamw  # a lookup table (tied to the head), not a linear map
    assert id(model.vision.patch_embed.weight) in adamw  # 4-D conv
    assert id(model.projector.proj.weight) in muon
    assert {g["lr"] for g in optimizer.muon.param_groups} == {0.02}
    assert len(muon_parameters(model.language)) == 7 * len(model.language.blocks)


def test_muon_scheduler_reaches_both_inner_optimizers_and_state_round_trips():
    cfg = get_preset("tiny").train.replace(optimizer="muon", max_steps=10, warmup_ratio=0.2)
    model = _model()
    optimizer = build_optimizer(model, cfg, CPU)
    scheduler = build_scheduler(optimizer, cfg)
    _fake_step(model, optimizer, scheduler, seed=1)
    assert optimizer.muon.param_groups[0]["lr"] == cfg.lr_muon * 2 / 2  # warmup of 2 steps: step 1 -> full lr
    assert optimizer.adamw.param_groups[0]["lr"] == cfg.lr_vision
    saved_opt = copy.deepcopy(optimizer.state_dict())  # the live state tensors change in place on the next step
    saved_sched = scheduler.state_dict()
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    _fake_step(model, optimizer, scheduler, seed=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(saved_weights)
    resumed = build_optimizer(model, cfg, CPU)
    resumed_sched = build_scheduler(resumed, cfg)
    resumed.load_state_dict(saved_opt)
    resumed_sched.load_state_dict(saved_sched)
    _fake_step(model, resumed, resumed_sched, seed=2)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    changed = [k for k in expected if not torch.equal(expected[k], saved_weights[k])]
    assert "language.blocks.0.attn.q_proj.weight" in changed and "language.embed_tokens.weight" in changed
