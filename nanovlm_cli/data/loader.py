"""The training data loader: a deterministic, sharded, resumable iterator of packed `Batch`es.

Main design choice: the loader works in *windows* of `batch_size * pack_buffer` records of the rank's shard. A
window is encoded, knapsack-packed as a whole (better packing than one batch alone) and dealt into exactly
`ceil(records / batch_size)` batches with balanced token counts. Everything a window yields is a pure function of
(epoch, window start), so:

- every rank yields `ceil(ceil(N / world_size) / batch_size)` batches per epoch, whatever the sample lengths, so
  DDP never waits on a rank that ran out (batch_size counts records, i.e. samples before packing);
- the resume state is three integers (epoch, window start, batches of that window already consumed) plus the skip
  counters; the window is rebuilt on resume and the consumed batches dropped, giving exactly the batches the
  uninterrupted iterator would have produced next, across epoch boundaries too;
- prefetch (`num_workers > 0`: a producer thread encoding with `num_workers` threads, see `data.prefetch`) cannot
  change the order, and the state moves only when a batch is handed out, so prefetched work is never counted as
  consumed.

Order, map-style sources: epoch e uses the permutation of range(N) seeded by (seed, e); rank r takes positions
r, r + W, r + 2W, ... (strided). When W does not divide N, the shard is padded by wrapping around the permutation
(at most W - 1 records repeat per epoch), so every rank holds ceil(N / W) records. Streaming sources keep the
stream's order; rows are read in chunks of W and rank r takes row r of each chunk; an incomplete final chunk (fewer
than W rows) is dropped and counted as "stream_remainder" by the rank that would have owned each row.

A dataset with nothing usable (wrong columns, every sample longer than `max_seq_len`) would otherwise cycle through
epochs forever: once `max_unusable_records` consecutive records of the shard (or a whole epoch, if shorter) gave
no batch, iteration raises `DataError` with the skip counts by reason, an example of each, and the fix.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from nanovlm_cli.data.packing import balance_rows, collate, pack
from nanovlm_cli.data.prefetch import ABANDON_GRACE_S, EncodePool, prefetch
from nanovlm_cli.data.sample import Batch, Record, Sample
from nanovlm_cli.data.skips import SkipCounter
from nanovlm_cli.data.sources import is_map_style
from nanovlm_cli.errors import DataError, ImageError

__all__ = ["ABANDON_GRACE_S", "DEFAULT_PACK_BUFFER", "MAX_UNUSABLE_RECORDS", "SkipCounter", "TrainLoader",
           "validation_batches"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_PACK_BUFFER = 4  # batches whose records are packed together
_PREFETCH_WINDOWS = 2
MAX_UNUSABLE_RECORDS = 2000  # consecutive records without a usable sample before the loader gives up

# What to change, per skip reason, when nothing in the dataset is usable.
_FIXES = {
    "missing_field": "give each row a 'messages', 'conversations' or 'texts' field (the chat, LLaVA or "
                     "the_cauldron layout)",
    "too_long": "raise --max-seq-len to at least the shortest sample's length",
    "too_many_images": "raise --max-images-per-row",
    "unreadable_image": "check the image files (and --image-root for relative paths)",
    "low_rating": "lower --min-rating",
    "no_supervised_tokens": "give each sample an assistant turn to learn from",
    "image_count_mismatch": "make the <image> placeholders of each row match its images",
    "invalid_json": "fix the file's lines (one JSON object per line)",
}


@dataclass
class _Window:
    epoch: int
    start: int  # map: first position in the rank's shard; stream: global row index of the first row
    next_epoch: int
    next_start: int
    batches: list[Batch] = field(default_factory=list)
    skips: dict[str, int] = field(default_factory=dict)  # skips caused by this window, merged when consumed
    n_records: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # skip reason -> what was wrong (first case seen)


class TrainLoader:
    """Iterate packed batches for one rank; see the module docstring for the order, sharding and resume rules."""

    def __init__(self, source: Any, encode: Callable[[Record], Sample], *, batch_size: int, max_seq_len: int,
                 max_images_per_row: int, seed: int, rank: int = 0, world_size: int = 1,
                 skips: SkipCounter | None = None, pack_buffer: int = DEFAULT_PACK_BUFFER, num_workers: int = 0,
                 epochs: int | None = None, pad_token_id: int = 0, packing: bool = True,
                 max_unusable_records: int = MAX_UNUSABLE_RECORDS, name: str = "the dataset") -> None:
        if batch_size <= 0 or max_seq_len <= 0 or pack_buffer <= 0 or num_workers < 0:
            raise DataError(f"batch_size={batch_size}, max_seq_len={max_seq_len}, pack_buffer={pack_buffer} must be "
                            f"positive and num_workers={num_workers} >= 0")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} is outside world_size={world_size}; pass 0 <= rank < world_size")
        self.source, self.encode = source, encode
        self.batch_size, self.max_seq_len, self.max_images_per_row = batch_size, max_seq_len, max_images_per_row
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pack_buffer, self.num_workers, self.epochs, self.pad_token_id = pack_buffer, num_workers, epochs, pad_token_id
        self.packing = packing  # False: one sample per row (rows still dealt into balanced batches)
        self.max_unusable_records, self.name = max(1, max_unusable_records), name
        self.skips = skips if skips is not None else SkipCounter()
        self.map_style = is_map_style(source)
        if self.map_style and len(source) == 0:
            raise DataError("the dataset has no rows; check the path, split and filters")
        self._epoch, self._start, self._consumed = 0, 0, 0  # consumed: batches of the window at _start
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._pool: EncodePool | None = None
        self._abandon = threading.Event()  # set: an iteration stopped on an error or a signal; wait for no thread

    # ------------------------------------------------------------------ order

    @property
    def window_records(self) -> int:
        return self.batch_size * self.pack_buffer

    @property
    def shard_len(self) -> int | None:
        """Records per rank per epoch (map-style), None for streams."""
        return math.ceil(len(self.source) / self.world_size) if self.map_style else None

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches each rank yields per epoch (map-style; fewer only if a whole window is invalid)."""
        return math.ceil(self.shard_len / self.batch_size) if self.map_style else None

    def _permutation(self, epoch: int) -> np.ndarray:
        cache = self._perm_cache  # read once: the prefetch thread may replace it concurrently
        if cache is None or cache[0] != epoch:
            cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source)))
            self._perm_cache = cache
        return cache[1]

    def shard_indices(self, epoch: int, start: int, stop: int) -> list[int]:
        """Dataset indices at positions [start, stop) of this rank's shard in `epoch`."""
        perm, n = self._permutation(epoch), len(self.source)
        return [int(perm[(p * self.world_size + self.rank) % n]) for p in range(start, stop)]

    # ------------------------------------------------------------------ windows

    def _encode_one(self, item: Any) -> Sample | tuple[str, str]:
        """A Sample, or (skip reason, message) for a record that is unusable (read or encode raised a data error)."""
        try:
            record = self.source[item] if self.map_style else item
            if isinstance(record, Exception):
                raise record
            return self.encode(record)
        except (DataError, ImageError) as exc:
            reason = getattr(exc, "reason", "unreadable_image" if isinstance(exc, ImageError) else "invalid_sample")
            return reason, str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    def _build(self, epoch: int, start: int, items: list[Any], next_epoch: int, next_start: int,
               extra_skips: SkipCounter | None = None) -> _Window:
        encoded = list(self._pool.map(self._encode_one, items)) if self._pool else [self._encode_one(i) for i in items]
        delta = extra_skips if extra_skips is not None else SkipCounter()
        samples, examples = [], {}
        for out in encoded:
            if isinstance(out, tuple):
                delta.add(out[0])
                examples.setdefault(out[0], out[1])
            else:
                samples.append(out)
        too_long = [len(s) for s in samples if len(s) > self.max_seq_len]
        if too_long:
            examples["too_long"] = f"the shortest has {min(too_long)} tokens, max_seq_len is {self.max_seq_len}"
        too_many = [len(s.images) for s in samples if len(s) <= self.max_seq_len
                    and len(s.images) > self.max_images_per_row]
        if too_many:
            examples["too_many_images"] = (f"the fewest is {min(too_many)} image views, max_images_per_row is "
                                           f"{self.max_images_per_row}")
        n_batches = math.ceil(len(items) / self.batch_size)
        rows = pack(samples, max_seq_len=self.max_seq_len, max_images_per_row=self.max_images_per_row,
                    min_rows=n_batches, max_samples_per_row=None if self.packing else 1, skips=delta)
        batches = []
        if rows:
            if len(rows) < n_batches:
                logger.warning("epoch %d window at %d: only %d usable rows for %d batches; this rank yields fewer "
                               "batches (check the skip counts)", epoch, start, len(rows), n_batches)
            n_groups = min(n_batches, len(rows))
            if self.packing:
                groups = balance_rows([sum(len(samples[i]) for i in row) for row in rows], n_groups)
            else:  # one sample per row, rows longest first: even consecutive groups have similar lengths (less padding)
                groups = [g.tolist() for g in np.array_split(np.arange(len(rows)), n_groups)]
            batches = [collate([[samples[i] for i in rows[r]] for r in g], pad_token_id=self.pad_token_id)
                       for g in groups]
        return _Window(epoch, start, next_epoch, next_start, batches, delta.as_dict(), len(items), examples)

    def _map_windows(self, epoch: int, start: int) -> Iterator[_Window]:
        while self.epochs is None or epoch < self.epochs:
            stop = min(start + self.window_records, self.shard_len)
            last = stop == self.shard_len
            items = self.shard_indices(epoch, start, stop)
            yield self._build(epoch, start, items, epoch + 1 if last else epoch, 0 if last else stop)
            epoch, start = (epoch + 1, 0) if last else (epoch, stop)

    def _stream_rows(self, start: int) -> Iterator[Any]:
        if hasattr(self.source, "iter_rows"):
            return self.source.iter_rows(start)
        return islice(iter(self.source), start, None)

    def _stream_windows(self, epoch: int, start: int) -> Iterator[_Window]:
        w = self.world_size
        while self.epochs is None or epoch < self.epochs:
            rows, pos, items = self._stream_rows(start), start, []
            while len(chunk := list(islice(rows, w))) == w:
                items.append(chunk[self.rank])
                pos += w
                if len(items) == self.window_records:
                    yield self._build(epoch, start, items, epoch, pos)
                    start, items = pos, []
            # The stream ended; rows of an incomplete final chunk are dropped so every rank has the same count.
            remainder = SkipCounter({"stream_remainder": 1}) if self.rank < len(chunk) else None
            yield self._build(epoch, start, items, epoch + 1, 0, remainder)
            epoch, start = epoch + 1, 0

    def _windows(self) -> Iterator[_Window]:
        gen = self._map_windows if self.map_style else self._stream_windows
        return gen(self._epoch, self._start)

    # ------------------------------------------------------------------ iteration and state

    def __iter__(self) -> Iterator[Batch]:
        resume_consumed = self._consumed
        self._abandon = threading.Event()
        if self.num_workers > 0:
            self._pool = EncodePool(self.num_workers)
            windows = prefetch(self._windows(), _PREFETCH_WINDOWS, self._abandon)
        else:
            windows = self._windows()
        unusable = _UnusableStretch(at_epoch_start=self._start == 0 and resume_consumed == 0)
        try:
            for window in windows:
                first, resume_consumed = resume_consumed, 0
                if first == 0:
                    self.skips.merge(window.skips)
                if unusable.add(window):
                    limit = min(self.max_unusable_records, self.shard_len or self.max_unusable_records)
                    if unusable.records >= limit or unusable.whole_epoch:
                        raise DataError(unusable.message(self.name))
                for k in range(first, len(window.batches)):
                    if k == len(window.batches) - 1:
                        self._epoch, self._start, self._consumed = window.next_epoch, window.next_start, 0
                    else:
                        self._epoch, self._start, self._consumed = window.epoch, window.start, k + 1
                    yield window.batches[k]
                if not window.batches:
                    self._epoch, self._start, self._consumed = window.next_epoch, window.next_start, 0
        except GeneratorExit:
            raise
        except BaseException:
            self._abandon.set()  # an error or a signal: a worker may be stuck in a read, so wait for none
            raise
        finally:
            if hasattr(windows, "close"):
                windows.close()
            if self._pool is not None:
                self._pool.shutdown(wait=not self._abandon.is_set())
                self._pool = None

    def abandon(self) -> None:
        """Make the close of the current iteration leave its prefetch and encode threads behind (daemon threads,
        they end after their current record) instead of waiting for them: for stopping on a signal, when a read
        may never return."""
        self._abandon.set()

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, lists and dicts (loadable with `torch.load(weights_only=True)`).

        Identical on every rank except `skips` (rank-local counts). `window` lists the dataset indices of the
        window being consumed (the packing buffer; map-style only), rebuilt and checked on resume.
        """
        window: list[int] = []
        if self.map_style and self._consumed and (self.epochs is None or self._epoch < self.epochs):
            window = self.shard_indices(self._epoch, self._start,
                                        min(self._start + self.window_records, self.shard_len))
        return {
            "version": STATE_VERSION, "kind": "map" if self.map_style else "stream",
            "n_records": len(self.source) if self.map_style else -1,
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
            "pack_buffer": self.pack_buffer, "epoch": self._epoch, "start": self._start,
            "batches_consumed_in_window": self._consumed, "window": window, "skips": self.skips.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != ("map" if self.map_style else "stream"):
            raise DataError(f"data-loader state version {state.get('version')} / kind {state.get('kind')} does not "
                            "match this loader; resume with the same dataset or start a fresh run")
        if self.map_style and state["n_records"] != len(self.source):
            raise DataError(f"the dataset had {state['n_records']} rows when saved and has {len(self.source)} now; "
                            "resume with the same dataset (and --dataset-size) or start a fresh run")
        if state["seed"] != self.seed:
            raise DataError(f"the saved data order used seed {state['seed']}, this run uses {self.seed}; "
                            f"resume with --seed {state['seed']}")
        epoch, start, consumed = int(state["epoch"]), int(state["start"]), int(state["batches_consumed_in_window"])
        same_layout = (state["world_size"], state["batch_size"], state["pack_buffer"]) == (
            self.world_size, self.batch_size, self.pack_buffer)
        if not same_layout:
            # Keep the global amount of data consumed, rounded down to a window boundary of the new layout.
            seen = start * state["world_size"] if self.map_style else start
            start = (seen // self.world_size) // self.window_records * self.window_records if self.map_style \
                else seen - seen % self.world_size
            consumed = 0
            logger.warning("resuming with a different world size, batch size or pack buffer: the data position is "
                           "approximate (window start %d, epoch %d)", start, epoch)
        self._epoch, self._start, self._consumed = epoch, start, consumed
        if same_layout and state.get("window") and state["world_size"] == self.world_size and \
                state["rank"] == self.rank:
            expected = self.shard_indices(epoch, start, min(start + self.window_records, self.shard_len))
            if expected != list(state["window"]):
                raise DataError("the saved packing window does not match this dataset's order; resume with the same "
                                "dataset, seed and world size")
        self.skips.load_state_dict(state["skips"])


class _UnusableStretch:
    """Consecutive windows that gave no batch: their record and skip counts, and whether a whole epoch was empty."""

    def __init__(self, at_epoch_start: bool) -> None:
        self.records, self.skips, self.examples = 0, SkipCounter(), {}
        self.epoch_started = at_epoch_start  # the stretch holds an epoch's start, so its end means a whole epoch
        self.whole_epoch = False

    def add(self, window: _Window) -> bool:
        """Count `window`; True while the stretch of unusable windows goes on."""
        if window.batches:
            self.records, self.skips, self.examples = 0, SkipCounter(), {}
            self.epoch_started = window.next_epoch != window.epoch
            return False
        self.records += window.n_records
        self.skips.merge(window.skips)
        for reason, text in window.examples.items():
            self.examples.setdefault(reason, text)
        ends_epoch = window.next_epoch != window.epoch
        self.whole_epoch = self.whole_epoch or (ends_epoch and self.epoch_started)
        self.epoch_started = self.epoch_started or ends_epoch
        return True

    def message(self, name: str) -> str:
        counts = {k: v for k, v in self.skips.as_dict().items() if k != "stream_remainder"}
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        skipped = ", ".join(f"{reason} {n}" + (f" (e.g. {self.examples[reason]})" if reason in self.examples else "")
                            for reason, n in ranked) or "none counted"
        fixes = [_FIXES.get(reason, "check the dataset") for reason, _ in ranked] or ["check the dataset"]
        where = f"all {self.records:,} rows" if self.whole_epoch else f"the last {self.records:,} rows read"
        return f"no usable training sample in {name}: {where} skipped ({skipped}); {'; '.join(dict.fromkeys(fixes))}"


def validation_batches(source: Any, encode: Callable[[Record], Sample], *, n_batches: int, batch_size: int,
                       max_seq_len: int, max_images_per_row: int, skips: SkipCounter | None = None,
                       pad_token_id: int = 0, max_unusable_records: int = MAX_UNUSABLE_RECORDS) -> list[Batch]:
    """The first `n_batches` batches of `batch_size` usable samples each, in the source's own order (no shuffle).

    Each batch holds all rows its samples pack into, so the set is fixed for a given held-out split. The scan stops
    (with fewer batches, possibly none) after `max_unusable_records` records in a row that gave no batch.
    """
    skips = skips if skips is not None else SkipCounter()
    batches: list[Batch] = []
    pending: list[Sample] = []
    since_batch = 0

    def flush() -> None:
        nonlocal since_batch
        rows = pack(pending, max_seq_len=max_seq_len, max_images_per_row=max_images_per_row, skips=skips)
        if rows:
            batches.append(collate([[pending[i] for i in row] for row in rows], pad_token_id=pad_token_id))
            since_batch = 0
        pending.clear()

    for item in _records_in_order(source):
        if len(batches) == n_batches:
            break
        if since_batch >= max_unusable_records:
            logger.warning("validation: no usable sample in %d records in a row (skipped %s); validating on %d "
                           "batches", since_batch, skips.as_dict(), len(batches))
            break
        since_batch += 1
        try:
            if isinstance(item, Exception):
                raise item
            pending.append(encode(item))
        except (DataError, ImageError) as exc:
            skips.add(getattr(exc, "reason", "unreadable_image" if isinstance(exc, ImageError) else "invalid_sample"))
            continue
        if len(pending) == batch_size:
            flush()
    if pending and len(batches) < n_batches:
        flush()
    return batches


def _records_in_order(source: Any) -> Iterator[Any]:
    """Records (or the data errors that replace unusable ones) in the source's own order."""
    if is_map_style(source):
        for i in range(len(source)):
            try:
                yield source[i]
            except (DataError, ImageError) as exc:
                yield exc
    else:
        yield from (source.iter_rows() if hasattr(source, "iter_rows") else iter(source))
