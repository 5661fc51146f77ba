"""`nanovlm eval`: score a checkpoint on a benchmark and keep a per-sample ledger.

Thin layer over the library's evaluation: the native backend runs MMStar-format multiple choice (the Hub
MMStar set, the built-in shapes set, or a local directory in the same format); `--backend lmms-eval` hands the
checkpoint to lmms-eval's tasks. `--scoring rank` picks options by likelihood instead of asking for a letter.
`--compare` prints the difference to an earlier results file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nanovlm_cli.cli.arguments import check_device, check_output_dir, usage_error
from nanovlm_cli.cli.console import err, out, print_json, print_result
from nanovlm_cli.cli.options import BatchSizeOpt, CheckpointArg, DeviceOpt, EvalBackend, EvalScoring, JsonOpt, as_str

SHOWN_FLIPS = 20


def _summary_table(result: Any) -> Table:
    table = Table(title=f"{result.benchmark} ({result.scoring}): {result.checkpoint or ''}", title_justify="left",
                  header_style="bold")
    table.add_column("category", style="cyan")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    for category, accuracy in result.by_category.items():
        table.add_row(category, str(result.n_by_category.get(category, "")), f"{accuracy:.4f}")
    table.add_section()
    table.add_row("[bold]overall[/]", str(result.n), f"[bold]{result.accuracy:.4f}[/]")
    return table


def _comparison_lines(result: Any) -> list[str]:
    c = result.comparison
    sign = "green" if c.delta > 0 else "red" if c.delta < 0 else "white"

    def indices(values: list[Any]) -> str:
        shown = ", ".join(str(v) for v in values[:SHOWN_FLIPS])
        return shown + (f" (+{len(values) - SHOWN_FLIPS} more)" if len(values) > SHOWN_FLIPS else "")

    sizes = "" if c.n_common == result.n == c.n_other else f" (this run {result.n}, that run {c.n_other})"
    samples = "sample" if c.n_common == 1 else "samples"
    return [
        (f"vs {escape(c.other)}: {c.other_accuracy:.4f} -> {c.accuracy:.4f} "
         f"([{sign}]{c.delta:+.4f}[/]) on the {c.n_common} {samples} both runs scored{sizes}"),
        f"fixed ({len(c.fixed)}): {indices(c.fixed) or '-'}",
        f"broken ({len(c.broken)}): {indices(c.broken) or '-'}",
    ]


def evaluate(
    checkpoint: CheckpointArg,
    benchmark: Annotated[str, typer.Option(
        "--benchmark", "-b", help="mmstar, shapes (multiple choice), shapes-open (short answers), or a directory of "
                 "MMStar-format data.")] = "mmstar",
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Score only the first N samples.")] = None,
    batch_size: BatchSizeOpt = None,
    split: Annotated[str | None, typer.Option("--split", help="Benchmark split (default: the benchmark's own).")
                     ] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="DIR", help="Write results.json and a per-sample JSONL ledger here.")] = None,
    compare: Annotated[Path | None, typer.Option(
        "--compare", metavar="OTHER_RESULTS", help="An earlier results.json to compare against.")] = None,
    backend: Annotated[EvalBackend, typer.Option("--backend", help="native or lmms-eval.")] = "native",
    scoring: Annotated[EvalScoring, typer.Option(
        "--scoring", help="generate (ask for the option's letter and read it from the reply) or rank (pick the "
                          "option text the model finds most likely; native multiple choice only).")] = "generate",
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="Comma-separated lmms-eval tasks (implies --backend lmms-eval).")] = None,
    device: DeviceOpt = "auto",
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the model: a slower start, then faster batches (native backend).")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Score CHECKPOINT on a benchmark."""
    # Every argument is checked before the checkpoint or the benchmark loads: a mistake costs a second, not a run.
    check_device(device)
    check_output_dir(output, "--output")
    if compare is not None and backend != "native":
        raise usage_error("--compare", "--compare works with the native backend only (lmms-eval keeps no "
                                       "per-sample ledger); drop --compare or --backend lmms-eval")
    from nanovlm_cli.errors import DataError  # torch-free --help: the library loads on use
    from nanovlm_cli.evaluation import check_comparable, compare_results, evaluate_checkpoint, read_results

    if compare is not None:
        try:
            earlier, _ = read_results(compare)
            if benchmark in ("shapes", "shapes-open", "mmstar"):  # other names are known once the data loads
                check_comparable(earlier, benchmark, scoring, compare)
        except DataError as exc:
            raise usage_error("--compare", str(exc)) from None
    progress = Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=True)
    with progress:
        task = progress.add_task(benchmark, total=None)
        result = evaluate_checkpoint(
            checkpoint, benchmark=benchmark, limit=limit, batch_size=batch_size, split=split,
            output_dir=as_str(output), backend=backend, tasks=[t for t in tasks.split(",") if t] if tasks else None,
            device=device, scoring=scoring, compile=compile,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if compare is not None:
        result = compare_results(result, str(compare))
    if json_output or not hasattr(result, "by_category"):
        print_json(result) if json_output else print_result(result, as_json=False, title=f"eval {benchmark}")
        return
    out.print(_summary_table(result))
    if result.unanswered:
        what = "were empty" if getattr(result, "open_answer", False) else "named no option"
        out.print(f"{result.unanswered} of {result.n} replies {what} (counted wrong)")
    if result.comparison is not None:
        for line in _comparison_lines(result):
            out.print(line, soft_wrap=True)
    if result.output_dir:
        err.print(f"wrote {result.output_dir}/results.json and ledger.jsonl", markup=False)
