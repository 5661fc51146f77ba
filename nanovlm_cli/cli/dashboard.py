"""The live training dashboard of `nanovlm train` on a terminal: a Rich `Live` view on stderr.

It shows the run (name, device, world size, parameter counts), a progress bar with elapsed time and ETA, the loss
with a sparkline of the last 40 steps, learning rate per param group, grad norm, throughput, data-wait fraction,
the last validation loss and checkpoint, and a memory panel (CUDA allocated / reserved / peak / total, or the
process RSS on CPU).

Design choice: the loop's callbacks only record facts in a `RunState` (under a lock); the view is rebuilt from it
by Live's own refresh thread a few times a second at most, so a fast loop never pays for rendering and a slow step
still sees the clock and ETA move. Log records and warnings printed meanwhile appear above the live view.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from nanovlm_cli.cli.console import err
from nanovlm_cli.cli.progress import (
    LogProgress,
    RunState,
    SilentProgress,
    end_line,
    format_bytes,
    format_duration,
    format_loss,
    format_lr,
    is_main_process,
    memory_items,
    sparkline,
)

REFRESH_PER_SECOND = 4


class Dashboard(SilentProgress):
    """A `TrainCallback` that draws a live view on `console` from `on_start` until `on_end` (or `close`)."""

    def __init__(self, console: Console, *, refresh_per_second: float = REFRESH_PER_SECOND,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.refresh_per_second = refresh_per_second
        self.state = RunState(clock)
        self._lock = threading.Lock()
        self._live: Live | None = None

    # ------------------------------------------------------------------------------------------- callbacks

    def on_start(self, info: Any) -> None:
        with self._lock:
            self.state.start(info)
        self._live = Live(console=self.console, get_renderable=self.render, auto_refresh=True,
                          refresh_per_second=self.refresh_per_second, transient=False,
                          redirect_stdout=False,  # stdout is for results; keep it clean
                          redirect_stderr=True)
        self._live.start()

    def on_step(self, metrics: Any) -> None:
        with self._lock:
            self.state.step(metrics)

    def on_validation(self, step: int, val_loss: float) -> None:
        with self._lock:
            self.state.val_loss, self.state.val_step = val_loss, step

    def on_checkpoint(self, step: int, path: str) -> None:
        with self._lock:
            self.state.checkpoint, self.state.checkpoint_step = path, step

    def on_end(self, summary: Any) -> None:
        self.close()
        self.console.print(end_line(summary), soft_wrap=True, markup=False, highlight=False)

    def close(self) -> None:
        """Stop the live view, leaving its last frame on screen (safe to call twice)."""
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    # ------------------------------------------------------------------------------------------- view

    def render(self) -> RenderableType:
        """The whole dashboard as one renderable (what Live draws; tests print it to a recording console)."""
        with self._lock:
            return Group(self._training_panel(), self._memory_panel())

    def _training_panel(self) -> Panel:
        s, info, m = self.state, self.state.info, self.state.last
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", no_wrap=True, width=10)  # fixed: rows appear as the run goes
        grid.add_column(overflow="fold")
        if info is not None:
            grid.add_row("run", Text(f"{info.run_dir}  ·  {info.device}  ·  world size {info.world_size}"))
            grid.add_row("params", Text(f"{info.n_params_trainable:,} trainable / {info.n_params_frozen:,} frozen"))
        grid.add_row("progress", self._progress_row())
        if m is not None:
            loss = Text(format_loss(m.loss), style="bold")
            loss.append("  ")
            loss.append(sparkline(s.losses), style="green")
            finite = [v for v in s.losses if math.isfinite(v)]
            if len(finite) > 1:
                loss.append(f"  last {len(s.losses)}: min {min(finite):.4f} max {max(finite):.4f}", style="dim")
            grid.add_row("loss", loss)
            grid.add_row("lr", Text(format_lr(m.lr) or "-"))
            grid.add_row("grad norm", Text(f"{m.grad_norm:.3f}"))
            grid.add_row("throughput", Text(f"{m.tokens_per_s:,.0f} tok/s  ·  {m.samples_per_s:,.1f} samples/s  ·  "
                                            f"{m.step_time_s:.2f} s/step  ·  {m.samples_seen:,} samples seen"))
            grid.add_row("data wait", Text(f"{m.data_wait_fraction:.0%} of step time"))
            if m.skipped_nonfinite:
                grid.add_row("non-finite", Text(f"{m.skipped_nonfinite} steps skipped", style="bold red"))
        else:
            grid.add_row("loss", Text("waiting for the first step…", style="dim"))
        if s.val_loss is not None:
            grid.add_row("validation", Text(f"{format_loss(s.val_loss)} (step {s.val_step})"))
        if s.checkpoint is not None:
            grid.add_row("checkpoint", Text(f"{s.checkpoint} (step {s.checkpoint_step})"))
        title = f"nanovlm train · {info.run_name}" if info is not None else "nanovlm train"
        return Panel(grid, title=Text(title, style="bold"), title_align="left", border_style="blue")

    def _progress_row(self) -> Table:
        s = self.state
        total = max(1, s.max_steps)
        row = Table.grid(padding=(0, 2))
        row.add_column(width=40)
        row.add_column(no_wrap=True)
        eta = s.eta_s()
        text = f"{s.done}/{s.max_steps}  {s.done / total:.1%}  elapsed {format_duration(s.elapsed_s())}  " \
               f"eta {format_duration(eta) if eta is not None else '-'}"
        if s.info is not None and s.info.resumed_from:
            text += f"  (resumed at step {s.info.start_step})"
        row.add_row(ProgressBar(total=total, completed=s.done, width=40), Text(text))
        return row

    def _memory_panel(self) -> Panel:
        memory: dict[str, float] = self.state.last.memory if self.state.last is not None else {}
        items = memory_items(memory)
        device = self.state.info.device if self.state.info is not None else "?"
        if "cuda_allocated" in memory:
            table = Table(box=None, padding=(0, 2), show_edge=False)
            table.add_column("device", style="bold cyan")
            for label, _ in items:
                table.add_column(label, justify="right")
            table.add_column("reserved / total")
            reserved_total = Text("")
            if "cuda_total" in memory and "cuda_reserved" in memory:
                reserved_total = ProgressBar(total=memory["cuda_total"], completed=memory["cuda_reserved"], width=20)
            table.add_row(device, *(value for _, value in items), reserved_total)
            body: RenderableType = table
        elif "rss" in memory:
            body = Text(f"process RSS {format_bytes(memory['rss'])} ({device})")
        else:
            body = Text("no memory figures yet", style="dim")
        return Panel(body, title=Text("memory", style="bold"), title_align="left", border_style="blue")


def progress_callback(interval: int, *, dashboard: bool = True, console: Console | None = None) -> SilentProgress:
    """The callback for this process: silent off rank 0, a live dashboard on a terminal, plain lines otherwise.

    Use it as a context manager so a live display is stopped even when training raises.
    """
    console = console or err  # stderr
    if not is_main_process():
        return SilentProgress()
    if dashboard and console.is_terminal and not console.is_dumb_terminal:
        return Dashboard(console)
    return LogProgress(interval, console)

