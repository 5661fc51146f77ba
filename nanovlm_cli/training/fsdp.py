"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for training: sharded parameters, gradients and optimizer state.

What is sharded, and why this way:
- Each decoder block is its own FSDP unit (all-gathered just before it runs, resharded after), the last one kept
  unsharded after forward since backward needs it at once. The root unit holds the rest: embeddings (and the tied
  head), the final norm, the projector and the vision encoder. The vision encoder is not split per block on
  purpose: how often it runs in one forward depends on the rank's batch (not at all for text-only rows, once per
  distinct view shape for dynamic grids), and FSDP's collectives must be issued in the same order on every rank,
  which only the root's (gathered once per forward, reduced once per backward) guarantees. Unused parameters of the
  root (a text-only batch) reduce-scatter zeros, so every rank sends the same buffers.
- Parameters rest as `DTensor` shards (`Shard(0)` over one mesh dimension); the optimizer is built over those
  shards, so AdamW's moments are sharded too. `clip_grad_norm_` over DTensor gradients all-reduces the norm.
- Mixed precision on CUDA: bf16 parameters in compute, fp32 gradient reduction, fp32 master shards. Elsewhere fp32.
- Gradient accumulation reduce-scatters after every micro-batch, so gradients stay sharded (FSDP's memory win);
  `set_requires_gradient_sync(False)` would save the communication but hold full unsharded gradients.
- Checkpoints: every rank writes its shards of the model and the optimizer through `torch.distributed.checkpoint`
  (DCP) into `<checkpoint>/sharded/`; rank 0 also writes the ordinary single-file `model.safetensors` (the full
  state dict gathered to its CPU) and the run state, so every checkpoint loads in one process and resumes exactly
  on the same world size. A different world size is refused in one line (DCP could reshard the tensors, but the
  data position and RNG states are per rank).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from nanovlm_cli.checkpoint.io import save_model
from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.distributed import DistInfo
from nanovlm_cli.errors import ConfigError, TrainingError
from nanovlm_cli.models.vlm import VisionLanguageModel, compile_blocks, eval_mode

SHARDED_DIR = "sharded"  # DCP files of a sharded checkpoint: __<rank>_0.distcp per rank + .metadata
FSDP_FILE = "fsdp.json"  # {"world_size": N} of the run that wrote the shards


def check_fsdp_config(cfg: TrainConfig) -> None:
    """Refuse, in one line before any work starts, what FSDP cannot train correctly."""
    if cfg.optimizer == "muon":
        raise ConfigError("--strategy fsdp cannot use --optimizer muon: Muon orthogonalises whole weight matrices "
                          "and FSDP holds row shards; use --optimizer adamw, or --strategy ddp with muon")
    if getattr(cfg, "lora_r", 0):
        raise ConfigError("--strategy fsdp does not train LoRA adapters; drop --lora-r (full fine-tuning) or use "
                          "--strategy ddp with --lora-r")


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on CUDA; full fp32 elsewhere (CPU/gloo: exact parity tests)."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: VisionLanguageModel, device: torch.device, info: DistInfo, *, compile: bool = False,
                ) -> VisionLanguageModel:
    """Apply `fully_shard` to every decoder block, then to the model (the root), in place; returns the model.
    `compile`: `torch.compile` the blocks first (`models.vlm.compile_blocks`; compiled, then sharded, as torchtitan).

    Call it after freezing and before building the optimizer: the parameters become new `DTensor` objects. The model
    may wait on the CPU: `fully_shard` moves it to `device` one unit at a time and keeps each rank's shards, so a
    model too big for one GPU never lands on one whole. A single process (no torchrun) gets a process group of one,
    so the same code path (mixed precision, sharded checkpoints) runs on one GPU; `distributed.shutdown` destroys it.
    """
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--strategy fsdp runs on CUDA (NCCL) or the CPU (gloo), not on {device.type}; use "
                          "--device cuda or --device cpu, or --strategy ddp")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh (and so every shard) lives on the current CUDA device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    if compile:
        compile_blocks(model, device)
    mesh = init_device_mesh(device.type, (info.world_size,))
    policy = mixed_precision(device)
    blocks = list(model.language.blocks)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.set_reduce_scatter_unused_params(True)  # text-only batches leave the vision encoder without gradients
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Return every FSDP unit to its shards. Needed after a forward without backward (validation, evaluation):
    the root and the last block stay gathered after forward, and a checkpoint must see shards only."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def validation_loss(model: VisionLanguageModel, batches: list, device: torch.device, info: DistInfo) -> float | None:
    """Token-weighted validation loss over every rank's share, as `training.loop.validation_loss`.

    Under FSDP each forward is a collective, so every rank runs as many as the rank with the most batches; a rank
    with fewer repeats its first batch and leaves it out of the sum.
    """
    home = device if device.type == "cuda" else torch.device("cpu")  # NCCL reduces CUDA tensors only
    counts = torch.tensor([len(batches)], dtype=torch.int64, device=home)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most = int(counts.item())
    if most == 0:
        return None
    if not batches:
        raise TrainingError(f"rank {info.rank} has no validation batch while another rank has {most}; under "
                            f"--strategy fsdp pass --validation-batches {info.world_size} or more")
    totals = torch.zeros(2, dtype=torch.float64, device=home)
    with eval_mode(model):
        for i in range(most):
            with _autocast(device):
                out = model.loss(batches[min(i, len(batches) - 1)].to(device))
            if i < len(batches):
                totals += torch.tensor([float(out.loss_sum), out.n_tokens], dtype=torch.float64, device=home)
    reshard(model)  # the root and the last block stay gathered after a forward without backward
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] else None


def full_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0's CPU (empty on the others). A collective: every rank calls it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_model(model: VisionLanguageModel, device: torch.device, info: DistInfo) -> VisionLanguageModel | None:
    """The model as one process can run it: itself when not sharded; under FSDP an unsharded copy on rank 0 (None
    on the others), built from the gathered weights. A collective under FSDP: every rank calls it."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    return plain_model(model.cfg, state, device) if info.is_main else None


def plain_model(cfg: VLMConfig, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                ) -> VisionLanguageModel:
    """An ordinary (unsharded) model holding `state`, e.g. for an evaluation on rank 0 during the run."""
    model = VisionLanguageModel(cfg)
    model.load_state_dict(state)
    return model.to(device)


def _weights_view(cfg: VLMConfig, state: dict[str, torch.Tensor]) -> VisionLanguageModel:
    """A model built on the meta device that takes `state`'s tensors as its own: enough for `save_model`, which
    only reads the state dict, without initialising a second full model."""
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    model.load_state_dict(state, assign=True)
    return model


def save_checkpoint(model: VisionLanguageModel, optimizer: torch.optim.Optimizer, directory: Path,
                    info: DistInfo, *, tokenizer: Any = None, state_file: tuple[str, bytes] | None = None) -> Path:
    """Write a sharded checkpoint to `directory` and return it; a collective: every rank calls it.

    Every rank writes its shards (model and optimizer) into a sibling `.<name>.sharded`; rank 0 then writes the
    ordinary checkpoint (`save_model`: config, the gathered full weights, tokenizer, card) atomically, moves the
    shards inside, and writes `state_file` (name, bytes: the run state) last, atomically. A checkpoint is a resume
    candidate only once that file exists, so a crash mid-save never leaves one that cannot resume.
    """
    staging = directory.with_name(f".{directory.name}.sharded")
    reshard(model)
    if info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(staging))
    full = full_state_dict(model)
    if info.is_main:
        (staging / FSDP_FILE).write_text(json.dumps({"world_size": info.world_size}) + "\n")
        save_model(_weights_view(model.cfg, full), directory, tokenizer=tokenizer)
        os.replace(staging, directory / SHARDED_DIR)
        if state_file is not None:
            name, payload = state_file
            partial = directory / f".{name}.partial"
            partial.write_bytes(payload)
            os.replace(partial, directory / name)
    dist.barrier()
    return directory


def check_resume_strategy(checkpoint: Path, sharded: bool, info: DistInfo) -> None:
    """A one-line error when `checkpoint` was written by the other strategy (or, under FSDP, another world size)."""
    if sharded:
        check_resumable(checkpoint, info)
    elif (checkpoint / SHARDED_DIR).is_dir():
        raise TrainingError(f"{checkpoint} was written with --strategy fsdp (its optimizer state is sharded); "
                            "resume it with --strategy fsdp under the same torchrun --nproc-per-node")


def check_resumable(checkpoint: Path, info: DistInfo) -> None:
    """A one-line error unless `checkpoint` holds shards written by this many processes."""
    meta = checkpoint / SHARDED_DIR / FSDP_FILE
    if not meta.is_file():
        raise TrainingError(f"{checkpoint} has no sharded FSDP state ({SHARDED_DIR}/); resume it with the strategy "
                            "that wrote it (--strategy ddp, the default)")
    saved = int(json.loads(meta.read_text())["world_size"])
    if saved != info.world_size:
        raise TrainingError(f"{checkpoint} was written by {saved} FSDP processes and this run has "
                            f"{info.world_size}; resume it with the same number of processes: torchrun "
                            f"--nproc-per-node {saved} ... --strategy fsdp")


def load_checkpoint(model: VisionLanguageModel, optimizer: torch.optim.Optimizer, checkpoint: Path,
                    info: DistInfo) -> None:
    """Load this rank's model and optimizer shards from `checkpoint` (written by `save_checkpoint`)."""
    check_resumable(checkpoint, info)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """This rank's resident bytes of parameters, gradients and optimizer state (DTensors: local shards only)."""

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    params = list(model.parameters())
    out = {"params": sum(nbytes(p) for p in params),
           "grads": sum(nbytes(p.grad) for p in params if p.grad is not None), "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(nbytes(v) for s in optimizer.state.values() for v in s.values()
                               if isinstance(v, torch.Tensor) and v.ndim > 0)
    return out
