"""Training progress on stderr: the callback `nanovlm train` hands to the library's training loop.

The loop never prints; it calls `on_start/on_step/on_validation/on_checkpoint/on_end` (the `TrainCallback`
protocol of `nanovlm_cli.training.metrics`). This one writes a compact line every `interval` steps, which reads
well both on a terminal and in a log file; a richer live dashboard can replace it without touching the loop.
"""

from __future__ import annotations

from typing import Any

from nanovlm_cli.cli.console import err


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


class LogProgress:
    """Prints run start, every `interval`-th step, validations, checkpoints and the summary to stderr."""

    def __init__(self, interval: int) -> None:
        self.interval = max(1, interval)
        self.max_steps = 0

    def on_start(self, info: Any) -> None:
        self.max_steps = info.max_steps
        resumed = f", resumed from {info.resumed_from} at step {info.start_step}" if info.resumed_from else ""
        err.print(f"[bold]run[/] {info.run_name} -> {info.run_dir} on {info.device} (world size {info.world_size}); "
                  f"{info.n_params_trainable:,} trainable / {info.n_params_frozen:,} frozen parameters{resumed}",
                  soft_wrap=True)

    def on_step(self, m: Any) -> None:
        if m.step % self.interval and m.step != self.max_steps:
            return
        memory = m.memory.get("cuda_peak", m.memory.get("rss"))
        mem = f"  mem {_gib(memory)}" if memory is not None else ""
        lr = max(m.lr.values()) if m.lr else 0.0
        err.print(f"step {m.step:>6}/{self.max_steps}  loss {m.loss:.4f}  lr {lr:.2e}  grad {m.grad_norm:.2f}  "
                  f"{m.tokens_per_s:,.0f} tok/s{mem}", soft_wrap=True, highlight=False)

    def on_validation(self, step: int, val_loss: float) -> None:
        err.print(f"step {step:>6}  [cyan]validation loss {val_loss:.4f}[/]", soft_wrap=True)

    def on_checkpoint(self, step: int, path: str) -> None:
        err.print(f"step {step:>6}  checkpoint {path}", soft_wrap=True, markup=False)

    def on_end(self, summary: Any) -> None:
        state = "interrupted" if getattr(summary, "interrupted", False) else "done"
        err.print(f"[bold]{state}[/] after {summary.steps} steps in {summary.wall_time_s:.0f}s", soft_wrap=True)
