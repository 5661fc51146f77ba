"""Evaluation: scoring a model on MMStar-format multiple choice and short answers, with a per-sample ledger.

    prompt.py    the MMStar prompt (a leaf: the shapes training data asks its questions with it too)
    choices.py   the options listed in a question, and the option a free-form reply chooses
    results.py   EvalResult, the ledger files (results.json + ledger.jsonl) and comparison with an earlier run
    datasets.py  the evaluation datasets: MMStar from the Hub, the built-in shapes set, local MMStar-format files
    scoring.py   letter ("generate") and likelihood ("rank") scoring, and `evaluate_checkpoint` (`nanovlm eval`)
    lmms.py      the optional lmms-eval adapter

Main design choice: `from nanovlm_cli.evaluation import X` keeps working for every public name, but the scorers,
datasets and adapter load on first use. `data/shapes.py` imports `evaluation.prompt`, which runs this file first;
importing the scorers here (which read the shapes set) would re-enter a half-initialised `data/shapes.py`. The
`TYPE_CHECKING` imports below are the same names, for readers and tools to follow.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from nanovlm_cli.evaluation.choices import (
    extract_choice,
    match_option_text,
    normalise_text,
    parse_options,
    question_stem,
)
from nanovlm_cli.evaluation.prompt import MMSTAR_INSTRUCTION, mmstar_prompt
from nanovlm_cli.evaluation.results import (
    LEDGER_FILE,
    OPEN_ANSWER_BENCHMARKS,
    RESULTS_FILE,
    Comparison,
    EvalResult,
    check_comparable,
    compare_results,
    read_results,
    summarise,
    write_results,
)

if TYPE_CHECKING:
    from nanovlm_cli.evaluation.datasets import MMSTAR_HUB_ID, Benchmark, load_benchmark
    from nanovlm_cli.evaluation.lmms import LmmsEvalResult, make_adapter, run_lmms_eval
    from nanovlm_cli.evaluation.scoring import (
        DEFAULT_BATCH_SIZE,
        ProgressCallback,
        evaluate,
        evaluate_checkpoint,
        evaluate_ranked,
        evaluate_shapes,
        evaluate_shapes_open,
        evaluate_shapes_ranked,
        normalise_row,
        score_samples,
    )

_ON_USE = {  # submodule -> the public names it gives, loaded by `__getattr__` on first use
    "datasets": ("MMSTAR_HUB_ID", "Benchmark", "load_benchmark"),
    "lmms": ("LmmsEvalResult", "make_adapter", "run_lmms_eval"),
    "scoring": ("DEFAULT_BATCH_SIZE", "ProgressCallback", "evaluate", "evaluate_checkpoint", "evaluate_ranked",
                "evaluate_shapes", "evaluate_shapes_open", "evaluate_shapes_ranked", "normalise_row",
                "score_samples"),
}
_MODULE_OF = {name: module for module, names in _ON_USE.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups (and monkeypatching) see a plain attribute
    return value


__all__ = [
    "DEFAULT_BATCH_SIZE", "LEDGER_FILE", "MMSTAR_HUB_ID", "MMSTAR_INSTRUCTION", "OPEN_ANSWER_BENCHMARKS",
    "RESULTS_FILE", "Benchmark", "Comparison", "EvalResult", "LmmsEvalResult", "ProgressCallback", "check_comparable",
    "compare_results", "evaluate", "evaluate_checkpoint", "evaluate_ranked", "evaluate_shapes", "evaluate_shapes_open",
    "evaluate_shapes_ranked", "extract_choice", "load_benchmark", "make_adapter", "match_option_text",
    "mmstar_prompt", "normalise_row", "normalise_text", "parse_options", "question_stem", "read_results",
    "run_lmms_eval", "score_samples", "summarise", "write_results",
]
