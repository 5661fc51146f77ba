"""What FSDP2 needs from this torch build and backend: `torchrun --nproc-per-node 2 benchmarks/fsdp_probe.py [nccl]`.

Prints OK/FAIL per capability (rank 0). On torch 2.14.1 (CPU wheel), gloo, 2 ranks, every line is OK:
all_gather_into_tensor, reduce_scatter_tensor with SUM and AVG (both warn that they are deprecated in favour of
all_gather_single / reduce_scatter_single), fully_shard forward/backward/clip_grad_norm_/AdamW over DTensor shards,
set_requires_gradient_sync accumulation, MixedPrecisionPolicy(bf16, fp32) (it runs on the CPU too; the trainer
uses it on CUDA only), DCP save and the full state dict gathered to rank 0's CPU.
"""

from __future__ import annotations

import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def _model(device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)

    def check(name, fn) -> None:
        try:
            result = fn()
            if rank == 0:
                print(f"OK   {name}: {result}", flush=True)
        except Exception as exc:  # noqa: BLE001 (the probe reports every failure)
            if rank == 0:
                print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)

    def gather():
        out = torch.empty(4, device=device)
        dist.all_gather_into_tensor(out, torch.full((2,), float(rank), device=device))
        return out.tolist()

    def scatter(op):
        out = torch.empty(2, device=device)
        dist.reduce_scatter_tensor(out, torch.arange(4.0, device=device) + rank, op=op)
        return out.tolist()

    def step():
        model = _model(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = model(torch.randn(3, 8, device=device)).sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss), float(norm), type(model[0].weight).__name__, tuple(model[0].weight.to_local().shape)

    def accumulate():
        model = _model(device)
        model.set_requires_gradient_sync(False)
        model(torch.randn(3, 8, device=device)).sum().backward()
        model.set_requires_gradient_sync(True)
        model(torch.randn(3, 8, device=device)).sum().backward()
        return float(model[0].weight.grad.to_local().norm())

    def mixed():
        layer = nn.Linear(8, 8).to(device)
        fully_shard(layer, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        layer(torch.randn(2, 8, device=device)).sum().backward()
        return str(layer.weight.grad.dtype)

    def checkpoint():
        model = _model(device)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 8, device=device)).sum().backward()
        optimizer.step()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        path = [tempfile.mkdtemp() if rank == 0 else None]
        dist.broadcast_object_list(path)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path[0])
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path[0], ignore_errors=True)
        return sorted(full)[:2], tuple(full["0.weight"].shape) if rank == 0 else None

    check("all_gather_into_tensor", gather)
    check("reduce_scatter_tensor SUM", lambda: scatter(dist.ReduceOp.SUM))
    check("reduce_scatter_tensor AVG", lambda: scatter(dist.ReduceOp.AVG))
    check("fully_shard forward/backward/clip/AdamW", step)
    check("set_requires_gradient_sync accumulation", accumulate)
    check("MixedPrecisionPolicy(bf16, fp32)", mixed)
    check("DCP save + full state dict on rank 0", checkpoint)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
