"""Dataset adapters: every dataset users have -> one stream of lazy `Record`s.

`open_source(spec)` accepts a built-in dataset by name (`BUILTIN_SOURCES`: "shapes"), a Hub dataset id (several
comma-separated configs), a local `save_to_disk` directory, parquet files or directories, jsonl files and LLaVA-style
JSON. The schema is detected per row (the_cauldron / FineVision `texts`, LLaVA `conversations`, chat `messages`),
so a mixture of schemas works.

Main design choice: adapters never decode images and never drop rows silently. A map-style source (`len` +
`getitem`) raises `RecordError` (a `DataError` with a `.reason`) for a row it cannot use, so whoever consumes it
(the loader) counts the skip exactly when it consumes the row, which keeps skip counts exact across resumes. A
streaming source yields rows in the stream's own order; `iter_rows(start)` hands the loader every row (records and
errors) so positions and counts stay exact, and plain iteration skips bad rows and counts them in `skips`.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from nanovlm_cli.data.sample import Record
from nanovlm_cli.data.schemas import RecordError, row_to_record
from nanovlm_cli.data.shapes import shapes_records
from nanovlm_cli.data.skips import SkipCounter  # re-exported: it lives with the loader (data.skips) since issue 14
from nanovlm_cli.errors import DataError

__all__ = ["BUILTIN_SOURCES", "ConcatRecords", "MapRecords", "RecordError", "RecordSource", "SkipCounter",
           "StreamRecords", "is_map_style", "open_source", "row_to_record"]

logger = logging.getLogger(__name__)


class RecordSource(Protocol):
    """Map-style sources also have `__len__` and `__getitem__(i) -> Record` (raising RecordError)."""

    def __iter__(self) -> Iterator[Record]: ...


Converter = Callable[[Mapping[str, Any], int], Record]

# ------------------------------------------------------------------ built-in datasets, opened by name

SHAPES_DEFAULT_SIZE = 20000  # records of the built-in shapes set when no size is given


def _open_shapes(*, split: str, size: int | None, seed: int, turns: int, multiple_choice: float) -> RecordSource:
    return shapes_records(size if size is not None else SHAPES_DEFAULT_SIZE, seed=seed, split=split, turns=turns,
                          multiple_choice=multiple_choice)


# Each opens its records from (split, size, seed) and its own options; a training run asks its dataset object
# (`training.datasets`) for the splits, so no caller tests a dataset's name.
BUILTIN_SOURCES: dict[str, Callable[..., RecordSource]] = {"shapes": _open_shapes}


# ------------------------------------------------------------------ row stores and the two source kinds


class _JsonlRows(Sequence):
    """Random access into a jsonl file through a byte-offset index (nothing but the offsets kept in memory)."""

    def __init__(self, path: Path) -> None:
        self.path, self._offsets = path, [0]
        with open(path, "rb") as f:
            for line in f:
                self._offsets.append(self._offsets[-1] + len(line))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> Any:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            line = f.read(self._offsets[i + 1] - self._offsets[i]).strip()
        if not line:
            return None
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError("invalid_json", f"{self.path} line {i + 1} is not JSON ({exc})") from exc


class _ArrowRows(Sequence):
    """Rows of a `datasets.Dataset` read as raw Arrow values: images stay {"bytes", "path"} (never decoded)."""

    def __init__(self, dataset: Any) -> None:
        self._data = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i: int) -> Any:
        return self._data[i].to_pylist()[0]


class MapRecords(Sequence):
    """Indexable Records over indexable rows. `getitem` raises RecordError; iteration skips and counts."""

    def __init__(self, rows: Sequence[Any], convert: Converter, *, skips: SkipCounter | None = None,
                 size: int | None = None) -> None:
        self.rows, self.convert, self.skips = rows, convert, skips
        self._len = len(rows) if size is None else min(size, len(rows))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        if not 0 <= i < self._len:
            raise IndexError(f"record {i} out of range for a source of {self._len}")
        return self.convert(self.rows[i], i)

    def __iter__(self) -> Iterator[Record]:
        for i in range(self._len):
            try:
                yield self[i]
            except RecordError as exc:
                if self.skips is not None:
                    self.skips.add(exc.reason)


class ConcatRecords(Sequence):
    """Several map-style sources end to end (configs with different columns concatenate fine)."""

    def __init__(self, parts: Sequence[Sequence[Record]], *, size: int | None = None) -> None:
        self.parts, self._ends = list(parts), []
        total = 0
        for part in self.parts:
            total += len(part)
            self._ends.append(total)
        self._len = total if size is None else min(size, total)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        if not 0 <= i < self._len:
            raise IndexError(f"record {i} out of range for a source of {self._len}")
        k = bisect.bisect_right(self._ends, i)
        record = self.parts[k][i - (self._ends[k - 1] if k else 0)]
        record.source_index = i
        return record


class StreamRecords:
    """Iterable-only Records in the stream's own order. `iter_rows(start)` yields every row from `start` on,
    a Record or the RecordError that made it unusable, so the loader can count positions exactly."""

    def __init__(self, make_rows: Callable[[], Iterable[Any]], convert: Converter, *,
                 skips: SkipCounter | None = None, size: int | None = None) -> None:
        self.make_rows, self.convert, self.skips, self.size = make_rows, convert, skips, size

    def iter_rows(self, start: int = 0) -> Iterator[Record | RecordError]:
        for i, row in enumerate(islice(self.make_rows(), start, self.size), start=start):
            try:
                yield self.convert(row, i)
            except RecordError as exc:
                yield exc

    def __iter__(self) -> Iterator[Record]:
        for item in self.iter_rows():
            if isinstance(item, RecordError):
                if self.skips is not None:
                    self.skips.add(item.reason)
            else:
                yield item


def _round_robin(streams: list[Iterable[Any]]) -> Iterator[Any]:
    """Interleave streams one row each, in order, until all are exhausted (deterministic)."""
    iterators = [iter(s) for s in streams]
    while iterators:
        alive = []
        for it in iterators:
            try:
                yield next(it)
                alive.append(it)
            except StopIteration:
                pass
        iterators = alive


def _read_json_rows(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); fix the file or save it as jsonl") from exc
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise DataError(f"{path} does not hold a list of rows; LLaVA JSON is a list of objects")
    return data


def _iter_jsonl(path: Path) -> Iterator[Any]:
    with open(path) as f:
        for line in f:
            yield json.loads(line) if line.strip() else None


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        for ext in ("parquet", "jsonl", "json"):
            found = sorted(path.rglob(f"*.{ext}"))
            if found:
                return found
        raise DataError(f"{path} holds no save_to_disk dataset, parquet, jsonl or json files; point at the data")
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True))


def _hf_dataset_source(datasets_: list[Any], convert: Converter, stream: bool, skips: SkipCounter | None,
                       size: int | None) -> RecordSource:
    if stream:
        streams = [d.decode(False) if hasattr(d, "decode") else d for d in datasets_]
        return StreamRecords(lambda: _round_robin(streams) if len(streams) > 1 else iter(streams[0]), convert,
                             skips=skips, size=size)
    parts = [MapRecords(_ArrowRows(d), convert, skips=skips) for d in datasets_]
    return parts[0] if len(parts) == 1 and size is None else ConcatRecords(parts, size=size)


def _pick_split(dataset: Any, split: str, where: str) -> Any:
    if hasattr(dataset, "keys") and not hasattr(dataset, "features"):  # a DatasetDict
        if split not in dataset:
            raise DataError(f"{where} has no split {split!r}; choose one of {', '.join(dataset)}")
        return dataset[split]
    _only_train(split, where, "a saved Dataset (not a DatasetDict)")
    return dataset


def _only_train(split: str, where: str, what: str) -> None:
    """Data without named splits is the "train" split only: asking it for "validation" must not hand back the
    training rows (the run would report a validation loss measured on its own training data)."""
    if split != "train":
        raise DataError(f"{where} is {what} with a single split, 'train', not {split!r}; drop --split, or save "
                        "the dataset with save_to_disk as a DatasetDict holding that split")


def open_source(spec: str, *, config: str | None = None, split: str = "train", stream: bool = False,
                image_root: str | None = None, min_rating: int | None = None, size: int | None = None,
                seed: int = 0, skips: SkipCounter | None = None, shapes_turns: int = 1,
                shapes_multiple_choice: float = 0.5) -> RecordSource:
    """Open any supported dataset as Records (see the module docstring). `size` keeps the first `size` rows.

    A name in `BUILTIN_SOURCES` opens that built-in dataset (the `shapes_*` options are the shapes dataset's own).
    """
    builtin = BUILTIN_SOURCES.get(spec)
    if builtin is not None:
        return builtin(split=split, size=size, seed=seed, turns=shapes_turns, multiple_choice=shapes_multiple_choice)
    import datasets  # imported here: it takes seconds, and the built-in datasets do without it

    path = Path(spec).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        dataset = _pick_split(datasets.load_from_disk(str(path)), split, str(path))
        dataset = dataset.to_iterable_dataset() if stream else dataset
        return _hf_dataset_source([dataset], _converter(image_root, min_rating), stream, skips, size)
    files = _local_files(path)
    if files:
        _only_train(split, spec, "local data files")
        root = image_root if image_root is not None else str(files[0].parent)
        convert = _converter(root, min_rating)
        suffixes = {f.suffix for f in files}
        if suffixes == {".parquet"}:
            dataset = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                                            streaming=stream)
            return _hf_dataset_source([dataset], convert, stream, skips, size)
        if suffixes <= {".jsonl", ".json"}:
            readers = [(_JsonlRows(f) if f.suffix == ".jsonl" else _read_json_rows(f)) for f in files]
            if stream:
                makers = [partial(_iter_jsonl, f) if f.suffix == ".jsonl" else partial(iter, r)
                          for f, r in zip(files, readers)]
                return StreamRecords(lambda: (row for make in makers for row in make()), convert, skips=skips,
                                     size=size)
            parts = [MapRecords(r, convert, skips=skips) for r in readers]
            return parts[0] if len(parts) == 1 and size is None else ConcatRecords(parts, size=size)
        raise DataError(f"{spec}: cannot read files ending in {', '.join(sorted(suffixes))}; "
                        "use parquet, jsonl, LLaVA .json or a save_to_disk directory")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise DataError(f"dataset path {spec} does not exist; check the path")
    loaded = []
    for name in (config.split(",") if config else [None]):
        try:
            dataset = datasets.load_dataset(spec, name=name.strip() if name else None, split=split, streaming=stream)
        except Exception as exc:  # datasets raises many types: offline, missing config, gated, network
            raise DataError(f"could not load dataset {spec!r} (config {name}, split {split}): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                            "check the id, config names and your network, or pass a local path") from exc
        loaded.append(dataset)
    return _hf_dataset_source(loaded, _converter(image_root, min_rating), stream, skips, size)


def _converter(image_root: str | None, min_rating: int | None) -> Converter:
    return partial(_convert, image_root=image_root, min_rating=min_rating)


def _convert(row: Any, index: int, *, image_root: str | None, min_rating: int | None) -> Record:
    if row is None:
        raise RecordError("missing_field", f"row {index} is empty")
    return row_to_record(row, index, image_root=image_root, min_rating=min_rating)


def is_map_style(source: Any) -> bool:
    """True when `source` supports `len` and integer indexing (shuffle + shard by index)."""
    return hasattr(source, "__len__") and hasattr(source, "__getitem__")
