"""FSDP2 on CPU/gloo with 2 processes: the same losses, gradients and weights as one process, sharded checkpoints.

On this machine (torch 2.14.1 CPU build, gloo) `fully_shard` runs: all_gather_into_tensor and reduce_scatter_tensor
(SUM and AVG) exist on gloo, DTensor gradients clip, DCP saves and loads shards. What cannot run here is the bf16
mixed-precision policy under NCCL and the memory peak on a GPU: benchmarks/gpu_fsdp.sh measures those.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_batches import make_batches, step_loss
from helpers import tiny_config, tiny_model

from nanovlm_cli.checkpoint.io import load_model
from nanovlm_cli.config import TrainConfig
from nanovlm_cli.memory.sharding import sharded_bytes

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(port: int) -> list[str]:
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    return [*torchrun.split(), "--nproc_per_node", "2", "--master_port", str(port)]


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_worker")
    run = subprocess.run([*_torchrun(29541), str(REPO / "tests" / "fsdp_worker.py"), str(out)], env=ENV,
                         cwd=REPO / "tests", capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _one_process():
    loaded = tiny_model(seed=0)
    model = loaded.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
    steps, probe = make_batches(loaded)
    losses, norms = [], []
    for rows in steps:
        loss, norm = step_loss(model, rows, rows, 1)
        losses.append(loss)
        norms.append(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        logits = model.logits(model(probe.input_ids, probe.images, position_ids=probe.position_ids))
    return model, losses, norms, logits


@pytest.mark.slow
def test_two_fsdp_ranks_give_the_losses_gradients_and_answers_of_one_process(worker):
    result = json.loads((worker / "fsdp.json").read_text())
    model, losses, norms, logits = _one_process()
    # rank 1's first step is text-only: its vision encoder has no gradient, and the collectives still match
    for a, b in zip(losses, result["losses"], strict=True):
        assert abs(a - b) <= 1e-5, (losses, result["losses"])
    for a, b in zip(norms, result["grad_norms"], strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, a), (norms, result["grad_norms"])
    fsdp_logits = torch.load(worker / "fsdp_logits.pt")
    assert (fsdp_logits - logits).abs().max() <= 1e-4
    final = load_model(worker / "final").model  # the ordinary single-file checkpoint, one process
    probe = make_batches(load_model(worker / "final"))[1]
    with torch.no_grad():
        again = final.logits(final(probe.input_ids, probe.images, position_ids=probe.position_ids))
    assert torch.equal(again, fsdp_logits) or (again - fsdp_logits).abs().max() <= 1e-5
    assert (again.argmax(-1) == fsdp_logits.argmax(-1)).all()
    single = model.state_dict()
    worst = max(float((single[k] - v).abs().max()) for k, v in final.state_dict().items())
    assert worst <= 5e-5, worst


@pytest.mark.slow
def test_sharded_checkpoint_restores_the_optimizer_and_refuses_another_world_size(worker):
    result = json.loads((worker / "fsdp.json").read_text())
    assert result["restored"]
    shards = sorted(p.name for p in (worker / "final" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "fsdp.json"]
    assert "written by 2 FSDP processes" in result["wrong_world"] and "--nproc-per-node 2" in result["wrong_world"]
    assert "\n" not in result["wrong_world"]


@pytest.mark.slow
def test_each_rank_holds_the_shards_the_memory_model_predicts(worker):
    # Measured: rank 0's local DTensor shards after 3 steps; predicted: memory.sharding from the config alone.
    result = json.loads((worker / "fsdp.json").read_text())
    predicted = sharded_bytes(tiny_config(), TrainConfig(), world_size=2)
    assert result["resident"]["params"] == predicted.params
    assert result["resident"]["optimizer"] == predicted.optimizer
    assert result["resident"]["grads"] == 0  # zero_grad(set_to_none) after the last step
    assert result["n_params"] * 4 / 2 <= predicted.params <= 0.55 * result["n_params"] * 4  # about half each
    assert sharded_bytes(tiny_config(), TrainConfig(), world_size=1).params == result["n_params"] * 4
