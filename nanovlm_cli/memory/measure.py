"""Measuring a real training step: CUDA allocator peaks, or the peak RSS of a fresh CPU process."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.memory.estimate import SampleShape, synthetic_batch
from nanovlm_cli.models.vlm import VisionLanguageModel, compile_blocks
from nanovlm_cli.training.optim import apply_freezing, build_optimizer

logger = logging.getLogger(__name__)


# --- Measuring a real step -----------------------------------------------------------------------------------


@dataclass
class StepMeasurement:
    """One batch size, measured. Byte counts are the peak above the memory in use before the model was built."""

    batch_size: int
    device: str
    measured_peak_bytes: int | None  # CUDA: peak allocated; CPU: peak resident memory
    reserved_peak_bytes: int | None = None  # CUDA caching allocator reserve
    model_bytes: int | None = None  # right after the model was built
    optimizer_state_bytes: int | None = None
    step_time_s: float | None = None
    oom: bool = False
    error: str | None = None


def prepare_model(cfg: VLMConfig, train: TrainConfig, device: torch.device) -> tuple[VisionLanguageModel, Any]:
    """A randomly initialised model set up as training sets it up (freezing, checkpointing, compile) + AdamW."""
    model = VisionLanguageModel(cfg).to(device).train()  # a preset's or a checkpoint's config carries its image token id
    apply_freezing(model, train)
    model.vision.gradient_checkpointing = model.language.gradient_checkpointing = train.gradient_checkpointing
    if train.compile:
        compile_blocks(model, device)
    return model, build_optimizer(model, train, device)


def train_step(model: VisionLanguageModel, optimizer: torch.optim.Optimizer, batch: Any, device: torch.device) -> float:
    """Forward, backward and optimizer step, as the training loop does them; returns the loss."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        out = model.loss(batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux: VmHWM via /proc/self/clear_refs), so that transient peaks of
    imports and warm-up are not charged to the step. False where the platform cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports kB, macOS bytes
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def _miniature(cfg: VLMConfig) -> VLMConfig:
    """`cfg` with one layer per tower: the same code paths (layer kinds, kernels) at a fraction of the memory."""
    return cfg.replace(vision=cfg.vision.replace(n_layers=1), language=cfg.language.replace(
        n_layers=1, layer_types=cfg.language.layer_types[:1] if cfg.language.layer_types else None))


def _warm_up(cfg: VLMConfig, train: TrainConfig, shape: SampleShape, device: torch.device) -> None:
    """Run one step of a miniature model first, so that one-off costs (lazy imports such as the optimizer's
    dynamo hooks, kernel code paged in, thread pools) are in the baseline and not counted as the step's."""
    mini = _miniature(cfg)
    small = SampleShape(min(shape.seq_len, 2 * shape.image_tokens + 16), min(shape.n_views, 1), shape.view_height,
                        shape.view_width, shape.tokens_per_view)
    model, optimizer = prepare_model(mini, train.replace(compile=False), device)
    train_step(model, optimizer, synthetic_batch(mini, small, 1), device)
    del model, optimizer


def measure_step(cfg: VLMConfig, train: TrainConfig, shape: SampleShape, batch_size: int, *,
                 device: str | torch.device = "cpu", steps: int = 2, seed: int = 0) -> StepMeasurement:
    """Measure `steps` training steps in this process. On the CPU the result is only clean in a fresh process:
    use `measure_in_subprocess` (that is what it calls)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    else:
        _warm_up(cfg, train, shape, device)
        base = _rss()
        _reset_peak_rss()
    model = optimizer = batch = None
    result = StepMeasurement(batch_size, str(device), None)
    try:
        model, optimizer = prepare_model(cfg, train, device)
        result.model_bytes = (torch.cuda.memory_allocated(device) if cuda else _rss()) - base
        batch = synthetic_batch(cfg, shape, batch_size, seed=seed).to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            start = time.perf_counter()
            train_step(model, optimizer, batch, device)
            if cuda:
                torch.cuda.synchronize(device)
            result.step_time_s = time.perf_counter() - start
        result.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    except torch.OutOfMemoryError as exc:
        result.oom, result.error = True, str(exc).splitlines()[0]
    finally:
        if cuda:
            result.measured_peak_bytes = torch.cuda.max_memory_allocated(device) - base
            result.reserved_peak_bytes = torch.cuda.max_memory_reserved(device)
            del model, optimizer, batch
            torch.cuda.empty_cache()
        else:
            result.measured_peak_bytes = _peak_rss() - base
    return result


def measure_in_subprocess(cfg: VLMConfig, train: TrainConfig, shape: SampleShape, batch_size: int, *,
                          steps: int = 2, timeout_s: float | None = None) -> StepMeasurement:
    """`measure_step` on the CPU in a fresh Python process, so each peak is this step's alone.

    Large blocks are forced to `mmap` (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the process at once and
    the resident peak tracks live tensors instead of allocator fragmentation.
    """
    spec = {"model": cfg.to_dict(), "train": train.to_dict(), "shape": asdict(shape), "batch_size": batch_size,
            "steps": steps}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-m", "nanovlm_cli.memory", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=timeout_s, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        oom = proc.returncode in (-9, 137)  # killed by the kernel's OOM killer
        return StepMeasurement(batch_size, "cpu", None, oom=oom, error=f"subprocess exited {proc.returncode}: {tail}")
    return StepMeasurement(**json.loads(lines[-1]))


