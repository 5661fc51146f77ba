"""`nanovlm vram`: peak training memory per batch size, measured on the device, for a preset or checkpoint.

`--batch-sizes 1 2 4 8` takes several values after one flag (click options take one value each, so the values
after the first arrive as extra arguments and are collected here; `--batch-sizes 1,2,4` works too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nanovlm_cli.cli.console import library_function, print_result
from nanovlm_cli.cli.options import (
    CompileOpt,
    DeviceOpt,
    FreezeVisionOpt,
    GradientCheckpointingOpt,
    JsonOpt,
    PresetName,
    as_str,
)
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.run_config import resolve_run_config

DEFAULT_BATCH_SIZES = (1, 2, 4, 8)


def parse_batch_sizes(first: str | None, extra: list[str]) -> list[int]:
    """`--batch-sizes 1 2 4` or `--batch-sizes 1,2,4` -> [1, 2, 4]; the default sweep when not given."""
    if first is None:
        if extra:
            raise ConfigError(f"unexpected argument(s) {' '.join(extra)}; batch sizes follow --batch-sizes")
        return list(DEFAULT_BATCH_SIZES)
    sizes: list[int] = []
    for token in [first, *extra]:
        for piece in token.replace(",", " ").split():
            if not piece.isdigit() or int(piece) < 1:
                raise ConfigError(f"--batch-sizes value {piece!r} is not a positive integer; pass e.g. 1 2 4 8")
            sizes.append(int(piece))
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
                                              help="Stop the sweep at the first out-of-memory.")] = True,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="PNG",
                                              help="Save a memory-vs-batch-size plot (needs matplotlib).")] = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Measure peak training memory for several batch sizes."""
    sizes = parse_batch_sizes(batch_sizes, list(ctx.args))
    if preset is not None and checkpoint is not None:
        raise ConfigError(f"--preset {preset} and --checkpoint {checkpoint} both given; pass one of them")
    overrides = {"compile": compile, "gradient_checkpointing": gradient_checkpointing,
                 "freeze_vision_encoder": freeze_vision_encoder, "max_seq_len": seq_len}
    model_cfg, train_cfg = resolve_run_config(preset or "default", overrides=overrides)

    # TODO(memory): provide nanovlm_cli.memory.measure_vram(...) -> a report with to_dict().
    measure_vram = library_function("nanovlm_cli.memory", "measure_vram", "vram")
    report = measure_vram(
        None if checkpoint else model_cfg, train_cfg, checkpoint=checkpoint, batch_sizes=sizes,
        images_per_sample=images_per_sample, max_memory_gib=max_batch_size_for, stop_on_oom=stop_on_oom,
        device=device,
    )
    if plot is not None:
        # TODO(memory): provide nanovlm_cli.memory.plot_vram(report, path).
        library_function("nanovlm_cli.memory", "plot_vram", "vram --plot")(report, as_str(plot))
    print_result(report, as_json=json_output, title="peak memory per batch size")
