"""The memory model: peak training memory counted from the config (see the package docstring)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.data.sample import Batch
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.models import attention as kernels
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

    "fixed": one tile per image. "tiles": an n x n grid (n <= max_grid, n * tile <= max_side) plus the global view;
    "idefics3" the same with n = ceil(max_side / tile) (the global view alone when it does not split).
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
        if image.mode == "idefics3" and image.split:  # as many tiles as its longest edge makes, the global view too
            n = math.ceil(image.max_side / image.tile_size)
        with_global = image.mode == "idefics3" or (image.mode == "tiles" and image.global_view)
        extra = int(with_global and n > 1)
        while n > 1 and not fits((n * n + extra) * tokens):
            n -= 1
            extra = int(with_global and n > 1)
        views, size = n * n + extra, (image.tile_size, image.tile_size)
    if images_per_sample and not fits(views * tokens):
        raise ConfigError(f"--seq-len {seq_len} cannot hold {images_per_sample} image(s) of {views * tokens} tokens "
                          f"plus text; raise --seq-len to at least {2 * images_per_sample * views * tokens}")
    return SampleShape(seq_len, images_per_sample * views, size[0], size[1], tokens)


def synthetic_batch(cfg: VLMConfig, shape: SampleShape, batch_size: int, *, seed: int = 0) -> Any:
    """A `Batch` of `batch_size` full rows: image tokens first, then text; every text position is supervised."""
    gen = torch.Generator().manual_seed(seed)
    image_id = cfg.image_token_id  # presets and checkpoints fix it (see checkpoint.io.build_model)
    if image_id is None or not 0 <= image_id < cfg.language.total_vocab_size:
        raise ConfigError(f"image_token_id={image_id} is not a row of the model's {cfg.language.total_vocab_size}-row "
                          "embedding; use a preset's or a checkpoint's config, or set image_token_id with the "
                          "vocabulary it belongs to")
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
        model = VisionLanguageModel(cfg)
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


def _attention_calls(seq_len: int, device_type: str) -> tuple[float, int]:
    """(keys per query, queries per SDPA call) of the masked attention of a causal one-sample row.

    Long masked rows run attention per chunk of `ATTENTION_CHUNK` queries over the keys the mask lets them reach
    (`models/attention.py`): chunk j of n = T / c sees (j + 1) c keys, (T + c) / 2 per query on average.
    Shorter rows (or a device without chunking) make one call over all T keys.
    """
    chunk = kernels.ATTENTION_CHUNK  # read at call time, so a patched switch is seen
    if seq_len < 2 * chunk or device_type not in kernels.CHUNKED_ATTENTION_DEVICES:
        return float(seq_len), seq_len
    n = math.ceil(seq_len / chunk)
    return chunk * n * (n + 1) / 2 / seq_len, chunk


def _decoder_block_bytes_per_token(cfg: VLMConfig, b: _Bytes, seq_len: int, device_type: str) -> float:
    """Bytes one decoder block saves for backward per token (constants above)."""
    lang = cfg.language
    d, i = lang.hidden_dim, lang.intermediate_dim
    q, kv = lang.n_heads * lang.head_dim, lang.n_kv_heads * lang.head_dim
    keys, queries_per_call = _attention_calls(seq_len, device_type)
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
    return largest_fitting(
        lambda n: estimate_memory(cfg, shape, n, train=train, device_type=device_type).total <= budget_bytes, limit)


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n >= 1 with `fits(n)` (monotone: doubling up to about `limit`, then bisection); 0 if not even 1."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


