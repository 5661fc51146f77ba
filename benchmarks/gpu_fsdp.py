"""FSDP2 vs DDP on CUDA (NCCL, bf16): per-step losses and per-rank peak memory against the memory model.

Run under torchrun (one process per GPU; one GPU gives a world of one: the bf16 mixed-precision path and the
memory model, without the sharding savings):

    torchrun --nproc-per-node N benchmarks/gpu_fsdp.py --strategy fsdp --json OUT.json
    torchrun --nproc-per-node N benchmarks/gpu_fsdp.py --strategy ddp --json OUT.json

A random ~100M model (memory.py's "100M" shapes); every rank trains on its own synthetic rows (seeded by rank and
step, so both strategies see the same data), token-weighted loss as the training loop computes it, clipping,
AdamW. Rank 0 writes the losses, every rank's `max_memory_allocated` after the warm-up step, and the memory model's
per-rank estimate (`memory.estimate_memory`, and `memory.sharding.fsdp_per_rank` under FSDP).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from memory import MODELS  # benchmarks/ is on sys.path: torchrun runs this file as a script

from nanovlm_cli.config import TrainConfig
from nanovlm_cli.distributed import DistInfo
from nanovlm_cli.memory import estimate_memory, sample_shape, synthetic_batch
from nanovlm_cli.memory.sharding import fsdp_per_rank, sharded_bytes
from nanovlm_cli.models.vlm import VisionLanguageModel, loss_targets
from nanovlm_cli.training import fsdp
from nanovlm_cli.training.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["fsdp", "ddp"], required=True)
    parser.add_argument("--model", default="100M", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a gloo smoke run of this script (no memory peaks)")
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    info = DistInfo(rank, world, device.index)
    cfg = MODELS[args.model][0]  # carries its image token id (benchmarks/memory.scaled)
    train = TrainConfig(lr_mp=1e-3, lr_vision=1e-4, lr_language=1e-4)
    shape = sample_shape(cfg, args.seq_len)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).to(device).train()
    if args.strategy == "fsdp":
        fsdp.shard_model(model, device, info)
        runner = model
    else:
        runner = torch.nn.parallel.DistributedDataParallel(_Loss(model), device_ids=[device.index] if cuda else None,
                                                           find_unused_parameters=True)
    optimizer = build_optimizer(model, train, device)
    losses = []
    for step in range(args.steps):
        if step == 1 and cuda:
            torch.cuda.reset_peak_memory_stats(device)  # the first step allocates AdamW's state
        batches = [synthetic_batch(cfg, shape, args.batch_size, seed=1000 * step + r) for r in range(world)]
        total = sum(int(loss_targets(b)[1].sum()) for b in batches)
        batch = batches[rank].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            loss_sum = runner(batch) if args.strategy == "ddp" else model.loss(batch).loss_sum
        (loss_sum * world / total).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        summed = loss_sum.detach().double()
        dist.all_reduce(summed)
        losses.append(float(summed) / total)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0], device=device)
    every = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(every, peak)
    one = estimate_memory(cfg, shape, args.batch_size, train=train, device_type=device.type)
    per_rank = fsdp_per_rank(one, cfg, train, world, device.type) if args.strategy == "fsdp" else one
    if rank == 0:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "strategy": args.strategy, "world_size": world, "model": args.model, "gpu": torch.cuda.get_device_name() if cuda else "cpu",
            "n_params": sum(p.numel() for p in model.parameters()), "losses": losses,
            "peak_bytes_per_rank": [int(t.item()) for t in every], "estimate_per_rank": per_rank.to_dict(),
            "shards_rank0": vars(sharded_bytes(cfg, train, world)) if args.strategy == "fsdp" else None,
        }, indent=2))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


class _Loss(torch.nn.Module):
    def __init__(self, model: VisionLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch).loss_sum


if __name__ == "__main__":
    main()
