"""Training memory: a memory model that predicts peak memory from the config, and measurements that check it.

Main design choice: the estimate is an explicit sum counted from the config, not a fit. Parameter counts come from
the model built on the meta device; activations are counted per saved tensor of each block (per token and layer,
in elements of the hidden / query / key-value / intermediate widths), with the byte size each tensor really has
(bf16 matmul outputs and an fp32 residual stream under CUDA autocast, fp32 everywhere on CPU). The few constants
(`*_PER_TOKEN` tables below) were read off the code and checked by measuring real steps on the CPU in fresh
processes (see `benchmarks/memory.py` and `tests/test_memory.py`).

Measurements run a real training step (forward, backward, AdamW step, twice: the second step holds optimizer
state) on synthetic inputs shaped like the config's samples. On CUDA they read the allocator's peaks; on the CPU
each batch size runs in a fresh subprocess (`python -m nanovlm_cli.memory SPEC_JSON`) and reports its peak
resident memory (`ru_maxrss`) above the process's memory before the model was built, so peaks never mix.
Memory does not depend on weight values, so models are built from the config with random weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
from pathlib import Path
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.errors import ConfigError, NanoVLMError
from nanovlm_cli.models.vlm import LOSS_CHUNK_TOKENS, VisionLanguageModel

logger = logging.getLogger(__name__)

GIB = 1024**3
Attention = Literal["efficient", "math"]

# --- What one sample looks like ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleShape:
    """A training row as the model sees it: `seq_len` tokens, of which `n_views` views fill the image tokens."""

    seq_len: int
    n_views: int  # views in the row (all images: tiles + global views, or whole images)
    view_height: int
    view_width: int
    tokens_per_view: int  # image tokens each view fills after the projector

    @property
    def image_tokens(self) -> int:
        return self.n_views * self.tokens_per_view


def sample_shape(cfg: VLMConfig, seq_len: int, images_per_sample: int = 1) -> SampleShape:
    """The largest realistic row for `cfg`: every image at its biggest processed size that still fits `seq_len`.

    "fixed": one tile per image. "tiles": an n x n grid (n <= max_grid, n * tile <= max_side) plus the global view.
    "aspect": a square image of max_side pixels (rounded to `multiple_of`). Grids shrink until the image tokens
    leave at least a quarter of the row for text. E.g. the default preset at 4096 tokens: 4x4 tiles + 1 global view
    of 512 px, 64 tokens each = 1088 image tokens.
    """
    f, patch = cfg.projector.pixel_shuffle_factor, cfg.vision.patch_size
    image = cfg.image
    text_min = max(1, seq_len // 4)

    def fits(tokens_per_image: int) -> bool:
        return images_per_sample * tokens_per_image <= seq_len - text_min

    if image.mode == "aspect":
        side = image.max_side // image.multiple_of * image.multiple_of
        while side > image.multiple_of and not fits((side // patch // f) ** 2):
            side -= image.multiple_of
        views, tokens = 1, (side // patch // f) ** 2
        size = (side, side)
    else:
        tokens = cfg.image_tokens_per_tile
        n = min(image.max_grid, image.max_side // image.tile_size) if image.mode == "tiles" else 1
        extra = int(image.mode == "tiles" and image.global_view and n > 1)
        while n > 1 and not fits((n * n + extra) * tokens):
            n -= 1
            extra = int(image.mode == "tiles" and image.global_view and n > 1)
        views, size = n * n + extra, (image.tile_size, image.tile_size)
    if images_per_sample and not fits(views * tokens):
        raise ConfigError(f"--seq-len {seq_len} cannot hold {images_per_sample} image(s) of {views * tokens} tokens "
                          f"plus text; raise --seq-len to at least {2 * images_per_sample * views * tokens}")
    return SampleShape(seq_len, images_per_sample * views, size[0], size[1], tokens)


def synthetic_batch(cfg: VLMConfig, shape: SampleShape, batch_size: int, *, seed: int = 0) -> Any:
    """A `Batch` of `batch_size` full rows: image tokens first, then text; every text position is supervised."""
    from nanovlm_cli.data.sample import Batch

    gen = torch.Generator().manual_seed(seed)
    image_id = _image_token_id(cfg)
    t = shape.seq_len
    ids = torch.randint(0, cfg.language.vocab_size, (batch_size, t), generator=gen)
    ids[ids == image_id] = (image_id + 1) % cfg.language.vocab_size
    ids[:, 1 : 1 + shape.image_tokens] = image_id
    labels = ids.clone()
    labels[:, : 1 + shape.image_tokens] = -100
    positions = torch.arange(t).expand(batch_size, t).clone()
    segments = torch.ones(batch_size, t, dtype=torch.long)
    views = [torch.randn(3, shape.view_height, shape.view_width, generator=gen)
             for _ in range(batch_size * shape.n_views)]
    return Batch(ids, labels, positions, segments, views, batch_size)


def _image_token_id(cfg: VLMConfig) -> int:
    # Checkpoints carry the id; for a bare preset the first extra row stands in (memory does not depend on it).
    return cfg.image_token_id if cfg.image_token_id is not None else cfg.language.vocab_size


# --- The memory model ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one training step, in bytes, by what holds it.

    `total` is not the plain sum: backward frees each block's activations as it creates that block's gradients,
    so the full set of gradients and the full set of activations are never alive together. The peak is the larger
    of "activations + loss" (start of backward; the loss part includes the output weight's gradient, the first one
    made) and "all gradients" (end of backward, optimizer step), on top of weights and optimizer state. With
    gradient checkpointing, the recomputed block comes after the loss's backward, so it counts instead of it.
    """

    weights: int  # parameters and buffers (fp32 master weights)
    grads: int  # fp32 gradients of trainable parameters
    optimizer: int  # AdamW: two fp32 moments per trainable parameter
    vision_activations: int  # saved for backward by the vision encoder and projector (pixels included)
    decoder_activations: int  # saved by the decoder (attention masks included)
    loss: int  # the chunked loss path: gathered hidden states + one chunk of logits and their gradients
    autocast_cache: int = 0  # bf16 copies of trainable weights that CUDA autocast keeps for the step
    recompute: int = 0  # gradient checkpointing: one block's activations, alive again while it is recomputed

    @property
    def activations(self) -> int:
        return self.vision_activations + self.decoder_activations

    @property
    def total(self) -> int:
        during_backward = self.activations + max(self.loss, self.recompute)
        return self.weights + self.optimizer + self.autocast_cache + max(during_backward, self.grads)

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "activations": self.activations, "total": self.total}


@dataclass(frozen=True)
class _Bytes:
    """Byte sizes of saved tensors: matmul inputs/outputs (`act`) and the fp32 residual stream and norms (`res`)."""

    act: int
    res: int

    @staticmethod
    def for_device(device_type: str) -> _Bytes:
        # CUDA trains under bf16 autocast (linear outputs bf16; LayerNorm/RMSNorm and the residual stay fp32).
        return _Bytes(2, 4) if device_type == "cuda" else _Bytes(4, 4)


def _param_counts(cfg: VLMConfig) -> dict[str, tuple[int, int]]:
    """(parameter elements, buffer bytes) per part, counted on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = VisionLanguageModel(cfg.replace(image_token_id=_image_token_id(cfg)))
    out = {}
    for name in ("vision", "projector", "language"):
        module = getattr(model, name)
        out[name] = (sum(p.numel() for p in module.parameters()),
                     sum(b.numel() * b.element_size() for b in module.buffers()))
    return out


# Saved-for-backward tensors per token of one block, in multiples of a width, read off `models/*.py` and checked
# with `torch.autograd.graph.saved_tensors_hooks` (unique storages) and by measured per-layer slopes.
# Decoder residual side: block input, two RMSNorm inputs/normed values and the mid residual (fp32), plus the two
# norm outputs that feed the linears. RMSNorm and the weight multiply each keep one value: 6 fp32 + 2 linear inputs.
DECODER_RESIDUAL_PER_TOKEN = 6
DECODER_LINEAR_INPUTS_PER_TOKEN = 2
# Decoder attention (query width Q): rotated q, SDPA output, its reshaped copy for o_proj (3 Q); keys and values as
# SDPA sees them: repeated to Q heads on the masked-GQA path (2 Q), else rotated k and v (2 KV). RoPE multiplies by
# constant tables, so pre-RoPE q/k are not kept. SDPA turns the boolean mask into an additive one in the query
# dtype on every call and saves it: T mask values per token per layer.
DECODER_ATTENTION_Q_PER_TOKEN = 3
# Gated MLP: gate, act(gate), up, their product.
MLP_GATED_PER_TOKEN = 4
# Vision block: block input and mid residual (fp32), the two LayerNorm outputs, q, k, v and the SDPA output (whose
# (B, T, H, Dh) layout makes the reshape a view), plus fc1 output and its activation (2 I; gated: 4 I). With
# LayerScale the branch outputs are kept for the scale's gradient (2 D). RoPE adds nothing (constant tables).
VISION_RESIDUAL_PER_TOKEN = 2
VISION_LINEAR_PER_TOKEN = 6
MLP_PLAIN_PER_TOKEN = 2
# Loss chunk: logits, log-softmax output and the two gradients overlap by about three (chunk x vocab) fp32 arrays.
LOSS_LOGIT_COPIES = 3


def _attention_calls(seq_len: int) -> tuple[float, int]:
    """(keys per query, queries per SDPA call) of the masked attention of a causal one-sample row.

    Long masked rows run attention per chunk of `ATTENTION_CHUNK` queries over the keys the mask lets them reach
    (`models/language.py`): chunk j of n = T / c sees (j + 1) c keys, (T + c) / 2 per query on average.
    Shorter rows (or a decoder without chunking) make one call over all T keys.
    """
    from nanovlm_cli.models import language

    chunk = getattr(language, "ATTENTION_CHUNK", None)
    if chunk is None or seq_len < 2 * chunk:
        return float(seq_len), seq_len
    n = math.ceil(seq_len / chunk)
    return chunk * n * (n + 1) / 2 / seq_len, chunk


def _decoder_block_bytes_per_token(cfg: VLMConfig, b: _Bytes, seq_len: int, device_type: str) -> float:
    """Bytes one decoder block saves for backward per token (constants above)."""
    lang = cfg.language
    d, i = lang.hidden_dim, lang.intermediate_dim
    q, kv = lang.n_heads * lang.head_dim, lang.n_kv_heads * lang.head_dim
    keys, queries_per_call = _attention_calls(seq_len)
    # Masked GQA: the CPU kernel reads grouped keys directly; on CUDA keys and values are repeated to all query
    # heads for every call: a call of c queries over k keys saves 2 * Q * k values, 2 * Q * keys / c per token.
    if lang.n_heads != lang.n_kv_heads and device_type == "cuda":
        kv_saved = 2 * q * keys / queries_per_call
    else:
        kv_saved = 2 * kv
    residual = DECODER_RESIDUAL_PER_TOKEN * d * b.res + DECODER_LINEAR_INPUTS_PER_TOKEN * d * b.act
    attention = (DECODER_ATTENTION_Q_PER_TOKEN * q + kv_saved) * b.act + 4 * lang.n_heads
    if lang.qk_norm:  # q/k norm inputs (cast to fp32) and normed values
        attention += 2 * (q + kv) * b.res
    post = 4 * d * b.res if lang.post_norms else 0  # two more norms, input and normed value each
    mlp = MLP_GATED_PER_TOKEN * i * b.act
    return residual + attention + post + mlp + keys * b.act  # + the additive mask SDPA makes and saves


def _vision_block_bytes_per_token(cfg: VLMConfig, b: _Bytes) -> float:
    """Bytes one vision block saves for backward per token (constants above)."""
    v = cfg.vision
    d, i = v.hidden_dim, v.intermediate_dim
    residual = VISION_RESIDUAL_PER_TOKEN * d * b.res
    linear = VISION_LINEAR_PER_TOKEN * d * b.act + 4 * v.n_heads
    scale = 2 * d * b.act if v.layer_scale else 0
    mlp = (MLP_GATED_PER_TOKEN if v.gated_mlp else MLP_PLAIN_PER_TOKEN) * i * b.act
    return residual + linear + scale + mlp


def estimate_memory(
    cfg: VLMConfig,
    shape: SampleShape,
    batch_size: int,
    *,
    train: TrainConfig | None = None,
    device_type: str = "cuda",
    attention: Attention = "efficient",
    chunk_tokens: int = LOSS_CHUNK_TOKENS,
) -> MemoryEstimate:
    """Predicted peak memory of a training step (forward, backward, AdamW step) at `batch_size` rows of `shape`.

    `train` supplies freezing and gradient checkpointing. `attention="efficient"` (flash / memory-efficient SDPA)
    keeps no T x T scores; `"math"` saves the attention probabilities of every layer. With gradient checkpointing
    a block keeps only its input; one block's activations are alive again while it is recomputed in backward.
    """
    train = train or TrainConfig()
    b = _Bytes.for_device(device_type)
    counts = _param_counts(cfg)
    frozen = {"vision": train.freeze_vision_encoder, "projector": train.freeze_projector,
              "language": train.freeze_language_model}
    n_params = sum(n for n, _ in counts.values())
    n_trainable = sum(n for name, (n, _) in counts.items() if not frozen[name])
    weights = 4 * n_params + sum(buf for _, buf in counts.values())
    checkpointing = train.gradient_checkpointing

    # Decoder: each row is one full packed sample, so the boolean (T, T) mask is built once per forward.
    lang, t = cfg.language, shape.seq_len
    tokens = batch_size * t
    block = _decoder_block_bytes_per_token(cfg, b, t, device_type) * tokens
    if attention == "math":  # scores and probabilities per head
        block += 2 * lang.n_heads * t * tokens * b.act
    masks = tokens * t * (2 if any(lang.is_sliding(i) for i in range(lang.n_layers)) else 1)  # bool
    edges = tokens * (2 * lang.hidden_dim * b.res + lang.head_dim * b.act)  # final norm; RoPE cos/sin
    layers = lang.n_layers * tokens * lang.hidden_dim * b.res if checkpointing else lang.n_layers * block
    decoder = layers + masks + edges

    # Vision: the batch's views, each (prefix + grid) tokens; the projector keeps its pixel-shuffled input.
    v = cfg.vision
    grid = (shape.view_height // v.patch_size) * (shape.view_width // v.patch_size)
    n_views = batch_size * shape.n_views
    v_tokens = n_views * (grid + v.n_prefix_tokens)
    v_block = _vision_block_bytes_per_token(cfg, b) * v_tokens
    if attention == "math":
        v_block += 2 * v.n_heads * (grid + v.n_prefix_tokens) * v_tokens * b.act
    pixels = n_views * 3 * shape.view_height * shape.view_width * (4 + (b.act if b.act != 4 else 0))
    projector = 0 if frozen["projector"] and frozen["vision"] else n_views * grid * v.hidden_dim * b.act
    if frozen["vision"]:  # nothing upstream of the projector needs a gradient: no vision activations are kept
        vision = pixels + projector
    else:
        layers = v.n_layers * v_tokens * v.hidden_dim * b.res if checkpointing else v.n_layers * v_block
        vision = layers + pixels + projector + v_tokens * v.hidden_dim * b.res  # + final LayerNorm input
    if shape.n_views == 0:
        vision = 0

    # Loss: gathered hidden states of supervised positions + one chunk's logits, log-softmax and gradients, and
    # the output weight's gradient (a second, per-chunk copy while chunks are accumulated).
    n_supervised = batch_size * (t - 1 - shape.image_tokens)
    chunk = min(chunk_tokens, n_supervised)
    vocab = lang.total_vocab_size
    loss = n_supervised * lang.hidden_dim * b.res + LOSS_LOGIT_COPIES * chunk * vocab * 4
    if b.act != 4:
        loss += chunk * vocab * b.act  # the bf16 logits before the fp32 copy
    if not frozen["language"]:
        loss += vocab * lang.hidden_dim * 4 * (2 if n_supervised > chunk_tokens else 1)

    return MemoryEstimate(weights=weights, grads=4 * n_trainable, optimizer=8 * n_trainable,
                          vision_activations=int(vision), decoder_activations=int(decoder), loss=int(loss),
                          autocast_cache=2 * n_trainable if device_type == "cuda" else 0,
                          recompute=int(max(block, 0 if frozen["vision"] else v_block)) if checkpointing else 0)


def max_batch_size(cfg: VLMConfig, shape: SampleShape, budget_bytes: float, *, train: TrainConfig | None = None,
                   device_type: str = "cuda", limit: int = 1 << 16) -> int:
    """The largest batch size whose estimated peak fits `budget_bytes` (0 when not even one row fits)."""
    def fits(n: int) -> bool:
        return estimate_memory(cfg, shape, n, train=train, device_type=device_type).total <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# --- Measuring a real step -----------------------------------------------------------------------------------


@dataclass
class StepMeasurement:
    """One batch size, measured. Byte counts are the peak above the memory in use before the model was built."""

    batch_size: int
    device: str
    measured_peak_bytes: int | None  # CUDA: peak allocated; CPU: peak resident memory
    reserved_peak_bytes: int | None = None  # CUDA caching allocator reserve
    model_bytes: int | None = None  # right after the model was built
    optimizer_state_bytes: int | None = None
    step_time_s: float | None = None
    oom: bool = False
    error: str | None = None


def prepare_model(cfg: VLMConfig, train: TrainConfig, device: torch.device) -> tuple[VisionLanguageModel, Any]:
    """A randomly initialised model set up as training sets it up (freezing, checkpointing, compile) + AdamW."""
    from nanovlm_cli.training.optim import apply_freezing, build_optimizer

    model = VisionLanguageModel(cfg.replace(image_token_id=_image_token_id(cfg))).to(device).train()
    apply_freezing(model, train)
    model.vision.gradient_checkpointing = model.language.gradient_checkpointing = train.gradient_checkpointing
    if train.compile:
        model.language.compile()
        model.vision.compile()
    return model, build_optimizer(model, train, device)


def train_step(model: VisionLanguageModel, optimizer: torch.optim.Optimizer, batch: Any, device: torch.device) -> float:
    """Forward, backward and optimizer step, as the training loop does them; returns the loss."""
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        out = model.loss(batch)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux: VmHWM via /proc/self/clear_refs), so that transient peaks of
    imports and warm-up are not charged to the step. False where the platform cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports kB, macOS bytes
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def _miniature(cfg: VLMConfig) -> VLMConfig:
    """`cfg` with one layer per tower: the same code paths (layer kinds, kernels) at a fraction of the memory."""
    return cfg.replace(vision=cfg.vision.replace(n_layers=1), language=cfg.language.replace(
        n_layers=1, layer_types=cfg.language.layer_types[:1] if cfg.language.layer_types else None))


def _warm_up(cfg: VLMConfig, train: TrainConfig, shape: SampleShape, device: torch.device) -> None:
    """Run one step of a miniature model first, so that one-off costs (lazy imports such as the optimizer's
    dynamo hooks, kernel code paged in, thread pools) are in the baseline and not counted as the step's."""
    mini = _miniature(cfg)
    small = SampleShape(min(shape.seq_len, 2 * shape.image_tokens + 16), min(shape.n_views, 1), shape.view_height,
                        shape.view_width, shape.tokens_per_view)
    model, optimizer = prepare_model(mini, train.replace(compile=False), device)
    train_step(model, optimizer, synthetic_batch(mini, small, 1), device)
    del model, optimizer


def measure_step(cfg: VLMConfig, train: TrainConfig, shape: SampleShape, batch_size: int, *,
                 device: str | torch.device = "cpu", steps: int = 2, seed: int = 0) -> StepMeasurement:
    """Measure `steps` training steps in this process. On the CPU the result is only clean in a fresh process:
    use `measure_in_subprocess` (that is what it calls)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    else:
        _warm_up(cfg, train, shape, device)
        base = _rss()
        _reset_peak_rss()
    model = optimizer = batch = None
    result = StepMeasurement(batch_size, str(device), None)
    try:
        model, optimizer = prepare_model(cfg, train, device)
        result.model_bytes = (torch.cuda.memory_allocated(device) if cuda else _rss()) - base
        batch = synthetic_batch(cfg, shape, batch_size, seed=seed).to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            start = time.perf_counter()
            train_step(model, optimizer, batch, device)
            if cuda:
                torch.cuda.synchronize(device)
            result.step_time_s = time.perf_counter() - start
        result.optimizer_state_bytes = optimizer_state_bytes(optimizer)
    except torch.OutOfMemoryError as exc:
        result.oom, result.error = True, str(exc).splitlines()[0]
    finally:
        if cuda:
            result.measured_peak_bytes = torch.cuda.max_memory_allocated(device) - base
            result.reserved_peak_bytes = torch.cuda.max_memory_reserved(device)
            del model, optimizer, batch
            torch.cuda.empty_cache()
        else:
            result.measured_peak_bytes = _peak_rss() - base
    return result


def measure_in_subprocess(cfg: VLMConfig, train: TrainConfig, shape: SampleShape, batch_size: int, *,
                          steps: int = 2, timeout_s: float | None = None) -> StepMeasurement:
    """`measure_step` on the CPU in a fresh Python process, so each peak is this step's alone.

    Large blocks are forced to `mmap` (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the process at once and
    the resident peak tracks live tensors instead of allocator fragmentation.
    """
    spec = {"model": cfg.to_dict(), "train": train.to_dict(), "shape": asdict(shape), "batch_size": batch_size,
            "steps": steps}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-m", "nanovlm_cli.memory", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=timeout_s, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        oom = proc.returncode in (-9, 137)  # killed by the kernel's OOM killer
        return StepMeasurement(batch_size, "cpu", None, oom=oom, error=f"subprocess exited {proc.returncode}: {tail}")
    return StepMeasurement(**json.loads(lines[-1]))


# --- The sweep behind `nanovlm vram` -------------------------------------------------------------------------


@dataclass
class VramRow:
    batch_size: int
    measured_peak_bytes: int | None
    estimated_peak_bytes: int  # the memory model's CUDA (bf16 autocast) peak
    oom: bool
    estimated_device_peak_bytes: int  # the memory model's peak for the device measured (fp32 on CPU)
    reserved_peak_bytes: int | None = None
    model_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    step_time_s: float | None = None
    error: str | None = None
    estimate: dict[str, int] = field(default_factory=dict)  # CUDA breakdown


@dataclass
class VramReport:
    device: str
    rows: list[VramRow]
    seq_len: int
    shape: SampleShape
    measured: str  # what `measured_peak_bytes` means on this device
    max_memory_gib: float | None = None
    max_batch_size: int | None = None  # the largest batch size the model says fits max_memory_gib (CUDA)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "measured": self.measured, "seq_len": self.seq_len,
                "shape": asdict(self.shape), "rows": [asdict(r) for r in self.rows],
                "max_memory_gib": self.max_memory_gib, "max_batch_size": self.max_batch_size}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for CUDA but no CUDA device is visible; use --device cpu")
    if not (device.startswith("cuda") or device == "cpu"):
        raise ConfigError(f"--device {device} is not supported by vram; use auto, cpu or cuda[:N]")
    return torch.device(device)


def measure_vram(
    model_cfg: VLMConfig | None,
    train_cfg: TrainConfig,
    *,
    checkpoint: str | None = None,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    images_per_sample: int = 1,
    max_memory_gib: float | None = None,
    stop_on_oom: bool = False,
    device: str = "auto",
) -> VramReport:
    """Measure and estimate peak training memory for each batch size (rows of `train_cfg.max_seq_len` tokens)."""
    if checkpoint is not None:
        from nanovlm_cli.checkpoint.files import resolve_source
        from nanovlm_cli.checkpoint.io import read_model_config

        model_cfg = read_model_config(resolve_source(checkpoint))
    if model_cfg is None:
        raise ConfigError("measure_vram needs a model config or a checkpoint; pass one of them")
    dev = resolve_device(device)
    shape = sample_shape(model_cfg, train_cfg.max_seq_len, images_per_sample)
    rows: list[VramRow] = []
    for n in batch_sizes:
        cuda_estimate = estimate_memory(model_cfg, shape, n, train=train_cfg, device_type="cuda")
        device_estimate = estimate_memory(model_cfg, shape, n, train=train_cfg, device_type=dev.type)
        logger.info("batch size %d: measuring on %s", n, dev)
        if dev.type == "cuda":
            m = measure_step(model_cfg, train_cfg, shape, n, device=dev)
        else:
            m = measure_in_subprocess(model_cfg, train_cfg, shape, n)
        if m.error and not m.oom:
            raise NanoVLMError(f"measuring batch size {n} failed: {m.error}")
        rows.append(VramRow(n, m.measured_peak_bytes, cuda_estimate.total, m.oom, device_estimate.total,
                            m.reserved_peak_bytes, m.model_bytes, m.optimizer_state_bytes, m.step_time_s, m.error,
                            cuda_estimate.to_dict()))
        if m.oom and stop_on_oom:
            break
    best = None
    if max_memory_gib is not None:
        best = max_batch_size(model_cfg, shape, max_memory_gib * GIB, train=train_cfg, device_type="cuda")
    measured = ("peak allocated CUDA memory above the empty device" if dev.type == "cuda"
                else "peak resident CPU memory above the process before the model (fp32, no autocast)")
    return VramReport(str(dev), rows, train_cfg.max_seq_len, shape, measured, max_memory_gib, best)


def plot_vram(report: VramReport, path: str) -> None:
    """Save measured and estimated peak memory per batch size as a PNG (needs the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib; install it with: pip install 'nanovlm-cli[plot]'") from None
    sizes = [r.batch_size for r in report.rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    measured = [(r.batch_size, r.measured_peak_bytes / GIB) for r in report.rows if r.measured_peak_bytes]
    if measured:
        ax.plot(*zip(*measured), "o-", label=f"measured ({report.device})")
    ax.plot(sizes, [r.estimated_peak_bytes / GIB for r in report.rows], "s--", label="estimated CUDA (bf16)")
    if report.device == "cpu":
        ax.plot(sizes, [r.estimated_device_peak_bytes / GIB for r in report.rows], "^:", label="estimated CPU (fp32)")
    ax.set(xlabel="batch size", ylabel="peak memory (GiB)", title=f"training step memory, {report.seq_len} tokens/row")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Child-process entry: measure one spec (JSON) on the CPU and print the result as one JSON line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m nanovlm_cli.memory SPEC_JSON\n")
        return 2
    spec = json.loads(args[0])
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    result = measure_step(VLMConfig.from_dict(spec["model"]), TrainConfig.from_dict(spec["train"]),
                          SampleShape(**spec["shape"]), int(spec["batch_size"]), steps=int(spec.get("steps", 2)))
    sys.stdout.write(json.dumps(asdict(result)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
