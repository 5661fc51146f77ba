"""The sweep behind `nanovlm vram`: measured and estimated peaks per batch size, and the plot.

Each size is estimated first (the memory model, in milliseconds). A size whose estimate for the measuring device
clearly exceeds the memory available there (`SKIP_FACTOR`) is reported as skipped instead of being built and
run into an out-of-memory minutes later; `measure_all` measures it anyway, and `estimate_only` measures nothing
(for planning a GPU from a laptop).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch

from nanovlm_cli.checkpoint.files import resolve_source
from nanovlm_cli.checkpoint.io import read_model_config
from nanovlm_cli.config import TrainConfig, VLMConfig, check_device_name
from nanovlm_cli.devices import resolve_device
from nanovlm_cli.errors import ConfigError, NanoVLMError
from nanovlm_cli.memory.estimate import GIB, SampleShape, estimate_memory, max_batch_size, sample_shape
from nanovlm_cli.memory.measure import measure_in_subprocess, measure_step
from nanovlm_cli.memory.sharding import estimate_per_rank, max_batch_size_per_rank

logger = logging.getLogger(__name__)

SKIP_FACTOR = 1.2  # skip a measurement whose estimate exceeds the available memory by more than this factor
MEASURED_DEVICES = ("cuda", "cpu")  # the memory a sweep can read: the CUDA allocator's peaks, or resident memory


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
    skipped: str | None = None  # why it was not measured (too big for the memory available, --estimate-only)


@dataclass
class VramReport:
    device: str
    rows: list[VramRow]
    seq_len: int
    shape: SampleShape
    measured: str  # what `measured_peak_bytes` means on this device
    max_memory_gib: float | None = None
    max_batch_size: int | None = None  # the largest batch size the model says fits max_memory_gib (CUDA)
    available_bytes: int | None = None  # memory available on the device when the sweep started

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "measured": self.measured, "seq_len": self.seq_len,
                "shape": asdict(self.shape), "rows": [asdict(r) for r in self.rows],
                "max_memory_gib": self.max_memory_gib, "max_batch_size": self.max_batch_size,
                "available_bytes": self.available_bytes}


def _measured_device(device: str) -> torch.device:
    """The device a sweep measures on: CUDA or the CPU only (`--device auto` never picks MPS)."""
    return resolve_device(device, kinds=MEASURED_DEVICES, reason="vram measures CUDA or CPU memory")


def available_memory(device: torch.device) -> int | None:
    """Bytes a step could still use on `device`: free CUDA memory, or the OS's available RAM (None if unknown)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        return int(psutil.virtual_memory().available)
    except Exception as exc:  # noqa: BLE001 (an unknown amount only means nothing is skipped)
        logger.debug("cannot read the memory available on %s: %s", device, exc)
        return None


def _row_seq_len(model_cfg: VLMConfig, train_cfg: TrainConfig, seq_len: int | None, checkpoint: str | None) -> int:
    """Tokens per row: `seq_len` when given (at most the model's context), else the preset's, capped at the context."""
    context = model_cfg.language.max_position_embeddings
    whose = f"checkpoint {checkpoint}" if checkpoint else "model"
    if seq_len is not None:
        if seq_len > context:
            raise ConfigError(f"--seq-len {seq_len} is longer than the {whose}'s context of {context} positions; "
                              f"pass --seq-len {context} or less")
        return seq_len
    if train_cfg.max_seq_len > context:
        logger.info("rows of %d tokens: the %s's context (the preset's max_seq_len %d is longer)", context, whose,
                    train_cfg.max_seq_len)
        return context
    return train_cfg.max_seq_len


def _estimate_device(device: str) -> torch.device:
    """The device a sweep without measurements estimates for: any device spelling, present on this machine or not."""
    check_device_name(device)
    if device == "auto":
        return _measured_device(device)
    if device == "mps":
        raise ConfigError("--device mps is not supported by vram (it models CUDA or CPU memory); use cpu or cuda")
    return torch.device(device)


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
    seq_len: int | None = None,
    estimate_only: bool = False,
    measure_all: bool = False,
    fsdp_world_size: int | None = None,
) -> VramReport:
    """Estimate, then measure, peak training memory for each batch size.

    Rows hold `seq_len` tokens (default: `train_cfg.max_seq_len`, capped at the model's context, e.g. a small
    checkpoint's). A size whose estimate exceeds the available memory by `SKIP_FACTOR` is skipped unless
    `measure_all`; `estimate_only` measures no size (and needs no such device on this machine).
    `fsdp_world_size`: each row is one rank's estimate under `--strategy fsdp` over that many ranks
    (`memory.sharding`); nothing is measured (that takes the ranks: benchmarks/gpu_fsdp.sh).
    """
    estimate_only = estimate_only or fsdp_world_size is not None
    if checkpoint is not None:
        model_cfg = read_model_config(resolve_source(checkpoint))
    if model_cfg is None:
        raise ConfigError("measure_vram needs a model config or a checkpoint; pass one of them")
    if estimate_only and measure_all:
        raise ConfigError("--estimate-only measures nothing and --measure-all measures every size; pass one of them")
    dev = _estimate_device(device) if estimate_only else _measured_device(device)
    train_cfg = train_cfg.replace(max_seq_len=_row_seq_len(model_cfg, train_cfg, seq_len, checkpoint))
    shape = sample_shape(model_cfg, train_cfg.max_seq_len, images_per_sample)
    available = None if estimate_only else available_memory(dev)
    rows: list[VramRow] = []
    for n in batch_sizes:
        cuda_estimate, device_estimate = (
            estimate_memory(model_cfg, shape, n, train=train_cfg, device_type=kind) if fsdp_world_size is None else
            estimate_per_rank(model_cfg, shape, n, train=train_cfg, world_size=fsdp_world_size, device_type=kind)
            for kind in ("cuda", dev.type))
        row = VramRow(n, None, cuda_estimate.total, False, device_estimate.total, estimate=cuda_estimate.to_dict())
        rows.append(row)
        if estimate_only:
            row.skipped = "estimate only"
            continue
        if available is not None and not measure_all and device_estimate.total > SKIP_FACTOR * available:
            row.skipped = (f"needs about {device_estimate.total / GIB:.1f} GiB, {available / GIB:.1f} GiB available "
                           "(--measure-all to try)")
            logger.info("batch size %d: skipped, %s", n, row.skipped)
            continue
        logger.info("batch size %d: measuring on %s", n, dev)
        if dev.type == "cuda":
            m = measure_step(model_cfg, train_cfg, shape, n, device=dev)
        else:
            m = measure_in_subprocess(model_cfg, train_cfg, shape, n)
        if m.error and not m.oom:
            raise NanoVLMError(f"measuring batch size {n} failed: {m.error}")
        row.measured_peak_bytes, row.oom, row.reserved_peak_bytes = m.measured_peak_bytes, m.oom, m.reserved_peak_bytes
        row.model_bytes, row.optimizer_state_bytes = m.model_bytes, m.optimizer_state_bytes
        row.step_time_s, row.error = m.step_time_s, m.error
        if m.oom and stop_on_oom:
            break
    best = None
    if max_memory_gib is not None and fsdp_world_size is not None:
        best = max_batch_size_per_rank(model_cfg, shape, max_memory_gib * GIB, train=train_cfg,
                                       world_size=fsdp_world_size)
    elif max_memory_gib is not None:
        best = max_batch_size(model_cfg, shape, max_memory_gib * GIB, train=train_cfg, device_type="cuda")
    if fsdp_world_size is not None:
        measured = (f"nothing (--strategy fsdp: the memory model's estimate for one of {fsdp_world_size} ranks, "
                    "batch size per rank)")
    elif estimate_only:
        measured = "nothing (--estimate-only: the memory model alone)"
    elif dev.type == "cuda":
        measured = "peak allocated CUDA memory above the empty device"
    else:
        measured = "peak resident CPU memory above the process before the model (fp32, no autocast)"
    return VramReport(str(dev), rows, train_cfg.max_seq_len, shape, measured, max_memory_gib, best, available)


def plot_vram(report: VramReport, path: str) -> None:
    """Save measured and estimated peak memory per batch size as a PNG (needs the `plot` extra)."""
    try:  # the optional `plot` extra, imported on use
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


