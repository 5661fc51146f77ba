"""TrainLoader: determinism, sharding (in-process and 2-rank gloo), exact resume, prefetch, skips, streams."""

import io
import json
import math
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

from nanovlm_cli.data.loader import SkipCounter, TrainLoader, validation_batches
from nanovlm_cli.data.sample import Batch, Record, Sample
from nanovlm_cli.data.schemas import row_to_record
from nanovlm_cli.data.sources import StreamRecords
from nanovlm_cli.errors import DataError


class Invalid(DataError):
    reason = "no_supervised_tokens"


def encode(record: Record) -> Sample:
    """Fake processor: length and views depend on the index; every 7th record (from 3) is invalid."""
    i = record.source_index
    if i % 7 == 3:
        raise Invalid(f"record {i} has nothing to supervise")
    length = 3 + (i * 5) % 11
    ids = torch.full((length,), i + 1)  # tokens name their record; 0 is padding
    views = [torch.full((3, 2, 2), float(i))] * (i % 3)
    return Sample(ids, ids.clone(), views, i)


def records(n: int) -> list[Record]:
    return [Record([], [], i) for i in range(n)]


def make_loader(source, **overrides) -> TrainLoader:
    kwargs = {"batch_size": 4, "max_seq_len": 24, "max_images_per_row": 4, "seed": 0, "pack_buffer": 3}
    kwargs.update(overrides)
    return TrainLoader(source, encode, **kwargs)


def seen(batch: Batch) -> list[int]:
    out = []
    for row, seg in zip(batch.input_ids, batch.segment_ids):
        out.extend(int(row[seg == k][0]) - 1 for k in range(1, int(seg.max()) + 1))
    return out


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("input_ids", "labels", "position_ids", "segment_ids"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert len(x.images) == len(y.images) and all(torch.equal(u, v) for u, v in zip(x.images, y.images))


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_same_seed_gives_the_same_batches_and_another_seed_another_order():
    first = list(make_loader(records(40), epochs=2))
    assert_same_batches(first, list(make_loader(records(40), epochs=2)))
    other = list(make_loader(records(40), epochs=2, seed=1))
    assert [seen(b) for b in first] != [seen(b) for b in other]


def test_an_epoch_covers_every_valid_record_once_and_epochs_reshuffle():
    loader = make_loader(records(40), epochs=2)
    batches = list(loader)
    assert len(batches) == 2 * loader.batches_per_epoch == 2 * math.ceil(40 / 4)
    per_epoch = len(batches) // 2
    valid = sorted(i for i in range(40) if i % 7 != 3)
    epoch0 = [i for b in batches[:per_epoch] for i in seen(b)]
    epoch1 = [i for b in batches[per_epoch:] for i in seen(b)]
    assert sorted(epoch0) == valid and sorted(epoch1) == valid
    assert epoch0 != epoch1
    assert loader.skips.as_dict() == {"no_supervised_tokens": 2 * (40 - len(valid))}
    assert all(b.input_ids.shape[1] <= 24 for b in batches)


def test_rows_respect_the_image_cap_and_the_length():
    for batch in make_loader(records(60), epochs=1, max_images_per_row=2):
        assert batch.input_ids.shape[1] <= 24
        for row, seg in zip(batch.input_ids, batch.segment_ids):
            views = sum((int(row[seg == k][0]) - 1) % 3 for k in range(1, int(seg.max()) + 1))
            assert views <= 2


def test_without_packing_every_row_holds_one_sample_and_the_epoch_is_complete():
    batches = list(make_loader(records(40), epochs=1, packing=False))
    assert len(batches) == 10 and all(int(b.segment_ids.max()) == 1 for b in batches)
    assert all(3 <= b.input_ids.shape[0] <= 4 for b in batches)  # batch_size rows, less the invalid records
    assert sorted(i for b in batches for i in seen(b)) == [i for i in range(40) if i % 7 != 3]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10, 11, 13])  # mid-window, window edges, epoch edge (10), next epoch
def test_resume_yields_exactly_the_batches_the_uninterrupted_loader_would(k):
    source = records(37)
    full = list(make_loader(source, epochs=3))
    loader = make_loader(source, epochs=3)
    head = list(islice(iter(loader), k))
    state = roundtrip(loader.state_dict())
    resumed = make_loader(source, epochs=3)
    resumed.load_state_dict(state)
    assert_same_batches(head + list(resumed), full)
    uninterrupted = make_loader(source, epochs=3)
    list(uninterrupted)
    assert resumed.skips.as_dict() == uninterrupted.skips.as_dict()


def test_resume_after_prefetch_counts_only_consumed_batches():
    source = records(37)
    full = list(make_loader(source, epochs=2))
    loader = make_loader(source, epochs=2, num_workers=2)
    it = iter(loader)
    head = list(islice(it, 4))  # the producer thread is windows ahead by now
    state = roundtrip(loader.state_dict())
    it.close()
    resumed = make_loader(source, epochs=2, num_workers=2)
    resumed.load_state_dict(state)
    assert_same_batches(head + list(resumed), full)


def test_in_process_ranks_are_disjoint_complete_and_equal_in_length():
    source = records(48)
    shards = [list(make_loader(source, epochs=1, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen_by = [[i for b in s for i in seen(b)] for s in shards]
    flat = [i for s in seen_by for i in s]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == [i for i in range(48) if i % 7 != 3]


def test_resume_state_checks_the_seed_and_dataset_size():
    loader = make_loader(records(20))
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(DataError, match="seed"):
        make_loader(records(20), seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="rows"):
        make_loader(records(21)).load_state_dict(state)


def stream(n: int) -> StreamRecords:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            if i % 9 != 4 else {"bad": i} for i in range(n)]
    return StreamRecords(lambda: iter(rows), lambda row, i: _record(row, i))


def _record(row, i):
    return row_to_record(row, i)


@pytest.mark.parametrize("k", [2, 5, 7])
def test_streams_shard_by_index_and_resume_by_rows_consumed(k):
    full = list(make_loader(stream(41), epochs=2, rank=1, world_size=2))
    loader = make_loader(stream(41), epochs=2, rank=1, world_size=2)
    head = list(islice(iter(loader), k))
    resumed = make_loader(stream(41), epochs=2, rank=1, world_size=2)
    resumed.load_state_dict(roundtrip(loader.state_dict()))
    assert_same_batches(head + list(resumed), full)
    rank0 = list(make_loader(stream(41), epochs=1, rank=0, world_size=2))
    assert len(rank0) == len(full) // 2
    seen0 = {i for b in rank0 for i in seen(b)}
    seen1 = {i for b in full[: len(full) // 2] for i in seen(b)}
    assert seen0 == {i for i in range(0, 40, 2) if i % 9 != 4 and i % 7 != 3}
    assert seen1 == {i for i in range(1, 40, 2) if i % 9 != 4 and i % 7 != 3}


def test_stream_skip_counts_include_bad_rows_and_the_dropped_remainder():
    loader = make_loader(stream(41), epochs=1, rank=0, world_size=2)
    list(loader)
    bad_rows = sum(1 for i in range(0, 40, 2) if i % 9 == 4)
    invalid = sum(1 for i in range(0, 40, 2) if i % 9 != 4 and i % 7 == 3)
    assert loader.skips.as_dict() == {"missing_field": bad_rows, "no_supervised_tokens": invalid,
                                      "stream_remainder": 1}


def test_validation_batches_are_fixed_and_in_source_order():
    skips = SkipCounter()
    batches = validation_batches(records(30), encode, n_batches=3, batch_size=4, max_seq_len=24,
                                 max_images_per_row=4, skips=skips)
    again = validation_batches(records(30), encode, n_batches=3, batch_size=4, max_seq_len=24, max_images_per_row=4)
    assert_same_batches(batches, again)
    assert len(batches) == 3 and all(b.n_samples == 4 for b in batches)
    assert sorted(i for b in batches for i in seen(b)) == [i for i in range(30) if i % 7 != 3][:12]
    assert skips["no_supervised_tokens"] == 2  # records 3 and 10 come before the 12th valid record (13)


@pytest.mark.slow
def test_two_ranks_under_torch_distributed_see_every_record_once(tmp_path: Path):
    out = tmp_path / "ranks.json"
    worker = Path(__file__).with_name("ddp_shard_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         str(out)], check=False, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())
    for n, res in results.items():
        n = int(n)
        ranks = res["ranks"]
        assert [r["n_batches"] for r in ranks] == [res["expected_batches"]] * 2 == [math.ceil(math.ceil(n / 2) / 4)] * 2
        valid = {i for i in range(n) if i % 7 != 3}
        seen0, seen1 = ranks[0]["seen"], ranks[1]["seen"]
        assert set(seen0) | set(seen1) == valid  # none lost
        if n % 2 == 0:
            assert len(seen0) + len(seen1) == len(valid) and not set(seen0) & set(seen1)  # none twice
        else:
            assert len(seen0) + len(seen1) - len(valid) <= 1  # the padded shard repeats at most one record
        assert res["skips"]["no_supervised_tokens"] >= n - len(valid)
