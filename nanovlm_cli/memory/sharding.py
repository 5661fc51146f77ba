"""Per-rank memory under FSDP2 (`--strategy fsdp`): the memory model of `estimate.py`, with the sharding applied.

`training/fsdp.py` shards each decoder block and the root (everything else: embeddings and head, final norm,
projector, vision encoder) over `world_size` ranks along dim 0, so each rank holds chunk sizes of
`ceil(dim0 / world_size)` rows (rank 0 the largest). Per rank, at the peak of a step:
- at rest: fp32 shards of the weights, of the gradients and of AdamW's two moments (trainable parameters only);
- gathered while the step runs: the root's full parameters for all of forward and backward (in the compute dtype:
  bf16 on CUDA, fp32 on the CPU) and two decoder blocks at a time (the running one and the next, or the last one,
  kept gathered for backward), plus, at the end of backward, the root's unsharded gradients and their reduce-scatter
  input (fp32);
- activations and the loss path exactly as one process with the same per-rank batch (the batch is not sharded);
- no autocast weight cache: under bf16 mixed precision the gathered weights already are bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.memory.estimate import MemoryEstimate, SampleShape, estimate_memory, largest_fitting
from nanovlm_cli.models.vlm import VisionLanguageModel


@dataclass(frozen=True)
class ShardedBytes:
    """What one rank holds at rest under FSDP (rank 0, whose chunks are the largest), in bytes."""

    params: int  # fp32 parameter shards
    grads: int  # fp32 gradient shards of trainable parameters (after the reduce-scatter)
    optimizer: int  # AdamW's exp_avg and exp_avg_sq shards
    root_params: int  # elements of the root unit (gathered for the whole step)
    root_trainable: int
    block_params: int  # elements of the largest decoder block
    buffers: int  # bytes of buffers (RoPE tables, ...): whole on every rank


def _chunk(p: torch.Tensor, world_size: int) -> int:
    """Elements of rank 0's dim-0 chunk of `p` (a scalar stays whole)."""
    return math.ceil(p.shape[0] / world_size) * (p[0].numel()) if p.ndim else p.numel()


def sharded_bytes(cfg: VLMConfig, train: TrainConfig, world_size: int) -> ShardedBytes:
    """Rank 0's resident shards for `cfg` trained with `train`'s freezing over `world_size` FSDP ranks."""
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    frozen = {"vision": train.freeze_vision_encoder, "projector": train.freeze_projector,
              "language": train.freeze_language_model}
    trainable = {id(p) for name, is_frozen in frozen.items() if not is_frozen
                 for p in getattr(model, name).parameters()}
    in_blocks = {id(p) for block in model.language.blocks for p in block.parameters()}
    params = list(model.parameters())
    shards = sum(_chunk(p, world_size) for p in params)
    trained = sum(_chunk(p, world_size) for p in params if id(p) in trainable)
    root = [p for p in params if id(p) not in in_blocks]
    block = max((sum(p.numel() for p in b.parameters()) for b in model.language.blocks), default=0)
    return ShardedBytes(4 * shards, 4 * trained, 8 * trained, sum(p.numel() for p in root),
                        sum(p.numel() for p in root if id(p) in trainable), block,
                        sum(b.numel() * b.element_size() for b in model.buffers()))


def fsdp_per_rank(estimate: MemoryEstimate, cfg: VLMConfig, train: TrainConfig, world_size: int,
                  device_type: str) -> MemoryEstimate:
    """`estimate` (one process, the per-rank batch) turned into one FSDP rank's peak (see the module docstring)."""
    held = sharded_bytes(cfg, train, world_size)
    compute = 2 if device_type == "cuda" else 4
    gathered = (held.root_params + 2 * held.block_params) * compute
    reduce = held.root_trainable * (compute + 4)  # unsharded root gradients + the reduce-scatter input
    return replace(estimate, weights=held.params + held.buffers + gathered, grads=held.grads + reduce,
                   optimizer=held.optimizer, autocast_cache=0)



def estimate_per_rank(cfg: VLMConfig, shape: SampleShape, batch_size: int, *, train: TrainConfig, world_size: int,
                      device_type: str = "cuda") -> MemoryEstimate:
    """One FSDP rank's predicted peak at `batch_size` rows per rank over `world_size` ranks."""
    one = estimate_memory(cfg, shape, batch_size, train=train, device_type=device_type)
    return fsdp_per_rank(one, cfg, train, world_size, device_type)


def max_batch_size_per_rank(cfg: VLMConfig, shape: SampleShape, budget_bytes: float, *, train: TrainConfig,
                            world_size: int, device_type: str = "cuda", limit: int = 1 << 16) -> int:
    """The largest per-rank batch size whose FSDP per-rank peak fits `budget_bytes` (0 when not even one row)."""
    return largest_fitting(lambda n: estimate_per_rank(cfg, shape, n, train=train, world_size=world_size,
                                                        device_type=device_type).total <= budget_bytes, limit)
