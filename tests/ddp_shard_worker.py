"""Worker for the 2-rank sharding test: `torchrun --nproc_per_node 2 tests/ddp_shard_worker.py OUT.json`.

Each rank iterates one epoch of a TrainLoader over a fake dataset and rank 0 writes, per configuration, the sample
indices every rank saw, every rank's batch count and the all-reduced skip counts.
"""

import json
import sys

import torch.distributed as dist
from test_loader import encode  # this folder is on sys.path: torchrun runs this file as a script

from nanovlm_cli.data.loader import TrainLoader
from nanovlm_cli.data.sample import Record
from nanovlm_cli.data.sources import SkipCounter


def seen_indices(batch) -> list[int]:
    seen = []
    for row, seg in zip(batch.input_ids, batch.segment_ids):
        for k in range(1, int(seg.max()) + 1):
            seen.append(int(row[seg == k][0]) - 1)
    return seen


def run(n_records: int, rank: int, world: int) -> dict:
    source = [Record([], [], i) for i in range(n_records)]
    skips = SkipCounter()
    loader = TrainLoader(source, encode, batch_size=4, max_seq_len=24, max_images_per_row=4, seed=3, rank=rank,
                         world_size=world, skips=skips, epochs=1)
    seen, n_batches = [], 0
    for batch in loader:
        seen.extend(seen_indices(batch))
        n_batches += 1
    gathered = [None] * world
    dist.all_gather_object(gathered, {"seen": seen, "n_batches": n_batches})
    return {"ranks": gathered, "skips": skips.all_reduced().as_dict(), "expected_batches": loader.batches_per_epoch}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {str(n): run(n, rank, world) for n in (50, 51)}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
