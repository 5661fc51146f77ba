"""Fixed batches and one training step, shared by tests/test_fsdp.py (one process) and tests/fsdp_worker.py (two)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanovlm_cli.data.packing import collate
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.sample import Batch, Record
from nanovlm_cli.models.vlm import loss_targets

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 60, 200)]
WORDS = ["red", "green", "blue", "yellow", "cyan", "violet"]


def _record(i: int, with_image: bool) -> Record:
    from PIL import Image

    if with_image:
        user = [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]
        return Record([{"role": "user", "content": user}, {"role": "assistant", "content": WORDS[i % 6]}],
                      [Image.new("RGB", (64, 64), COLORS[i % 6])], i)
    return Record([{"role": "user", "content": f"Name colour number {i}."},
                   {"role": "assistant", "content": WORDS[(i + 1) % 6]}], [], i)


def make_batches(loaded) -> tuple[list[list], Batch]:
    """Three steps of four samples each (step 0: image, text, image, text) and a probe batch (image + text)."""
    processor = Processor(loaded.cfg, loaded.tokenizer)
    steps = [[processor.encode(_record(4 * s + j, with_image=(s > 0 or j % 2 == 0))) for j in range(4)]
             for s in range(3)]
    probe = collate([[processor.encode(_record(7, True))], [processor.encode(_record(8, False))]])
    return steps, probe


def _tokens(samples: list) -> int:
    return int(loss_targets(collate([[s] for s in samples]))[1].sum())


def step_loss(model, mine: list, everything: list, world: int) -> tuple[float, float]:
    """Forward and backward of this rank's samples, weighted by the step's global token count (DDP/FSDP average
    gradients over ranks, hence the factor `world`), then clipping; (per-token loss, gradient norm)."""
    total = _tokens(everything)
    out = model.loss(collate([[s] for s in mine]))
    (out.loss_sum * world / total).backward()
    loss_sum = out.loss_sum.detach().double()
    if world > 1:
        dist.all_reduce(loss_sum)
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    return float(loss_sum) / total, float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
