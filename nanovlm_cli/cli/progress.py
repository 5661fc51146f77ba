"""Training progress on stderr: the callbacks `nanovlm train` hands to the library's training loop.

The loop never prints; it calls `on_start/on_step/on_validation/on_checkpoint/on_end` (the `TrainCallback`
protocol of `nanovlm_cli.training.metrics`) on every rank. `dashboard.progress_callback` picks what this process shows:
nothing on ranks other than 0, the live Rich dashboard (`cli/dashboard.py`) on a terminal, and plain log lines
otherwise (CI, a log file, `--no-dashboard`).

Design choice: both views read the same `RunState` (last metrics, loss history, ETA, last validation and
checkpoint) and the same formatters, so a log file and the dashboard state the same facts in the same units.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

from rich.console import Console

from nanovlm_cli.cli.console import err

SPARK_CHARS = "▁▂▃▄▅▆▇█"
LOSS_HISTORY = 40


# ----------------------------------------------------------------------------------------------- formatting


def format_bytes(n_bytes: float) -> str:
    """812 MiB below one GiB, 1.23 GiB above."""
    if n_bytes < 2**30:
        return f"{n_bytes / 2**20:,.0f} MiB"
    return f"{n_bytes / 2**30:,.2f} GiB"


def format_duration(seconds: float) -> str:
    """45s, 2m31s, 1h02m, 2d03h."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_lr(lr: Mapping[str, float]) -> str:
    """{"projector": 2e-3, "vision": 1e-3} -> "projector 2.0e-03 vision 1.0e-03" (one entry per param group)."""
    return " ".join(f"{name} {value:.1e}" for name, value in lr.items())


def format_loss(loss: float) -> str:
    return f"{loss:.4f}" if math.isfinite(loss) else str(loss)


def memory_items(memory: Mapping[str, float]) -> list[tuple[str, str]]:
    """(label, value) pairs of a `StepMetrics.memory` dict: CUDA allocated / reserved / peak / total, else RSS."""
    labels = (("cuda_allocated", "allocated"), ("cuda_reserved", "reserved"), ("cuda_peak", "peak"),
              ("cuda_total", "total"), ("rss", "rss"))
    return [(label, format_bytes(memory[key])) for key, label in labels if key in memory]


def format_memory(memory: Mapping[str, float]) -> str:
    """"rss 812 MiB" on CPU; "cuda 1.20 GiB alloc / 2.00 GiB reserved / 3.10 GiB peak of 79.10 GiB" on GPU."""
    items = dict(memory_items(memory))
    if "allocated" in items:
        text = f"cuda {items['allocated']} alloc"
        if "reserved" in items:
            text += f" / {items['reserved']} reserved"
        if "peak" in items:
            text += f" / {items['peak']} peak"
        if "total" in items:
            text += f" of {items['total']}"
        return text
    return f"rss {items['rss']}" if "rss" in items else ""


def sparkline(values: Iterable[float]) -> str:
    """One block character per value, scaled between the window's min and max; non-finite values are "!".

    [3.0, 2.0, 1.0, 1.0] -> "█▄▁▁"; a flat series is drawn at mid height.
    """
    values = list(values)
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "!" * len(values)
    lo, hi = min(finite), max(finite)
    top = len(SPARK_CHARS) - 1
    chars = []
    for v in values:
        if not math.isfinite(v):
            chars.append("!")
        elif hi == lo:
            chars.append(SPARK_CHARS[top // 2])
        else:
            chars.append(SPARK_CHARS[round((v - lo) / (hi - lo) * top)])
    return "".join(chars)


# ----------------------------------------------------------------------------------------------- shared state


class RunState:
    """What both views know about the run: its info, the last step, the loss history, validation and checkpoint.

    The ETA is measured on the wall clock from the first step this process saw (so model building and the first
    step's warm-up do not count, but validations and checkpoint saves do), falling back to the last step time.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.info: Any = None
        self.last: Any = None
        self.losses: deque[float] = deque(maxlen=LOSS_HISTORY)
        self.val_loss: float | None = None
        self.val_step: int | None = None
        self.checkpoint: str | None = None
        self.checkpoint_step: int | None = None
        self.t_start = clock()
        self._first: tuple[int, float] | None = None  # (step, time) of the first step seen
        self._t_last = self.t_start  # time of the last step seen

    def start(self, info: Any) -> None:
        self.info = info
        self.t_start = self.clock()

    def step(self, metrics: Any) -> None:
        self._t_last = self.clock()
        if self._first is None:
            self._first = (metrics.step, self._t_last)
        self.last = metrics
        self.losses.append(metrics.loss)

    @property
    def max_steps(self) -> int:
        return self.info.max_steps if self.info is not None else 0

    @property
    def done(self) -> int:
        return self.last.step if self.last is not None else (self.info.start_step if self.info is not None else 0)

    def elapsed_s(self) -> float:
        return self.clock() - self.t_start

    def eta_s(self) -> float | None:
        """Seconds left, or None before the first step; counts down between steps (e.g. during a validation)."""
        if self.last is None or self._first is None:
            return None
        remaining = max(0, self.max_steps - self.last.step)
        first_step, t_first = self._first
        if self.last.step > first_step:
            per_step = (self._t_last - t_first) / (self.last.step - first_step)
        else:
            per_step = self.last.step_time_s
        return max(0.0, remaining * per_step - (self.clock() - self._t_last))

    def step_label(self, step: int | None = None) -> str:
        return f"step {self.done if step is None else step}/{self.max_steps}"


def run_header(info: Any) -> str:
    """One line naming the run: name, directory, device, world size, parameter counts, resume point."""
    resumed = f", resumed from {info.resumed_from} at step {info.start_step}" if info.resumed_from else ""
    return (f"run {info.run_name} -> {info.run_dir} on {info.device} (world size {info.world_size}); "
            f"{info.n_params_trainable:,} trainable / {info.n_params_frozen:,} frozen parameters{resumed}")


SIGNAL_WORDS = {"SIGINT": "Ctrl-C (SIGINT)", "SIGTERM": "SIGTERM"}


def interrupted_exit_code(signal_name: str | None) -> int:
    """128 + the signal number (130 for SIGINT, 143 for SIGTERM), the shell's convention; 130 if unknown."""
    import signal

    try:
        return 128 + signal.Signals[signal_name or "SIGINT"].value
    except KeyError:
        return 130


def end_line(summary: Any) -> str:
    """The last line of a run: the command that resumes it when interrupted (naming the checkpoint once), else
    steps and time, with the end-of-run evaluation's time apart."""
    steps = f"{summary.steps}/{summary.max_steps}" if getattr(summary, "max_steps", None) else f"{summary.steps}"
    if getattr(summary, "interrupted", False):
        by = SIGNAL_WORDS.get(summary.interrupted_by, summary.interrupted_by or "a signal")
        if getattr(summary, "interrupted_during", None) == "evaluation":
            return (f"interrupted by {by} during the final evaluation; training finished ({steps} steps) and the "
                    f"model is saved in {summary.final_checkpoint}")
        if not summary.final_checkpoint:
            return f"interrupted by {by} at step {steps}; no checkpoint was saved"
        return (f"interrupted by {by} at step {steps}; checkpoint saved, resume with: "
                f"nanovlm train --resume {shlex.quote(summary.final_checkpoint)}")
    text = f"done: {summary.steps} steps in {format_duration(summary.wall_time_s)}"
    if getattr(summary, "eval_time_s", None) is not None:
        text += f", then {format_duration(summary.eval_time_s)} of evaluation"
    return text


# ----------------------------------------------------------------------------------------------- the run summary

# The protocols of the end-of-run evaluation, in the order a reader should trust them: (key in summary.eval,
# name). The letter protocol sits at chance for small models (see README), so it comes last.
EVAL_PROTOCOLS = (
    ("open", "open answer (exact match of the short reply)"),
    ("rank", "multiple choice by option likelihood"),
    ("", "multiple choice by generated letter (MMStar)"),
)


def format_score(value: float) -> str:
    return f"{value:.2f}"


def format_count(n: int) -> str:
    return f"{n:,}"


def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows of cells as aligned text lines (two spaces apart, `right` columns right-aligned, no trailing spaces)."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines


def eval_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """The end-of-run evaluation as a table: one row per protocol (named), overall and per-category accuracy."""
    results = [(name, evaluation if key == "" else evaluation.get(key)) for key, name in EVAL_PROTOCOLS]
    results = [(name, r) for name, r in results if isinstance(r, Mapping) and "accuracy" in r]
    if not results:
        return []
    categories = sorted({c for _, r in results for c in r.get("by_category", {})})
    rows = [["protocol", "overall", *categories]]
    for name, r in results:
        by = r.get("by_category", {})
        rows.append([name, format_score(r["accuracy"]),
                     *(format_score(by[c]) if c in by else "-" for c in categories)])
    n = max(int(r.get("n", 0)) for _, r in results)
    benchmark = evaluation.get("benchmark", "benchmark")
    lines = [f"evaluation on {format_count(n)} held-out {benchmark} questions (accuracy, 1.00 = all right):"]
    lines += ["  " + line for line in _columns(rows, right=set(range(1, len(rows[0]))))]
    letter = evaluation if "accuracy" in evaluation else None
    if letter is not None and letter.get("unanswered"):
        lines.append(f"  generated letter: {format_count(letter['unanswered'])} of {format_count(letter['n'])} "
                     "replies named no option")
    return lines


def summary_lines(summary: Any) -> list[str]:
    """The end-of-run summary for a person: what was trained, losses, scores per protocol and category, where the
    model is. Rounded for reading; the raw record is `summary.json` in the run directory (and `--json`)."""
    size = f"a {summary.n_params:,}-parameter model " if getattr(summary, "n_params", None) else ""
    lines = [f"trained {size}for {summary.steps} steps on {summary.dataset or 'the dataset'}: "
             f"{format_count(summary.samples_seen)} samples, {format_count(summary.tokens_seen)} tokens in "
             f"{format_duration(summary.wall_time_s)} ({summary.tokens_per_s:,.0f} tokens/s)"
             + (f", resumed at step {summary.start_step}" if getattr(summary, "start_step", 0) else "")]
    losses = []
    if summary.final_loss is not None:
        losses.append(f"train {format_loss(summary.final_loss)} (last step)")
    if summary.final_val_loss is not None:
        losses.append(f"validation {format_loss(summary.final_val_loss)} (last)")
        if summary.best_val_loss is not None and summary.best_val_loss < summary.final_val_loss:
            losses.append(f"{format_loss(summary.best_val_loss)} (best)")
    if losses:
        lines.append("loss: " + ", ".join(losses))
    skipped = {k: v for k, v in (summary.skipped or {}).items() if v}
    if skipped:
        lines.append(f"skipped {format_count(sum(skipped.values()))} samples: "
                     + ", ".join(f"{reason} {format_count(n)}" for reason, n in sorted(skipped.items())))
    if summary.nonfinite_steps:
        lines.append(f"non-finite steps skipped: {summary.nonfinite_steps}")
    if summary.eval:
        lines += eval_lines(summary.eval)
    if summary.final_checkpoint:
        lines.append(f"model: {summary.final_checkpoint}")
    lines.append(f"full record: {summary.run_dir}/summary.json (or --json)")
    return lines


# ----------------------------------------------------------------------------------------------- callbacks


class SilentProgress:
    """Shows nothing: what ranks other than 0 get, so a torchrun job prints one dashboard, not N."""

    def on_start(self, info: Any) -> None: pass
    def on_step(self, metrics: Any) -> None: pass
    def on_validation(self, step: int, val_loss: float) -> None: pass
    def on_checkpoint(self, step: int, path: str) -> None: pass
    def on_end(self, summary: Any) -> None: pass
    def close(self) -> None: pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogProgress(SilentProgress):
    """Plain lines on stderr: the run header, every `interval`-th (and the last) step, validations, checkpoints.

    `step 40/600 | loss 1.2340 | lr projector 2.0e-03 vision 1.0e-03 | grad 0.81 | 3,100 tok/s 64.0 samples/s |
    data 3% | rss 812 MiB | eta 2m31s`
    """

    def __init__(self, interval: int, console: Console | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = max(1, interval)
        self.console = console or err
        self.state = RunState(clock)

    def _print(self, text: str) -> None:
        self.console.print(text, soft_wrap=True, markup=False, highlight=False)

    def on_start(self, info: Any) -> None:
        self.state.start(info)
        self._print(run_header(info))

    def on_step(self, m: Any) -> None:
        self.state.step(m)
        if m.step % self.interval and m.step != self.state.max_steps:
            return
        self._print(self.step_line(m))

    def step_line(self, m: Any) -> str:
        parts = [self.state.step_label(m.step), f"loss {format_loss(m.loss)}"]
        if m.lr:
            parts.append(f"lr {format_lr(m.lr)}")
        parts += [f"grad {m.grad_norm:.2f}", f"{m.tokens_per_s:,.0f} tok/s {m.samples_per_s:,.1f} samples/s",
                  f"data {m.data_wait_fraction:.0%}"]
        memory = format_memory(m.memory)
        if memory:
            parts.append(memory)
        if m.skipped_nonfinite:
            parts.append(f"skipped {m.skipped_nonfinite} non-finite")
        eta = self.state.eta_s()
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def on_validation(self, step: int, val_loss: float) -> None:
        self.state.val_loss, self.state.val_step = val_loss, step
        self._print(f"{self.state.step_label(step)} | validation loss {format_loss(val_loss)}")

    def on_checkpoint(self, step: int, path: str) -> None:
        self.state.checkpoint, self.state.checkpoint_step = path, step
        self._print(f"{self.state.step_label(step)} | checkpoint {path}")

    def on_end(self, summary: Any) -> None:
        self._print(end_line(summary))


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain single process (RANK unset)."""
    return int(os.environ.get("RANK", "0")) == 0
