"""FSDP2 on CPU/gloo with 2 processes: the same losses, gradients and weights as one process, sharded checkpoints.

On this machine (torch 2.14.1 CPU build, gloo) `fully_shard` runs: all_gather_into_tensor and reduce_scatter_tensor
(SUM and AVG) exist on gloo, DTensor gradients clip, DCP saves and loads shards (benchmarks/fsdp_probe.py). What
does not run here: NCCL, the bf16 mixed-precision policy in training (it is CUDA-only by design), the per-rank
allocator peak against the `vram` estimate, and `--compile` with FSDP (no compiler worth waiting for on 2 CPU
cores); benchmarks/gpu_fsdp.sh covers the first three on a lent GPU. Here the memory check is honest about what the
CPU can show: the bytes of the sharded tensors each rank holds, against the memory model.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fsdp_batches import make_batches, step_loss
from helpers import tiny_config, tiny_model

from nanovlm_cli.checkpoint.io import load_model
from nanovlm_cli.cli import app as app_module
from nanovlm_cli.config import TrainConfig
from nanovlm_cli.distributed import DistInfo
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.memory.sharding import sharded_bytes
from nanovlm_cli.training import fsdp

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun() -> list[str]:
    """torchrun for 2 processes on a port free now (fixed ports collide with other test runs on the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    return [*torchrun.split(), "--nproc_per_node", "2", "--master_port", str(port)]


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_worker")
    run = subprocess.run([*_torchrun(), str(REPO / "tests" / "fsdp_worker.py"), str(out)], env=ENV,
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


def _train_args(tmp_path: Path, name: str, batch_size: int, *extra: str) -> list[str]:
    # As tests/test_ddp.py: --pack-buffer 1 keeps each step's sample set the same across world sizes.
    # --num-workers 0: a clean-clone CI run once aborted (SIGABRT at exit) in the 2-process accumulation run with the
    # preset's encode threads; that exit bug is open (issue 17 note), these tests check losses and resume.
    return ["-m", "nanovlm_cli", "train", "--preset", "tiny", "--dataset-size", "200", "--batch-size", str(batch_size),
            "--pack-buffer", "1", "--max-seq-len", "256", "--max-steps", "4", "--save-checkpoint-steps", "100",
            "--validation-steps", "2", "--eval-size", "0", "--output-dir", str(tmp_path), "--run-name", name,
            "--device", "cpu", "--max-threads", "1", "--num-workers", "0", *extra]


ACCUMULATE = ("--strategy", "fsdp", "--gradient-accumulation-steps", "2")


def _metrics(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process with batch 4; DDP and FSDP with 2 processes of batch 2, and FSDP with 2 processes accumulating
    2 micro-batches of 1 (the same samples per step in all four)."""
    tmp = tmp_path_factory.mktemp("fsdp_runs")
    subprocess.run([sys.executable, *_train_args(tmp, "single", 4)], check=True, env=ENV, cwd=REPO,
                   capture_output=True)
    for name, args in (("ddp", _train_args(tmp, "ddp", 2, "--strategy", "ddp")),
                       ("fsdp", _train_args(tmp, "fsdp", 2, "--strategy", "fsdp")),
                       ("accum", _train_args(tmp, "accum", 1, *ACCUMULATE))):
        run = subprocess.run([*_torchrun(), *args[1:]], env=ENV, cwd=REPO, capture_output=True, text=True,
                             check=False)
        if run.returncode != 0:  # pytest.fail, not assert: the whole stderr tail is shown, not a truncated repr
            pytest.fail(f"{name} exited {run.returncode}:\n{run.stderr[-4000:]}")
    return tmp


@pytest.mark.slow
def test_fsdp_with_batch_b_on_two_processes_equals_one_process_with_2b_and_ddp(runs):
    single, ddp, fsdp, accum = (_metrics(runs, n) for n in ("single", "ddp", "fsdp", "accum"))
    assert [x["step"] for x in fsdp] == [1, 2, 3, 4]  # only rank 0 writes
    assert [x["samples_seen"] for x in fsdp] == [x["samples_seen"] for x in single] == [x["samples_seen"]
                                                                                        for x in accum]
    for a, b, c, d in zip(single, ddp, fsdp, accum, strict=True):
        assert abs(a["loss"] - c["loss"]) <= 1e-5, (a["loss"], c["loss"])
        assert abs(b["loss"] - c["loss"]) <= 1e-5, (b["loss"], c["loss"])
        assert abs(a["loss"] - d["loss"]) <= 1e-5, (a["loss"], d["loss"])  # gradient accumulation under FSDP
    shards = runs / "fsdp" / "final" / "sharded"
    assert (shards / "__0_0.distcp").is_file() and (shards / "__1_0.distcp").is_file()
    wa = load_model(runs / "single" / "final").model.state_dict()
    wb = load_model(runs / "fsdp" / "final").model.state_dict()  # the ordinary single-file model
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 5e-5, worst  # as test_ddp: Adam amplifies the summation-order differences of the reduction


@pytest.mark.slow
def test_fsdp_run_stopped_by_sigterm_resumes_from_its_shards_and_reproduces_the_losses(runs):
    log = runs / "cut.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([*_torchrun(), *_train_args(runs, "cut", 1, *ACCUMULATE)[1:]],
                                env=ENV, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    metrics, deadline = runs / "cut" / "metrics.jsonl", time.time() + 150
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    proc.wait(timeout=120)
    cut = _metrics(runs, "cut")
    assert 1 <= len(cut) < 4, log.read_text()[-3000:]  # stopped before the end, after a finished step
    saved = runs / "cut" / "checkpoints" / f"step-{len(cut):06d}"
    assert (saved / "sharded" / "fsdp.json").is_file(), log.read_text()[-3000:]
    resumed = subprocess.run([*_torchrun(), "-m", "nanovlm_cli", "train", "--resume", str(runs / "cut")],
                             env=ENV, cwd=REPO, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [x["loss"] for x in _metrics(runs, "cut")] == [x["loss"] for x in _metrics(runs, "accum")]


@pytest.mark.slow
def test_fsdp_checkpoint_refuses_another_strategy_in_one_line(runs):
    run = subprocess.run([sys.executable, "-m", "nanovlm_cli", "train", "--resume", str(runs / "fsdp" / "final"),
                          "--strategy", "ddp", "--max-steps", "5"], env=ENV, cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "written with --strategy fsdp" in last and "--strategy fsdp" in last, run.stderr[-2000:]


def _vram(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = app_module.run(["vram", "--preset", "tiny", "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_vram_fsdp_estimates_one_rank_and_its_shards_shrink_with_the_world_size(capsys):
    rows = {}
    for world in (1, 2, 4):
        code, out, err = _vram(capsys, "--strategy", "fsdp", "--world-size", str(world), "--batch-sizes", "2",
                               "--json")
        assert code == 0, err
        report = json.loads(out)
        assert "one of" in report["measured"] and report["rows"][0]["measured_peak_bytes"] is None
        rows[world] = report["rows"][0]["estimate"]
    for world in (2, 4):  # the CUDA estimate's fp32 shards of AdamW's moments: exactly the chunks rank 0 holds
        assert rows[world]["optimizer"] == sharded_bytes(tiny_config(), TrainConfig(), world).optimizer
    assert rows[1]["optimizer"] > rows[2]["optimizer"] > rows[4]["optimizer"]
    assert rows[1]["total"] > rows[2]["total"] > rows[4]["total"]
    assert rows[2]["activations"] == rows[4]["activations"]  # the per-rank batch is not sharded
    code, out, _ = _vram(capsys, "--batch-sizes", "2", "--estimate-only", "--json")
    ddp = json.loads(out)["rows"][0]["estimate"]
    assert ddp["optimizer"] == rows[1]["optimizer"] and ddp["activations"] == rows[1]["activations"]


@pytest.mark.parametrize(("args", "message"), [
    (("--world-size", "2"), "only changes the estimate under --strategy fsdp"),
    (("--strategy", "fsdp"), "pass e.g. --world-size 8"),
    (("--strategy", "fsdp", "--world-size", "2", "--measure-all"), "drop --measure-all"),
])
def test_vram_fsdp_flags_that_cannot_go_together_are_one_usage_error(capsys, args, message):
    code, _, err = _vram(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.slow
def test_measured_rank_shards_match_the_vram_estimate(worker, capsys):
    # CPU, honestly: the bytes rank 0 holds at rest (parameter and AdamW shards, local DTensor sizes) against the
    # parts of `nanovlm vram --strategy fsdp --world-size 2` that predict them; the step's peak needs a GPU
    # allocator (benchmarks/gpu_fsdp.sh).
    resident = json.loads((worker / "fsdp.json").read_text())["resident"]
    code, out, err = _vram(capsys, "--strategy", "fsdp", "--world-size", "2", "--batch-sizes", "1", "--json")
    assert code == 0, err
    estimate = json.loads(out)["rows"][0]["estimate"]
    assert estimate["optimizer"] == resident["optimizer"]
    held = sharded_bytes(tiny_config(), TrainConfig(), 2)
    assert resident["params"] == held.params
    assert held.params < estimate["weights"] <= held.params + held.buffers + 4 * (held.root_params + 2 * held.block_params)


def test_fsdp_refuses_what_it_cannot_train_in_one_line():
    with pytest.raises(ConfigError, match="cannot use --optimizer muon") as muon:
        fsdp.check_fsdp_config(TrainConfig(optimizer="muon"))
    assert "\n" not in str(muon.value)
    with pytest.raises(ConfigError, match="not on mps; use --device cuda or --device cpu"):
        fsdp.shard_model(tiny_model().model, torch.device("mps"), DistInfo())
    fsdp.check_fsdp_config(TrainConfig())
