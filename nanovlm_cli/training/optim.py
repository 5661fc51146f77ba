"""Optimiser and schedule: one AdamW parameter group per trained part, warmup then cosine decay.

Each part (projector, vision encoder, language model) has its own learning rate. A frozen part has
`requires_grad=False` and no parameter group at all, so it costs no optimiser state: freezing the vision encoder
really shrinks memory.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from nanovlm_cli.config import TrainConfig
from nanovlm_cli.models.vlm import VisionLanguageModel


def apply_freezing(model: VisionLanguageModel, cfg: TrainConfig) -> None:
    for module, frozen in ((model.vision, cfg.freeze_vision_encoder), (model.projector, cfg.freeze_projector),
                           (model.language, cfg.freeze_language_model)):
        for p in module.parameters():
            p.requires_grad_(not frozen)


def build_optimizer(model: VisionLanguageModel, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = []
    for name, module, lr in (("projector", model.projector, cfg.lr_mp), ("vision", model.vision, cfg.lr_vision),
                             ("language", model.language, cfg.lr_language)):
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "name": name, "weight_decay": cfg.weight_decay})
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of a dozen per parameter group
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_multiplier(step: int, max_steps: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup over `warmup_ratio * max_steps` steps, then cosine from 1 down to `min_ratio`."""
    warmup = max(1, round(warmup_ratio * max_steps)) if warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg.max_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
