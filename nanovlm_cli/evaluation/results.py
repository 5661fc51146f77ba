"""Evaluation results: accuracy overall and per category, the per-sample ledger, and comparison with an earlier run.

Main design choice: every sample is kept in the result's `records` (the ledger, written as `ledger.jsonl` beside
`results.json`), so two runs can be compared sample by sample (`compare_results`), joined on index and question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nanovlm_cli.errors import DataError

OPEN_ANSWER_BENCHMARKS = frozenset({"shapes-open"})  # scored by exact match of a short answer, no options
RESULTS_FILE = "results.json"
LEDGER_FILE = "ledger.jsonl"

# ------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Comparison:
    """This run against an earlier one on the samples both scored (joined on sample index and question).

    The accuracies are over those shared samples only: runs of different sizes (`--limit 10` against `--limit 50`)
    compare what both answered, so an unchanged model shows a delta of 0 with nothing fixed or broken.
    """

    other: str  # the other results.json
    other_accuracy: float  # the other run's accuracy on the shared samples
    delta: float  # accuracy - other_accuracy
    n_common: int
    fixed: list[Any] = field(default_factory=list)  # wrong before, right now
    broken: list[Any] = field(default_factory=list)  # right before, wrong now
    accuracy: float = 0.0  # this run's accuracy on the shared samples
    n_other: int = 0  # samples the other run scored in all
@dataclass
class EvalResult:
    """Accuracy overall and per category, plus every sample in `records` (the ledger; left out of `to_dict`)."""

    benchmark: str
    n: int
    accuracy: float
    by_category: dict[str, float]
    records: list[dict[str, Any]]
    n_by_category: dict[str, int] = field(default_factory=dict)
    scoring: str = "generate"  # "generate" (a greedy reply, letter extracted) or "rank" (option likelihood)
    unanswered: int = 0  # replies that named no option
    wall_s: float = 0.0
    checkpoint: str | None = None
    output_dir: str | None = None
    comparison: Comparison | None = None

    @property
    def open_answer(self) -> bool:
        """Scored by exact match of a short answer (an unanswered reply is empty), not by naming an option."""
        return self.benchmark in OPEN_ANSWER_BENCHMARKS

    def to_dict(self) -> dict[str, Any]:
        out = {"benchmark": self.benchmark, "scoring": self.scoring, "n": self.n, "accuracy": self.accuracy,
               "by_category": self.by_category, "n_by_category": self.n_by_category, "unanswered": self.unanswered,
               "wall_s": round(self.wall_s, 3)}
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint
        if self.output_dir is not None:
            out["output_dir"] = self.output_dir
        if self.comparison is not None:
            out["comparison"] = vars(self.comparison).copy()
        return out


def summarise(benchmark: str, records: list[dict[str, Any]], wall_s: float = 0.0,
              scoring: str = "generate") -> EvalResult:
    """An EvalResult from ledger records (each with "correct", "category" and "extracted")."""
    if not records:
        raise DataError(f"benchmark {benchmark!r} gave no samples to score; check --limit, --split and the data")
    totals: dict[str, list[int]] = {}
    for record in records:
        counts = totals.setdefault(str(record["category"]), [0, 0])
        counts[0] += bool(record["correct"])
        counts[1] += 1
    n_correct = sum(bool(r["correct"]) for r in records)
    return EvalResult(
        benchmark=benchmark, n=len(records), accuracy=n_correct / len(records),
        by_category={c: right / n for c, (right, n) in sorted(totals.items())},
        records=records, n_by_category={c: n for c, (_, n) in sorted(totals.items())},
        unanswered=sum(r.get("extracted") is None for r in records), wall_s=wall_s, scoring=scoring,
    )


# ------------------------------------------------------------------------------------------------------------------
# Ledger files and comparison


def write_results(result: EvalResult, directory: str | Path) -> Path:
    """Write `results.json` and `ledger.jsonl` (one line per sample) into `directory`; returns results.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LEDGER_FILE).open("w") as f:
        for record in result.records:
            f.write(json.dumps(record, default=str) + "\n")
    path = directory / RESULTS_FILE
    path.write_text(json.dumps({**result.to_dict(), "ledger": LEDGER_FILE}, indent=2, default=str) + "\n")
    return path


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0]
        raise DataError(f"{path} is not {what} ({type(exc).__name__}: {detail}); pass the results.json written by "
                        "`nanovlm eval --output DIR`") from exc


def read_results(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results.json contents, ledger records) of an earlier run; `path` is results.json or its directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise DataError(f"results file {path} does not exist; pass the results.json written by `nanovlm eval --output`")
    results = _read_json_file(path, "valid JSON")
    if not isinstance(results, dict) or "accuracy" not in results:
        raise DataError(f"{path} is JSON but not an eval results file (no 'accuracy' field); pass the results.json "
                        "written by `nanovlm eval --output DIR`")
    ledger = path.parent / str(results.get("ledger") or LEDGER_FILE)
    if not ledger.is_file():
        raise DataError(f"no per-sample ledger {ledger.name} next to {path}; re-run that eval with --output DIR")
    records = []
    for number, line in enumerate(ledger.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{ledger} line {number} is not JSON ({exc}); the ledger is damaged, re-run that eval "
                            "with --output DIR") from exc
        if not isinstance(record, dict) or "index" not in record or "correct" not in record:
            raise DataError(f"{ledger} line {number} has no 'index' and 'correct' fields; pass a ledger written by "
                            "`nanovlm eval`")
        records.append(record)
    return results, records


def check_comparable(results: dict[str, Any], benchmark: str, scoring: str, other: str | Path) -> None:
    """Refuse to compare with an earlier run of another benchmark or scoring protocol (`DataError` naming both)."""
    theirs_benchmark, theirs_scoring = results.get("benchmark"), results.get("scoring", "generate")
    if theirs_benchmark is not None and str(theirs_benchmark) != benchmark:
        raise DataError(f"{other} scored benchmark {theirs_benchmark!r}, this run {benchmark!r}; compare runs of "
                        "the same benchmark")
    if str(theirs_scoring) != scoring:
        raise DataError(f"{other} was scored with --scoring {theirs_scoring}, this run with --scoring {scoring}; "
                        "compare runs of the same scoring protocol")


def _sample_key(record: dict[str, Any]) -> tuple[str, str | None]:
    """What identifies a sample across runs: its index and, when the ledger has it, its question text."""
    question = record.get("question")
    return str(record["index"]), None if question is None else str(question)


def compare_results(result: EvalResult, other: str | Path) -> EvalResult:
    """`result` with a Comparison to the earlier run at `other`, over the samples both runs scored.

    Samples are joined on (index, question), so two runs that share indices but asked different questions (another
    split or seed) share nothing; a run of another benchmark or scoring protocol is refused (`check_comparable`).
    """
    results, records = read_results(other)
    check_comparable(results, result.benchmark, result.scoring, other)
    before = {_sample_key(r): bool(r["correct"]) for r in records}
    fixed, broken = [], []
    right_now = right_before = common = 0
    for record in result.records:
        key = _sample_key(record)
        if key not in before:
            continue
        common += 1
        now, then = bool(record["correct"]), before[key]
        right_now += now
        right_before += then
        if now and not then:
            fixed.append(record["index"])
        elif then and not now:
            broken.append(record["index"])
    if common == 0:
        raise DataError(f"no sample of this run (index and question) appears in the ledger of {other}; compare runs "
                        "of the same benchmark, split and seed")
    accuracy, other_accuracy = right_now / common, right_before / common
    comparison = Comparison(str(other), other_accuracy, accuracy - other_accuracy, common, fixed, broken,
                            accuracy=accuracy, n_other=len(records))
    return replace(result, comparison=comparison)
