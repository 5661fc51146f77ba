"""The sweep behind `nanovlm vram`: measured and estimated peaks per batch size, and the plot."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.errors import ConfigError, NanoVLMError
from nanovlm_cli.memory.estimate import GIB, SampleShape, estimate_memory, max_batch_size, sample_shape
from nanovlm_cli.memory.measure import measure_in_subprocess, measure_step

logger = logging.getLogger(__name__)


# --- The sweep behind `nanovlm vram` -------------------------------------------------------------------------


@dataclass
class VramRow:
    batch_size: int
    measured_peak_bytes: int | None
    estimated_peak_bytes: int  # the memory model's CUDA (bf16 autocast) peak
    oom: bool
    estimated_device_peak_bytes: int  # the memory model's peak for the device measured (fp32 on CPU)
    reserved_peak_bytes: int | None = None
    model_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    step_time_s: float | None = None
    error: str | None = None
    estimate: dict[str, int] = field(default_factory=dict)  # CUDA breakdown


@dataclass
class VramReport:
    device: str
    rows: list[VramRow]
    seq_len: int
    shape: SampleShape
    measured: str  # what `measured_peak_bytes` means on this device
    max_memory_gib: float | None = None
    max_batch_size: int | None = None  # the largest batch size the model says fits max_memory_gib (CUDA)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "measured": self.measured, "seq_len": self.seq_len,
                "shape": asdict(self.shape), "rows": [asdict(r) for r in self.rows],
                "max_memory_gib": self.max_memory_gib, "max_batch_size": self.max_batch_size}


def resolve_device(device: str) -> torch.device:
    """The device `nanovlm vram` measures on: `distributed.resolve_device`, CUDA or the CPU only ("auto" skips MPS)."""
    from nanovlm_cli import distributed

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = distributed.resolve_device(device)
    if dev.type not in ("cuda", "cpu"):
        raise ConfigError(f"--device {device} is not supported by vram (it measures CUDA or CPU memory); use auto, "
                          "cpu or cuda[:N]")
    return dev


def measure_vram(
    model_cfg: VLMConfig | None,
    train_cfg: TrainConfig,
    *,
    checkpoint: str | None = None,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    images_per_sample: int = 1,
    max_memory_gib: float | None = None,
    stop_on_oom: bool = False,
    device: str = "auto",
) -> VramReport:
    """Measure and estimate peak training memory for each batch size (rows of `train_cfg.max_seq_len` tokens)."""
    if checkpoint is not None:
        from nanovlm_cli.checkpoint.files import resolve_source
        from nanovlm_cli.checkpoint.io import read_model_config

        model_cfg = read_model_config(resolve_source(checkpoint))
    if model_cfg is None:
        raise ConfigError("measure_vram needs a model config or a checkpoint; pass one of them")
    dev = resolve_device(device)
    shape = sample_shape(model_cfg, train_cfg.max_seq_len, images_per_sample)
    rows: list[VramRow] = []
    for n in batch_sizes:
        cuda_estimate = estimate_memory(model_cfg, shape, n, train=train_cfg, device_type="cuda")
        device_estimate = estimate_memory(model_cfg, shape, n, train=train_cfg, device_type=dev.type)
        logger.info("batch size %d: measuring on %s", n, dev)
        if dev.type == "cuda":
            m = measure_step(model_cfg, train_cfg, shape, n, device=dev)
        else:
            m = measure_in_subprocess(model_cfg, train_cfg, shape, n)
        if m.error and not m.oom:
            raise NanoVLMError(f"measuring batch size {n} failed: {m.error}")
        rows.append(VramRow(n, m.measured_peak_bytes, cuda_estimate.total, m.oom, device_estimate.total,
                            m.reserved_peak_bytes, m.model_bytes, m.optimizer_state_bytes, m.step_time_s, m.error,
                            cuda_estimate.to_dict()))
        if m.oom and stop_on_oom:
            break
    best = None
    if max_memory_gib is not None:
        best = max_batch_size(model_cfg, shape, max_memory_gib * GIB, train=train_cfg, device_type="cuda")
    measured = ("peak allocated CUDA memory above the empty device" if dev.type == "cuda"
                else "peak resident CPU memory above the process before the model (fp32, no autocast)")
    return VramReport(str(dev), rows, train_cfg.max_seq_len, shape, measured, max_memory_gib, best)


def plot_vram(report: VramReport, path: str) -> None:
    """Save measured and estimated peak memory per batch size as a PNG (needs the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib; install it with: pip install 'nanovlm-cli[plot]'") from None
    sizes = [r.batch_size for r in report.rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    measured = [(r.batch_size, r.measured_peak_bytes / GIB) for r in report.rows if r.measured_peak_bytes]
    if measured:
        ax.plot(*zip(*measured), "o-", label=f"measured ({report.device})")
    ax.plot(sizes, [r.estimated_peak_bytes / GIB for r in report.rows], "s--", label="estimated CUDA (bf16)")
    if report.device == "cpu":
        ax.plot(sizes, [r.estimated_device_peak_bytes / GIB for r in report.rows], "^:", label="estimated CPU (fp32)")
    ax.set(xlabel="batch size", ylabel="peak memory (GiB)", title=f"training step memory, {report.seq_len} tokens/row")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


