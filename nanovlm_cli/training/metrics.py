"""What the training loop reports: per-step metrics, run information, and the callback that receives them.

The loop never prints. The CLI passes a callback (a Rich dashboard on a terminal, log lines otherwise); the loop
also appends every step to `metrics.jsonl`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class RunInfo:
    run_dir: str
    run_name: str
    device: str
    world_size: int
    n_params_trainable: int
    n_params_frozen: int
    max_steps: int
    start_step: int
    resumed_from: str | None = None


@dataclass
class StepMetrics:
    step: int  # optimiser steps done (1-based after the first step)
    loss: float
    lr: dict[str, float]
    grad_norm: float
    tokens_per_s: float
    samples_per_s: float
    data_wait_fraction: float
    memory: dict[str, float]
    step_time_s: float
    samples_seen: int
    skipped_nonfinite: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainSummary:
    run_dir: str
    steps: int
    samples_seen: int
    tokens_seen: int
    skipped: dict[str, int]
    final_loss: float | None
    best_val_loss: float | None  # the lowest validation loss of the run
    final_val_loss: float | None  # the last validation loss
    wall_time_s: float  # training (setup, steps, validation, saves), not the end-of-run evaluation
    samples_per_s: float
    tokens_per_s: float
    final_checkpoint: str | None
    interrupted: bool = False
    dataset: str | None = None
    eval: dict[str, Any] | None = None
    nonfinite_steps: int = 0
    interrupted_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run
    interrupted_during: str | None = None  # "evaluation" when training had finished and only the evaluation stopped
    eval_time_s: float | None = None  # the end-of-run evaluation, after `wall_time_s` of training
    max_steps: int | None = None
    start_step: int = 0  # the step this process started at (0, or the resumed checkpoint's step)
    n_params: int | None = None  # parameters of the model (trainable and frozen)
    n_params_trainable: int | None = None  # what the optimizer updates (LoRA: the adapters, and the projector)
    n_params_frozen: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainCallback(Protocol):
    def on_start(self, info: RunInfo) -> None: ...
    def on_step(self, metrics: StepMetrics) -> None: ...
    def on_validation(self, step: int, val_loss: float) -> None: ...
    def on_checkpoint(self, step: int, path: str) -> None: ...
    def on_end(self, summary: TrainSummary) -> None: ...


class NullCallback:
    def on_start(self, info: RunInfo) -> None: pass
    def on_step(self, metrics: StepMetrics) -> None: pass
    def on_validation(self, step: int, val_loss: float) -> None: pass
    def on_checkpoint(self, step: int, path: str) -> None: pass
    def on_end(self, summary: TrainSummary) -> None: pass


def memory_snapshot(device: torch.device) -> dict[str, float]:
    """CUDA allocated / reserved / peak / total (bytes) on GPU; process RSS on CPU."""
    if device.type == "cuda":
        return {
            "cuda_allocated": float(torch.cuda.memory_allocated(device)),
            "cuda_reserved": float(torch.cuda.memory_reserved(device)),
            "cuda_peak": float(torch.cuda.max_memory_allocated(device)),
            "cuda_total": float(torch.cuda.get_device_properties(device).total_memory),
        }
    import psutil

    return {"rss": float(psutil.Process(os.getpid()).memory_info().rss)}
