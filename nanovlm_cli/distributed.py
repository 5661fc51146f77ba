"""Process-group setup for torchrun: one process per device, NCCL on CUDA and gloo on CPU.

`torchrun --nproc_per_node N -m nanovlm_cli train ...` sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous
variables for several machines); a plain `nanovlm train` runs as a world of one with no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovlm_cli.config import check_device_name
from nanovlm_cli.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device `name` asks for, checked against this machine (every command chooses its device here).

    "auto" picks CUDA (this process's local GPU), then MPS, then the CPU; "cuda" means this process's local GPU.
    A spelling that is not a device, or a device this machine lacks, is a `ConfigError` saying which ones exist.
    """
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' (Apple GPU) is not available on this machine; use --device cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"device {name!r}: no CUDA GPU is visible to PyTorch {torch.__version__} ({build}); "
                          "use --device cpu or auto")
    index = int(name.partition(":")[2] or local_rank)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
                          "pick one of those")
    return torch.device("cuda", index)


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank), device


def all_reduce_sum(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
