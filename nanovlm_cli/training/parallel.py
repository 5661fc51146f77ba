"""Wrapping the model for distributed training: today DDP around the loss; FSDP2 goes here next.

Under DDP the loss of a step is the token-weighted sum the loop computes; DDP averages gradients over ranks, which
the loop undoes by scaling the loss with the world size (see `training.loop`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from nanovlm_cli.distributed import DistInfo

__all__ = ["LossModule", "wrap_model"]


class LossModule(torch.nn.Module):
    """What DDP wraps: its forward is the summed loss, so DDP's gradient hooks see the whole computation."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.model.loss(batch).loss_sum


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module | None:
    """The model wrapped for distributed training (its forward is the summed loss), or None in a single process."""
    # SEAM (FSDP2): the model is wrapped for distribution here, and only here.
    if not info.enabled or isinstance(model, FSDPModule):  # FSDP shards in place (training.fsdp), before the optimizer
        return None
    return DistributedDataParallel(
        LossModule(model), device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,  # text-only batches leave the vision encoder unused
    )
