"""Evaluation datasets for `nanovlm eval --benchmark`: MMStar-format rows from the Hub, the shapes set, or local files.

Main design choice: every source becomes a sized, lazily indexed sequence of plain dicts with MMStar's columns
(index, question, image, answer, category), so the scorer (`evaluation/scoring.py`) never knows where rows came from and
images are decoded only when their batch is asked. Local data may be a `save_to_disk` directory, parquet or JSONL
file(s) (or a directory of them); image paths in JSONL are resolved against the file's directory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanovlm_cli.data.shapes import shapes_mmstar_rows
from nanovlm_cli.errors import DataError

log = logging.getLogger(__name__)

MMSTAR_HUB_ID = "Lin-Chen/MMStar"
DEFAULT_SHAPES_SIZE = 200
REQUIRED_COLUMNS = ("question", "image", "answer")


@dataclass
class Benchmark:
    name: str  # "mmstar", "shapes", a Hub id or the local path
    rows: Sequence[dict[str, Any]]


class _Rows(Sequence):
    """`dataset[i]` for i < limit, with relative image paths made absolute against `base`."""

    def __init__(self, dataset: Any, limit: int | None, base: Path | None) -> None:
        self.dataset, self.base = dataset, base
        self.n = len(dataset) if limit is None else min(limit, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        row = dict(self.dataset[i])
        image = row.get("image")
        if self.base is not None and isinstance(image, str) and not Path(image).is_absolute():
            row["image"] = str(self.base / image)
        return row


def _check_columns(columns: Sequence[str], where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{where} has no column(s) {', '.join(missing)} (columns: {', '.join(columns)}); "
                        "MMStar-format data needs question, image, answer and optionally index, category")


def _pick_split(data: Any, split: str | None, where: str) -> Any:
    """One split of a DatasetDict (`split`, else val / test / validation, else the only one)."""
    if not hasattr(data, "keys"):
        return data
    names = list(data.keys())
    if split is not None:
        if split not in names:
            raise DataError(f"{where} has no split {split!r}; choose one of {', '.join(names)} with --split")
        return data[split]
    for name in ("val", "test", "validation"):
        if name in names:
            return data[name]
    if len(names) == 1:
        return data[names[0]]
    raise DataError(f"{where} has splits {', '.join(names)}; choose one with --split")


def _files(path: Path, suffixes: tuple[str, ...]) -> list[str]:
    if path.is_file():
        return [str(path)] if path.suffix in suffixes else []
    return sorted(str(p) for p in path.iterdir() if p.suffix in suffixes)


def _load_local(path: Path, split: str | None) -> tuple[Any, Path | None]:
    import datasets  # on use: pyarrow and pandas come with it (~0.8 s), and the shapes benchmark never needs them

    if path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return _pick_split(datasets.load_from_disk(str(path)), split, str(path)), None
    parquet = _files(path, (".parquet",))
    if parquet:
        return datasets.load_dataset("parquet", data_files=parquet, split="train"), None
    jsonl = _files(path, (".jsonl", ".json"))
    if jsonl:
        base = path if path.is_dir() else path.parent
        return datasets.load_dataset("json", data_files=jsonl, split="train"), base
    raise DataError(f"{path} is not a dataset we can read; pass a save_to_disk directory, parquet or JSONL "
                    "file(s) in MMStar format")


def _load_hub(hub_id: str, split: str) -> Any:
    import datasets  # on use, as in _load_local

    try:
        return datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # offline, missing, gated, unknown split
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load benchmark {hub_id} split {split!r} ({type(exc).__name__}: {detail}); check the "
                        "network / HF_TOKEN and the split, or use --benchmark shapes offline") from exc


def load_benchmark(benchmark: str, *, split: str | None = None, limit: int | None = None, seed: int = 0) -> Benchmark:
    """The rows of `benchmark`: "mmstar", "shapes", a local path, or a Hub dataset id in MMStar format."""
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit} must be >= 1")
    if benchmark == "shapes":
        return Benchmark("shapes", shapes_mmstar_rows(limit or DEFAULT_SHAPES_SIZE, seed=seed, split=split or "eval"))
    path = Path(benchmark).expanduser()
    if path.exists():
        dataset, base = _load_local(path, split)
        name = str(path)
    elif benchmark == "mmstar" or benchmark.count("/") == 1:
        hub_id = MMSTAR_HUB_ID if benchmark == "mmstar" else benchmark
        dataset, base, name = _load_hub(hub_id, split or "val"), None, benchmark
    else:
        raise DataError(f"unknown benchmark {benchmark!r}; use mmstar, shapes, a Hub dataset id or a local path "
                        "to MMStar-format data")
    _check_columns(list(dataset.column_names), name)
    rows = _Rows(dataset, limit, base)
    log.info("benchmark %s: %d samples", name, len(rows))
    return Benchmark(name, rows)
