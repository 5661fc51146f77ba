"""`nanovlm eval`: score a checkpoint on a benchmark and keep a per-sample ledger.

Thin layer over the library's evaluation: the native backend runs MMStar-format multiple choice (the Hub
MMStar set, the built-in shapes set, or a local directory in the same format); `--backend lmms-eval` hands the
checkpoint to lmms-eval's tasks. `--compare` prints the difference to an earlier results file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nanovlm_cli.cli.console import library_function, print_result
from nanovlm_cli.cli.options import BatchSizeOpt, CheckpointArg, DeviceOpt, EvalBackend, JsonOpt, as_str


def evaluate(
    checkpoint: CheckpointArg,
    benchmark: Annotated[str, typer.Option(
        "--benchmark", "-b", help="mmstar, shapes, or a directory of MMStar-format data.")] = "mmstar",
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Score only the first N samples.")] = None,
    batch_size: BatchSizeOpt = None,
    split: Annotated[str | None, typer.Option("--split", help="Benchmark split (default: the benchmark's own).")
                     ] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="DIR", help="Write results.json and a per-sample JSONL ledger here.")] = None,
    compare: Annotated[Path | None, typer.Option(
        "--compare", metavar="OTHER_RESULTS", help="An earlier results.json to compare against.")] = None,
    backend: Annotated[EvalBackend, typer.Option("--backend", help="native or lmms-eval.")] = "native",
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="Comma-separated lmms-eval tasks (with --backend lmms-eval).")] = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Score CHECKPOINT on a benchmark."""
    # TODO(evaluation): provide nanovlm_cli.evaluation.evaluate_checkpoint(...) -> a result with to_dict().
    evaluate_checkpoint = library_function("nanovlm_cli.evaluation", "evaluate_checkpoint", "eval")
    result = evaluate_checkpoint(
        checkpoint, benchmark=benchmark, limit=limit, batch_size=batch_size, split=split, output_dir=as_str(output),
        backend=backend, tasks=tasks.split(",") if tasks else None, device=device,
    )
    if compare is not None:
        # TODO(evaluation): provide nanovlm_cli.evaluation.compare_results(result, other_results_path).
        compare_results = library_function("nanovlm_cli.evaluation", "compare_results", "eval --compare")
        result = compare_results(result, str(compare))
    print_result(result, as_json=json_output, title=f"eval {benchmark}")
