"""Device and dtype choice for every command: the one place a `--device` / `--dtype` spelling becomes a torch object.

Main design choice: a device is checked against this machine when it is chosen, so a missing GPU is one error line
(`ConfigError`, naming the devices that exist) before anything loads, never a CUDA error in the middle of a run.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from nanovlm_cli.config import check_device_name
from nanovlm_cli.errors import ConfigError, GenerationError

DEVICE_KINDS = ("cuda", "mps", "cpu")  # what "auto" tries, in this order
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(
    name: str, local_rank: int = 0, *, kinds: Collection[str] = DEVICE_KINDS, reason: str = ""
) -> torch.device:
    """The torch device `name` asks for, checked against this machine (every command chooses its device here).

    "auto" picks CUDA (this process's local GPU), then MPS, then the CPU; "cuda" means this process's local GPU.
    A spelling that is not a device, or a device this machine lacks, is a `ConfigError` saying which ones exist.
    `kinds` narrows the device types a caller supports ("auto" then picks among them); `reason` says why, in the
    error for any other (`nanovlm vram`: "vram measures CUDA or CPU memory").
    """
    check_device_name(name)
    if name == "auto":
        if "cuda" in kinds and torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if "mps" in kinds and _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = _named_device(name, local_rank)
    if device.type not in kinds:
        choices = ", ".join("cuda[:N]" if kind == "cuda" else kind for kind in kinds)
        raise ConfigError(f"--device {name} is not supported here ({reason or 'unsupported device type'}); use "
                          f"auto, {choices}")
    return device


def _named_device(name: str, local_rank: int) -> torch.device:
    """The device of an explicit spelling ("cpu", "mps", "cuda", "cuda:N"), or `ConfigError` if it is missing."""
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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise GenerationError(f"dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
