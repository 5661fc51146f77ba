"""Training memory: a memory model that predicts peak memory from the config, and measurements that check it.

Main design choice: the estimate is an explicit sum counted from the config, not a fit. Parameter counts come from
the model built on the meta device; activations are counted per saved tensor of each block (per token and layer,
in elements of the hidden / query / key-value / intermediate widths), with the byte size each tensor really has
(bf16 matmul outputs and an fp32 residual stream under CUDA autocast, fp32 everywhere on CPU). The few constants
(`*_PER_TOKEN` tables in `estimate.py`) were read off the code and checked by measuring real steps on the CPU in
fresh processes (see `benchmarks/memory.py` and `tests/test_memory.py`).

Measurements (`measure.py`) run a real training step (forward, backward, AdamW step, twice: the second step holds
optimizer state) on synthetic inputs shaped like the config's samples. On CUDA they read the allocator's peaks; on
the CPU each batch size runs in a fresh subprocess (`python -m nanovlm_cli.memory SPEC_JSON`) and reports its peak
resident memory above the process's memory before the model was built, so peaks never mix. `sweep.py` is the
`nanovlm vram` sweep. Memory does not depend on weight values, so models are built with random weights.
"""

from nanovlm_cli.memory.estimate import (
    GIB,
    MemoryEstimate,
    SampleShape,
    estimate_memory,
    max_batch_size,
    sample_shape,
    synthetic_batch,
)
from nanovlm_cli.memory.measure import (
    StepMeasurement,
    measure_in_subprocess,
    measure_step,
    optimizer_state_bytes,
    prepare_model,
    train_step,
)
from nanovlm_cli.memory.sweep import VramReport, VramRow, measure_vram, plot_vram, resolve_device

__all__ = [
    "GIB", "MemoryEstimate", "SampleShape", "StepMeasurement", "VramReport", "VramRow", "estimate_memory",
    "max_batch_size", "measure_in_subprocess", "measure_step", "measure_vram", "optimizer_state_bytes",
    "plot_vram", "prepare_model", "resolve_device", "sample_shape", "synthetic_batch", "train_step",
]
