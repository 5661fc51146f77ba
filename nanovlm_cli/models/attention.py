"""Attention kernels and masks for the decoder: what `models/language.py` calls, kept apart so the model reads as math.

`language.Attention` projects, norms and rotates q/k, then calls `attend`; `LanguageModel` builds its masks once per
forward with `dense_masks` (or `block_masks` for FlexAttention) and shares them across layers. The speed tricks live
here: masked rows split into chunks of queries over only the keys they can reach (`query_spans`, with a custom
backward in `_ChunkedAttention`), and the GQA branches of SDPA that keep fused kernels on each device.

Main design choice: when no mask is needed SDPA runs with `is_causal=True`, never a mask and `is_causal` together.

Worked example of the mask (segment_ids = [1, 1, 2, 2, 0], sliding_window = 2; x = may attend):

    query\\key  0 1 2 3 4          full layers       sliding layers drop key j when i - j >= 2
        0      x . . . .          sample 1          (same here: each sample is only 2 long)
        1      x x . . .
        2      . . x . .          sample 2 restarts: position_ids = [0, 1, 0, 1, 0]
        3      . . x x .
        4      . . . . x          padding attends only to itself, so nothing is NaN
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import LongTensor, Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# Masked attention over T >= 2 * ATTENTION_CHUNK queries runs per chunk of queries, each over only the keys its mask
# can reach (see `query_spans`): packed rows of short samples then cost ~T * (chunk + sample length), not T * T.
ATTENTION_CHUNK = 64
# Devices where the chunking pays. On CUDA one fused masked SDPA call beats many small ones (benchmarks/mfu.py
# measures both); packed rows there are best served by FlexAttention (`LanguageModel.attention = "flex"`).
CHUNKED_ATTENTION_DEVICES = frozenset({"cpu"})
Span = tuple[int, int, int, int]  # queries [q0, q1) attend at most to keys [k0, k1)


def query_spans(mask: Tensor, chunk: int | None = None) -> list[Span] | None:
    """Chunks of queries with the key range their (B|1, 1, T, S) boolean mask allows, or None when not worth it.

    The ranges come from the mask itself (first and last allowed key of any query of the chunk, any row), so
    skipping the keys outside them is exact. Example: two packed samples of 3 and 5 tokens, chunk 4 -> queries
    [0, 4) may see keys [0, 4) and queries [4, 8) keys [3, 8) (the second sample starts at 3).
    """
    chunk = chunk or ATTENTION_CHUNK
    t, s = mask.shape[-2:]
    if t < 2 * chunk:
        return None
    starts = list(range(0, t, chunk))
    reach = torch.stack([mask[..., a:a + chunk, :].flatten(0, -2).any(0) for a in starts])  # (n_chunks, S)
    first = reach.int().argmax(dim=1)  # first allowed key of each chunk
    last = s - reach.flip(1).int().argmax(dim=1)  # one past the last allowed key
    spans = [(a, min(a + chunk, t), k0, k1) for a, k0, k1 in zip(starts, first.tolist(), last.tolist())]
    if sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in spans) > 0.75 * t * s:
        return None  # too little to skip to pay for several calls
    return spans


class _ChunkedAttention(torch.autograd.Function):
    """Masked attention per chunk of queries over its key span (`query_spans`), for training.

    Same values and gradients as slicing q/k/v per chunk under autograd, but the backward adds each chunk's key and
    value gradients into one buffer: autograd would build a zero tensor of the full key length per slice and add
    them all up (3-4% of the tiny benchmark workload's CPU training step, measured).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, spans: list[Span], sdpa_fn) -> Tensor:
        graphs, outs = [], []
        with torch.enable_grad():  # one small graph per chunk, replayed by backward
            for q0, q1, k0, k1 in spans:
                qs = q[:, :, q0:q1].detach().requires_grad_()
                ks = k[:, :, k0:k1].detach().requires_grad_()
                vs = v[:, :, k0:k1].detach().requires_grad_()
                out = sdpa_fn(qs, ks, vs, mask[..., q0:q1, k0:k1])  # (B, H, q1-q0, Dh)
                graphs.append((qs, ks, vs, out))
                outs.append(out.detach())
        ctx.graphs, ctx.spans = graphs, spans
        ctx.layouts = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return torch.cat(outs, dim=2)  # (B, H, T, Dh)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (q_shape, q_dtype, device), (k_shape, k_dtype, _), (v_shape, v_dtype, _) = ctx.layouts
        dq = torch.empty(q_shape, dtype=q_dtype, device=device)
        dk = torch.zeros(k_shape, dtype=k_dtype, device=device)
        dv = torch.zeros(v_shape, dtype=v_dtype, device=device)
        for (q0, q1, k0, k1), (qs, ks, vs, out) in zip(ctx.spans, ctx.graphs):
            gq, gk, gv = torch.autograd.grad(out, (qs, ks, vs), grad[:, :, q0:q1])
            dq[:, :, q0:q1] = gq
            dk[:, :, k0:k1] += gk
            dv[:, :, k0:k1] += gv
        ctx.graphs = None
        return dq, dk, dv, None, None, None


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BlockMask | None, spans: list[Span] | None, scale: float
) -> Tensor:
    """Grouped-query attention of q (B, H, T, Dh) over k, v (B, H_kv, S, Dh) -> (B, H, T, Dh).

    A `BlockMask` runs FlexAttention; a boolean mask with `spans` runs per chunk of queries; otherwise one `sdpa`.
    """
    if isinstance(mask, BlockMask):  # not an autocast op: RoPE left q and k in fp32 under bf16 autocast
        return flex_attention(q.to(v.dtype), k.to(v.dtype), v, block_mask=mask, scale=scale,
                              enable_gqa=q.shape[1] != k.shape[1])
    if spans is not None and mask is not None:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _ChunkedAttention.apply(q, k, v, mask, spans, functools.partial(sdpa, scale=scale))
        return torch.cat([sdpa(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], mask[..., q0:q1, k0:k1], scale)
                          for q0, q1, k0, k1 in spans], dim=2)  # (B, H, T, Dh)
    return sdpa(q, k, v, mask, scale)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA with the GQA branch that keeps a fused kernel on each device; q (B, H, T, Dh), k/v (B, H_kv, S, Dh)."""
    b, h, t, dh = q.shape
    n_kv_heads = k.shape[1]
    groups = h // n_kv_heads
    if t == 1 and groups > 1:
        # Decode step: the query heads of one kv head become `groups` queries of it, so no key copy is needed
        # and a (B, 1, 1, S) mask still broadcasts (the mask is shared by all heads). Faster than enable_gqa
        # on CPU (about 1.5x per call at decode shapes).
        y = F.scaled_dot_product_attention(q.reshape(b, n_kv_heads, groups, dh), k, v, attn_mask=mask,
                                           scale=scale)  # (B, H_kv, groups, Dh)
        return y.reshape(b, h, 1, dh)
    if mask is None:
        # No mask means either plain causal self-attention (T == S) or one query over the whole cache.
        return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale, enable_gqa=groups > 1)
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if q.device.type == "cpu":  # the CPU flash kernel takes masked GQA directly (no key copies, ~10% faster)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    # Masked GQA falls back to the math kernel on CUDA with enable_gqa; repeating keys keeps fused kernels.
    k = k[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, h, -1, dh)  # (B, H, S, Dh)
    v = v[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, h, -1, dh)  # (B, H, S, Dh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def dense_masks(
    t: int, pos: int, segment_ids: LongTensor | None, device: torch.device, window: int, has_sliding: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Boolean masks (True = attend) for full and sliding layers, or None where SDPA needs none.

    `t` queries sit at slots [pos, pos + t) over keys [0, pos + t). None is returned only when the layer's
    attention is exactly causal over T == S slots (`is_causal=True`) or a single query over every cached slot.
    """
    s = pos + t
    full_needs = segment_ids is not None or (pos > 0 and t > 1)
    sliding_needs = has_sliding and (full_needs or s > window)
    if not full_needs and not sliding_needs:
        return None, None
    q_slot = torch.arange(pos, s, device=device)  # (T,)
    k_slot = torch.arange(s, device=device)  # (S,)
    allowed = k_slot[None, :] <= q_slot[:, None]  # (T, S)
    if segment_ids is not None:
        seg_k = segment_ids[:, None, :]  # (B, 1, S)
        seg_q = segment_ids[:, pos:, None]  # (B, T, 1)
        allowed = allowed & (seg_q == seg_k) & (seg_k != 0)  # (B, T, S)
        allowed = allowed | (k_slot[None, :] == q_slot[:, None])  # a padding query attends to itself
    else:
        allowed = allowed[None]  # (1, T, S)
    full = allowed[:, None] if full_needs else None  # (B|1, 1, T, S)
    sliding = None
    if sliding_needs:
        in_window = (q_slot[:, None] - k_slot[None, :]) < window  # (T, S), HF: kv > q - window
        sliding = (allowed & in_window)[:, None]  # (B|1, 1, T, S)
    return full, sliding


def block_masks(segment_ids: LongTensor, window: int, has_sliding: bool) -> tuple[BlockMask, BlockMask | None]:
    """The `dense_masks` of a packed batch without a cache, as FlexAttention block masks (full, sliding)."""
    b, t = segment_ids.shape

    def same_sample_causal(batch: Tensor, head: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        seg_q, seg_kv = segment_ids[batch, q], segment_ids[batch, kv]
        return ((kv <= q) & (seg_q == seg_kv) & (seg_kv != 0)) | (q == kv)

    def in_window(batch: Tensor, head: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return same_sample_causal(batch, head, q, kv) & (q - kv < window)

    device = segment_ids.device
    full = create_block_mask(same_sample_causal, b, None, t, t, device=device)
    sliding = create_block_mask(in_window, b, None, t, t, device=device) if has_sliding else None
    return full, sliding


def static_cache_masks(filled: Tensor, slot: Tensor, window: int, has_sliding: bool) -> tuple[Tensor, Tensor | None]:
    """Masks of one decode step over every slot of a static cache: (B, 1, 1, S) full and sliding (or None).

    `filled` (B, S) marks the slots written so far (the new token's included); `slot` is the new token's slot.
    """
    full = filled[:, None, None, :]  # (B, 1, 1, S)
    if not has_sliding:
        return full, None
    slots = torch.arange(filled.shape[1], device=filled.device)  # (S,)
    return full, full & ((slot - slots) < window)
