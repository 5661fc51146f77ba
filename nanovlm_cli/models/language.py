"""The decoder language model: one class for Llama/SmolLM2 and Gemma-3, chosen by `LanguageConfig` flags.

Gemma-3 differs from Llama only through named flags (never through the model's name): (1 + w) RMSNorm computed
in fp32, per-head q/k norms, norms before *and* after attention and MLP, GELU-tanh gating, embeddings scaled by
sqrt(hidden_dim), a custom attention scale, and sliding-window local layers with their own RoPE base.

Main design choice: attention masks are built once per forward (one for full layers, one for sliding layers) from
`segment_ids` and the cache offset, and shared by every layer; RoPE cos/sin tables are precomputed buffers indexed by
`position_ids`, so positions that restart per packed sample or start after left padding cost nothing extra. The
kernels and masks themselves (chunked SDPA, the GQA branches, FlexAttention, a worked example of the mask) live in
`models/attention.py`: this file reads as the math.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import LongTensor, Tensor, nn
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from nanovlm_cli.config import LanguageConfig
from nanovlm_cli.errors import DataError, GenerationError
from nanovlm_cli.models.attention import (
    CHUNKED_ATTENTION_DEVICES,
    Span,
    attend,
    block_masks,
    dense_masks,
    query_spans,
    static_cache_masks,
)
from nanovlm_cli.models.kv_cache import KVCache, LayerCache, StaticKVCache, StaticLayerCache

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """RMSNorm in fp32. Llama: w * norm(x).to(dtype); Gemma (`unit_offset`): (norm(x) * (1 + w)).to(dtype)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if not self.unit_offset and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same arithmetic in one call (w * normed == normed * w exactly): fewer ops per decode step.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.type_as(x)


class RotaryTables(nn.Module):
    """cos/sin of RoPE for every position up to max_position_embeddings, as non-persistent buffers.

    Tables hold half the head dimension (the two rotated halves share frequencies, HF's rotate_half layout).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling_factor = theta, scaling_factor
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """(Re)compute the tables in fp32 on their device, then store them in the buffers' dtype."""
        device = self.cos.device
        if device.type == "meta":
            return
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        inv_freq = inv_freq / self.scaling_factor  # linear scaling, as HF's "linear" rope_type
        freqs = torch.arange(self.max_positions, device=device).float()[:, None] * inv_freq[None, :]  # (P, Dh/2)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def forward(self, position_ids: LongTensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos = self.cos[position_ids].to(dtype).unsqueeze(1)  # (B, 1, T, Dh/2)
        sin = self.sin[position_ids].to(dtype).unsqueeze(1)  # (B, 1, T, Dh/2)
        return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, Dh) by the angle tables; same arithmetic as HF's rotate_half, bit for bit.

    Half-width tables (B, 1, T, Dh/2) are what training uses: fewer bytes to broadcast over long rows. Full-width
    tables from `decode_tables` (cos | cos and -sin | sin) give the same values in half the ops, which is what
    counts when one token per row is decoded (x1*cos - x2*sin == x1*cos + x2*(-sin) exactly in IEEE arithmetic).
    """
    if cos.shape[-1] == x.shape[-1]:
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin  # roll: (x1, x2) -> (x2, x1)
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, H, T, Dh)


def decode_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Full-width tables (cos | cos, -sin | sin) for `apply_rope`'s few-op path."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional per-head q/k RMSNorm; the kernel is `attention.attend`."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, bias = cfg.hidden_dim, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.norm_unit_offset) if cfg.qk_norm else None
        self.scale = (cfg.query_pre_attn_scalar or self.head_dim) ** -0.5

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | BlockMask | None,
        kv_cache: LayerCache | StaticLayerCache | None, spans: list[Span] | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)  # (B, T, H, Dh)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, Dh)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, Dh)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, H_kv, T, Dh)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, H_kv, S, Dh) each
        y = attend(q, k, v, mask, spans, self.scale)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act SiLU (Llama) or GELU-tanh (Gemma)."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_dim, cfg.intermediate_dim, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_dim, cfg.intermediate_dim, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_dim, cfg.hidden_dim, bias=False)
        self.gelu = cfg.act == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)  # (B, T, I)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))  # (B, T, D)


class Block(nn.Module):
    """Pre-norm residual block; with `post_norms` the attention and MLP outputs are normed too (Gemma-3)."""

    def __init__(self, cfg: LanguageConfig, layer: int) -> None:
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_unit_offset
        self.sliding = cfg.is_sliding(layer)
        self.attn_norm = RMSNorm(cfg.hidden_dim, eps, off)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_dim, eps, off) if cfg.post_norms else None
        self.mlp_norm = RMSNorm(cfg.hidden_dim, eps, off)
        self.mlp = MLP(cfg)
        self.post_mlp_norm = RMSNorm(cfg.hidden_dim, eps, off) if cfg.post_norms else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | BlockMask | None,
                kv_cache: LayerCache | StaticLayerCache | None, spans: list[Span] | None = None) -> Tensor:
        h = self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, spans)  # (B, T, D)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))  # (B, T, D)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class LanguageModel(nn.Module):
    """Token embedding -> decoder blocks -> final norm; `logits()` applies the (possibly tied) output head."""

    def __init__(self, cfg: LanguageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        # "sdpa": dense boolean masks through SDPA (chunked over queries on the CPU). "flex": packed rows run
        # FlexAttention with block-sparse masks, which skips whole blocks across samples; it needs torch.compile
        # to be fast (eager flex is a reference implementation), so the trainer picks it for --compile on CUDA.
        self.attention = "sdpa"
        self.chunk_attention = True  # per-chunk masked SDPA on CHUNKED_ATTENTION_DEVICES (off when compiled)
        self.embed_tokens = nn.Embedding(cfg.total_vocab_size, cfg.hidden_dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_dim, cfg.rms_norm_eps, cfg.norm_unit_offset)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_dim, cfg.total_vocab_size, bias=False)
        self.rope = RotaryTables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling_factor)
        self.has_sliding = any(cfg.is_sliding(i) for i in range(cfg.n_layers))
        self.rope_local = None
        if self.has_sliding and cfg.rope_local_theta is not None:
            self.rope_local = RotaryTables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_local_theta)
        # HF Gemma multiplies by the scale cast to the embedding dtype (sqrt(640) becomes 25.25 in bf16): match it.
        self.register_buffer("embed_scale", torch.tensor(math.sqrt(cfg.hidden_dim)), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """From-scratch init: normal(0, 0.02) weights, zero biases, norm weights 1 (0 with the unit offset)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.zeros_(module.weight) if module.unit_offset else nn.init.ones_(module.weight)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (after `to_empty` from the meta device)."""
        self.rope.reset()
        if self.rope_local is not None:
            self.rope_local.reset()
        if self.embed_scale.device.type != "meta":
            self.embed_scale.fill_(math.sqrt(self.cfg.hidden_dim))

    @property
    def output_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight  # (V, D)

    def embed(self, input_ids: LongTensor) -> Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, D)
        if self.cfg.embed_scale:
            x = x * self.embed_scale.to(x.dtype)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.output_weight)  # (..., V)

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: LongTensor,
        *,
        segment_ids: LongTensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        b, t, _ = inputs_embeds.shape
        pos = 0
        if kv_cache is not None:
            if kv_cache.batch_size != b:
                raise GenerationError(f"KV cache has batch size {kv_cache.batch_size} but the input has {b} rows; "
                                      "allocate the cache for this batch (or use repeat_batch)")
            kv_cache.check_room(t)
            pos = kv_cache.pos
        if tuple(position_ids.shape) != (b, t):
            raise DataError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(b, t)}")
        if segment_ids is not None and tuple(segment_ids.shape) != (b, pos + t):
            raise DataError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected (batch, slots after this "
                            f"call) = {(b, pos + t)}")
        full_spans = sliding_spans = None
        if self.attention == "flex" and segment_ids is not None and kv_cache is None:
            full_mask, sliding_mask = block_masks(segment_ids, self.cfg.sliding_window, self.has_sliding)
        else:
            full_mask, sliding_mask = dense_masks(t, pos, segment_ids, inputs_embeds.device,
                                                  self.cfg.sliding_window, self.has_sliding)
            if self.chunk_attention and inputs_embeds.device.type in CHUNKED_ATTENTION_DEVICES:
                full_spans = query_spans(full_mask) if full_mask is not None else None
                sliding_spans = query_spans(sliding_mask) if sliding_mask is not None else None
        cos, sin, cos_l, sin_l = self._rope_tables(position_ids, inputs_embeds.dtype)
        use_checkpoint = self.gradient_checkpointing and self.training and kv_cache is None
        x = inputs_embeds
        for i, block in enumerate(self.blocks):
            args = (cos_l, sin_l, sliding_mask) if block.sliding else (cos, sin, full_mask)
            spans = sliding_spans if block.sliding else full_spans
            if use_checkpoint:
                x = checkpoint(block, x, *args, None, spans, use_reentrant=False)
            else:
                x = block(x, *args, kv_cache.layer(i) if kv_cache is not None else None, spans)
        if kv_cache is not None:
            kv_cache.advance(t)
        return self.norm(x)  # (B, T, D)

    def _rope_tables(self, position_ids: LongTensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """cos, sin of the global RoPE, then of the local one (sliding layers; the global tables when it has none).

        One token per row (decoding) gets full-width tables: a few ops here save many in every layer (`apply_rope`).
        """
        tables = [self.rope] if self.rope_local is None else [self.rope, self.rope_local]
        out = [rope(position_ids, dtype) for rope in tables]
        if position_ids.shape[1] == 1:
            out = [decode_tables(cos, sin) for cos, sin in out]
        (cos, sin), (cos_l, sin_l) = out[0], out[-1]
        return cos, sin, cos_l, sin_l

    def decode_step(self, inputs_embeds: Tensor, position_ids: LongTensor, cache: StaticKVCache) -> Tensor:
        """One token per row through a `StaticKVCache`: (B, 1, D) -> (B, 1, D), every shape fixed across steps.

        The same computation as `forward` with a growing `KVCache` (tested), written for `torch.compile`: the keys
        of the new token go to `cache.slot`, attention spans all slots under the `cache.filled` mask, and the slot
        advances in place, so the compiled step has no Python-side state to guard on and never recompiles.
        """
        cache.filled.index_fill_(1, cache.slot, True)  # the new token attends to itself
        full, sliding = static_cache_masks(cache.filled, cache.slot, self.cfg.sliding_window, self.has_sliding)
        cos, sin, cos_l, sin_l = self._rope_tables(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        for i, block in enumerate(self.blocks):
            args = (cos_l, sin_l, sliding) if block.sliding else (cos, sin, full)
            x = block(x, *args, cache.layer(i))
        cache.slot.add_(1)
        return self.norm(x)  # (B, 1, D)
