"""`nanovlm vram`: peak training memory per batch size, measured on the device, for a preset or checkpoint.

`--batch-sizes 1 2 4 8` takes several values after one flag (click options take one value each, so the values
after the first arrive as extra arguments and are collected here; `--batch-sizes 1,2,4` works too). Sizes the
memory model says cannot fit are reported as skipped (`--measure-all` measures them anyway); `--estimate-only`
answers from the memory model alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from nanovlm_cli.cli.arguments import check_device, check_importable, check_output_file, usage_error
from nanovlm_cli.cli.console import err, out, print_result
from nanovlm_cli.cli.options import (
    CompileOpt,
    DeviceOpt,
    FreezeVisionOpt,
    GradientCheckpointingOpt,
    JsonOpt,
    PresetName,
    as_str,
)
from nanovlm_cli.run_config import resolve_run_config

DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
GIB = 1024**3
Strategy = Literal["ddp", "fsdp"]  # train's --strategy: how training is distributed; the estimate is one rank's


def parse_batch_sizes(first: str | None, extra: list[str]) -> list[int]:
    """`--batch-sizes 1 2 4` or `--batch-sizes 1,2,4` -> [1, 2, 4]; the default sweep when not given."""
    if first is None:
        if extra:
            raise usage_error("--batch-sizes", f"unexpected argument(s) {' '.join(extra)}; batch sizes follow "
                                               "--batch-sizes")
        return list(DEFAULT_BATCH_SIZES)
    sizes: list[int] = []
    for token in [first, *extra]:
        for piece in token.replace(",", " ").split():
            if not piece.isdigit() or int(piece) < 1:
                raise usage_error("--batch-sizes", f"{piece!r} is not a positive integer; pass e.g. 1 2 4 8")
            sizes.append(int(piece))
    if not sizes:
        raise usage_error("--batch-sizes", "no batch size given; pass e.g. 1 2 4 8")
    return sizes


def vram(
    ctx: typer.Context,
    batch_sizes: Annotated[str | None, typer.Option(
        "--batch-sizes", metavar="N [N ...]", help="Batch sizes to measure, e.g. --batch-sizes 1 2 4 8.")] = None,
    preset: Annotated[PresetName | None, typer.Option(
        "--preset", help="Measure this preset's model (default: the default preset).")] = None,
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", "-c", metavar="CHECKPOINT", help="Measure this checkpoint instead of a preset.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", min=1,
                                                help="Tokens per row (default: the preset's max_seq_len).")] = None,
    images_per_sample: Annotated[int, typer.Option("--images-per-sample", min=0,
                                                   help="Images in each row.")] = 1,
    freeze_vision_encoder: FreezeVisionOpt = None,
    gradient_checkpointing: GradientCheckpointingOpt = None,
    compile: CompileOpt = None,
    max_batch_size_for: Annotated[float | None, typer.Option(
        "--max-batch-size-for", metavar="GIB", help="Also report the largest batch size that fits in GIB GiB.")
    ] = None,
    stop_on_oom: Annotated[bool, typer.Option("--stop-on-oom/--no-stop-on-oom",
                                              help="Stop the sweep at the first out-of-memory (default: report it and go on).")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="PNG",
                                              help="Save a memory-vs-batch-size plot (needs matplotlib).")] = None,
    estimate_only: Annotated[bool, typer.Option(
        "--estimate-only", help="Answer from the memory model alone: nothing is built or run (plan a GPU from a "
                                "laptop).")] = False,
    measure_all: Annotated[bool, typer.Option(
        "--measure-all", help="Measure every size, even those whose estimate exceeds the memory available "
                              "(skipped by default).")] = False,
    strategy: Annotated[Strategy, typer.Option(
        "--strategy", help="ddp: one process's memory (each DDP rank holds all of it); fsdp: one rank's estimate "
                           "with parameters, gradients and optimizer state sharded over --world-size ranks.")
    ] = "ddp",
    world_size: Annotated[int | None, typer.Option(
        "--world-size", min=1, metavar="N", help="FSDP ranks the model is sharded over (--strategy fsdp).")] = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Measure peak training memory for several batch sizes."""
    # Every argument is checked before anything is built or measured.
    sizes = parse_batch_sizes(batch_sizes, list(ctx.args))
    check_device(device)
    if preset is not None and checkpoint is not None:
        raise usage_error("--checkpoint", f"--preset {preset} and --checkpoint {checkpoint} both given; pass one "
                                          "of them")
    if max_batch_size_for is not None and not max_batch_size_for > 0:
        raise usage_error("--max-batch-size-for", f"{max_batch_size_for:g} GiB is not a memory size; pass a "
                                                  "positive number of GiB, e.g. 24")
    if estimate_only and measure_all:
        raise usage_error("--measure-all", "--estimate-only measures nothing; pass one of --estimate-only and "
                                           "--measure-all")
    fsdp_world_size = _fsdp_world_size(strategy, world_size, measure_all)
    if plot is not None:
        check_output_file(plot, "--plot")
        check_importable("matplotlib", "--plot", "pip install 'nanovlm-cli[plot]'")
    overrides = {"compile": compile, "gradient_checkpointing": gradient_checkpointing,
                 "freeze_vision_encoder": freeze_vision_encoder}
    model_cfg, train_cfg = resolve_run_config(preset or "default", overrides=overrides)

    from nanovlm_cli.memory import measure_vram, plot_vram  # torch-free --help: the library loads on use

    report = measure_vram(
        None if checkpoint else model_cfg, train_cfg, checkpoint=checkpoint, batch_sizes=sizes,
        images_per_sample=images_per_sample, max_memory_gib=max_batch_size_for, stop_on_oom=stop_on_oom,
        device=device, seq_len=seq_len, estimate_only=estimate_only, measure_all=measure_all,
        fsdp_world_size=fsdp_world_size,
    )
    if plot is not None:
        plot_vram(report, as_str(plot))
    if json_output:
        print_result(report, as_json=True)
        return
    render_report(report)
    if plot is not None:
        err.print(f"plot written to {plot}", markup=False)


def _fsdp_world_size(strategy: Strategy, world_size: int | None, measure_all: bool) -> int | None:
    """The ranks an FSDP estimate shards over (None: not FSDP); the flags that cannot go together are usage errors."""
    if strategy != "fsdp":
        if world_size is not None:
            raise usage_error("--world-size", f"--world-size {world_size} only changes the estimate under "
                                              "--strategy fsdp (every DDP rank holds the whole model); add "
                                              "--strategy fsdp")
        return None
    if world_size is None:
        raise usage_error("--world-size", "--strategy fsdp needs the number of ranks the model is sharded over; "
                                          "pass e.g. --world-size 8")
    if measure_all:
        raise usage_error("--measure-all", "--strategy fsdp is estimated, not measured, here (measuring takes the "
                                           "ranks: benchmarks/gpu_fsdp.sh); drop --measure-all")
    return world_size


def _unit(report: Any) -> tuple[str, int]:
    values = [v or 0 for r in report.rows for v in (r.measured_peak_bytes, r.estimated_peak_bytes)]
    return ("GiB", GIB) if max(values, default=0) >= GIB else ("MiB", 1024**2)


def _size(value: int | None, scale: int) -> str:
    return "-" if value is None else f"{value / scale:.2f}"


def render_report(report: Any) -> None:
    """The sweep as a Rich table, then one bar per batch size (measured vs estimated), on stdout."""
    cpu = report.device == "cpu"
    shape = report.shape
    unit, scale = _unit(report)
    title = (f"peak training memory ({unit}) on {report.device}: {report.seq_len} tokens/row, {shape.n_views} "
             f"view(s) of {shape.view_height}x{shape.view_width} px ({shape.image_tokens} image tokens)")
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in ["batch", "measured", *(["est. CPU"] if cpu else []), "est. CUDA", "model", "optim.", "step s"]:
        table.add_column(name, justify="right")
    table.add_column("status")
    for row in report.rows:
        if row.skipped:
            status = "[dim]estimate[/]" if row.skipped == "estimate only" else "[yellow]skipped[/]"
        else:
            status = "[red]OOM[/]" if row.oom else ("[yellow]failed[/]" if row.error else "[green]ok[/]")
        cells = [str(row.batch_size), _size(row.measured_peak_bytes, scale)]
        if cpu:
            cells.append(_size(row.estimated_device_peak_bytes, scale))
        cells += [_size(row.estimated_peak_bytes, scale), _size(row.model_bytes, scale),
                  _size(row.optimizer_state_bytes, scale),
                  "-" if row.step_time_s is None else f"{row.step_time_s:.2f}", status]
        table.add_row(*cells)
    out.print(table)
    notes = f"measured: {report.measured}. est. CUDA: the memory model's estimate (bf16 autocast)"
    if cpu:
        notes += "; est. CPU: its estimate for this CPU measurement"
    out.print(notes + ".", style="dim")
    for row in report.rows:
        if row.skipped and row.skipped != "estimate only":
            out.print(f"batch size {row.batch_size} skipped: {escape(row.skipped)}", soft_wrap=True)
    _bars(report, unit, scale)
    if report.max_memory_gib is not None:
        out.print(f"largest batch size that fits {report.max_memory_gib:g} GiB (estimated, CUDA bf16): "
                  f"[bold]{report.max_batch_size}[/]")


def _bars(report: Any, unit: str, scale: int, width: int = 40) -> None:
    values = [v for r in report.rows for v in (r.measured_peak_bytes, r.estimated_peak_bytes) if v]
    top = max(values, default=0)
    if not top:
        return
    grid = Table.grid(padding=(0, 1))
    for _ in range(3):
        grid.add_column()
    label = "measured (CPU)" if report.device == "cpu" else "measured"
    for row in report.rows:
        for name, value, colour in ((label, row.measured_peak_bytes, "cyan"),
                                    ("estimate (CUDA)", row.estimated_peak_bytes, "magenta")):
            if row.skipped and value is None:
                continue  # not measured: no empty bar
            bar = "" if not value else "\u2588" * max(1, round(width * value / top))
            grid.add_row(f"bs {row.batch_size:>4} {name:<15}", Text(bar, style=colour), f"{_size(value, scale)} {unit}")
    out.print(grid)
