"""Worker for the FSDP unit checks: `torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR`.

Both ranks build the same tiny model, shard it with `training.fsdp.shard_model` and train 3 AdamW steps on fixed
batches (rank r takes rows r::2 of each step's batch; rank 1's first step is text-only, so the vision encoder has
no gradient there). Rank 0 writes `fsdp.json` with the per-step losses, gradient norms, this rank's resident bytes,
the logits of a probe batch under FSDP, and the optimizer state after a save/load round trip; the final weights go
to OUT_DIR/final through `training.fsdp.save_checkpoint`. The test compares all of it with one process.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_batches import make_batches, step_loss  # this folder is on sys.path: torchrun runs this file as a script

from nanovlm_cli.distributed import DistInfo
from nanovlm_cli.training import fsdp


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank, world, rank)
    torch.manual_seed(0)
    from helpers import tiny_model

    loaded = tiny_model(seed=0)
    model = loaded.model.train()
    n_params = sum(p.numel() for p in model.parameters())
    fsdp.shard_model(model, torch.device("cpu"), info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
    steps, probe = make_batches(loaded)
    losses, norms = [], []
    for rows in steps:
        mine = rows[rank::world]
        loss, norm = step_loss(model, mine, rows, world)
        losses.append(loss)
        norms.append(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        logits = model.logits(model(probe.input_ids, probe.images, position_ids=probe.position_ids))
    fsdp.reshard(model)
    resident = fsdp.local_bytes(model, optimizer)
    before = {k: v.full_tensor() for k, v in optimizer.state_dict()["state"][0].items() if v.ndim}
    fsdp.save_checkpoint(model, optimizer, out / "final", info, tokenizer=loaded.tokenizer,
                         state_file=("training_state.pt", b"x"))
    for group in optimizer.state.values():  # scramble, then restore from the shards
        for v in group.values():
            if v.ndim:
                v.zero_()
    fsdp.load_checkpoint(model, optimizer, out / "final", info)
    after = {k: v.full_tensor() for k, v in optimizer.state_dict()["state"][0].items() if v.ndim}
    restored = all(torch.equal(before[k], after[k]) for k in before)
    wrong_world = ""
    try:
        fsdp.check_resumable(out / "final", DistInfo(0, world + 1, 0))
    except Exception as exc:  # noqa: BLE001 (the message is the result)
        wrong_world = str(exc)
    if rank == 0:
        torch.save(logits, out / "fsdp_logits.pt")
        (out / "fsdp.json").write_text(json.dumps({
            "losses": losses, "grad_norms": norms, "resident": resident, "n_params": n_params,
            "restored": restored, "wrong_world": wrong_world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
