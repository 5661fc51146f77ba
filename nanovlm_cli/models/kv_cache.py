"""A preallocated key/value cache for the decoder (nanochat style).

One tensor per keys and per values holds every layer: `(n_layers, batch, n_kv_heads, max_len, head_dim)`,
allocated once before prefill, so decoding never concatenates or reallocates. Slots are absolute indices
`0..max_len-1`; `pos` counts the filled ones. Each layer writes its new keys at `[pos:pos+T]` and attends to the
view `[:pos+T]`; `LanguageModel.forward` calls `advance(T)` once after the last layer. Keys are stored after RoPE,
so the cache is independent of how positions were assigned (left padding, packing). `StaticKVCache` views a filled
cache with shapes that never change, for `LanguageModel.decode_step` under `torch.compile`.
"""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import Tensor

from nanovlm_cli.config import LanguageConfig
from nanovlm_cli.errors import GenerationError


class _KVBuffers:
    """Keys and values of every layer, `(n_layers, batch, n_kv_heads, max_len, head_dim)` each, with per-layer views."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if max_len <= 0:
            raise GenerationError(f"KV cache max_len={max_len} must be positive; pass the prompt length plus new "
                                  "tokens")
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, H_kv, max_len, Dh)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, H_kv, max_len, Dh)
        self.max_len = max_len
        self._split_layers()

    def _split_layers(self) -> None:
        """Each layer's (k, v) views, made once: a decode step then indexes no tensors to find a layer."""
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))

    @classmethod
    def for_model(
        cls, cfg: LanguageConfig, batch_size: int, max_len: int, *, device: torch.device | str, dtype: torch.dtype
    ) -> Self:
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, max_len, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


class KVCache(_KVBuffers):
    """Keys and values of every layer for `batch_size` rows and up to `max_len` slots; `pos` of them filled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pos = 0

    def check_room(self, n: int) -> None:
        """Raise if `n` more slots do not fit (called before any layer writes, so nothing is half-written)."""
        if self.pos + n > self.max_len:
            raise GenerationError(
                f"KV cache is full: {self.pos} slots used + {n} new > max_len={self.max_len}; "
                "allocate the cache with max_len >= prompt length + max new tokens"
            )

    def layer(self, layer: int) -> LayerCache:
        """One layer's slice of the cache. Decoder blocks get this rather than the cache and an index, so a compiled
        block sees tensors of the same shape for every layer and compiles once (not once per layer index)."""
        self.check_room(0)
        return LayerCache(*self._layers[layer], self.pos)

    def advance(self, n: int) -> None:
        self.check_room(n)
        self.pos += n

    def repeat_batch(self, n: int) -> KVCache:
        """A new cache whose rows are each row of this one repeated `n` times (row order 0,0,..,1,1,..)."""
        if n < 1:
            raise GenerationError(f"repeat_batch(n={n}) needs n >= 1")
        out = KVCache.__new__(KVCache)
        out.k = self.k.repeat_interleave(n, dim=1)  # (L, B*n, H_kv, max_len, Dh)
        out.v = self.v.repeat_interleave(n, dim=1)
        out.max_len = self.max_len
        out.pos = self.pos
        out._split_layers()
        return out


class LayerCache:
    """Keys and values of one layer, (B, H_kv, max_len, Dh) views into the `KVCache`, and the filled length."""

    def __init__(self, k: Tensor, v: Tensor, pos: int) -> None:
        self.k, self.v, self.pos = k, v, pos

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write `k`, `v` (B, H_kv, T, Dh) at slots [pos:pos+T]; return the filled views [:pos+T]."""
        end = self.pos + k.shape[2]
        self.k[:, :, self.pos:end] = k
        self.v[:, :, self.pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H_kv, pos+T, Dh) each


class StaticKVCache(_KVBuffers):
    """Keys and values with shapes that never change between decode steps, for a compiled decode (gpt-fast style).

    Every step attends over all `max_len` slots, masked by `filled` (B, max_len), and writes its keys at the slot
    held in the one-element tensor `slot`, so the whole step compiles to one graph (on CUDA replayed as one CUDA
    graph) instead of re-guarding as the cache grows. Attending over empty slots costs a little compute; the mask
    makes it exact. The tensors live as long as the cache, so an `Engine` keeps one and `load`s each prefill into it
    (a compiled graph keeps pointing at the same memory).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        b, device = self.batch_size, self.k.device
        self.filled = torch.zeros(b, self.max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # (1,) the next slot to write

    def fits(self, batch_size: int, max_len: int, dtype: torch.dtype) -> bool:
        return self.batch_size == batch_size and self.max_len >= max_len and self.k.dtype == dtype

    def load(self, cache: KVCache, segment_ids: Tensor | None) -> None:
        """Take over a prefilled `cache` (same rows): its keys, values and which of its slots are real."""
        if cache.batch_size != self.batch_size or cache.pos > self.max_len:
            raise GenerationError(f"cannot load a cache of {cache.batch_size} rows x {cache.pos} slots into a static "
                                  f"cache of {self.batch_size} rows x {self.max_len} slots")
        n = cache.pos
        self.k[:, :, :, :n] = cache.k[:, :, :, :n]
        self.v[:, :, :, :n] = cache.v[:, :, :, :n]
        self.filled.zero_()
        self.filled[:, :n] = True if segment_ids is None else segment_ids[:, :n] != 0  # left padding stays out
        self.slot.fill_(n)

    def layer(self, layer: int) -> StaticLayerCache:
        return StaticLayerCache(*self._layers[layer], self.slot)


class StaticLayerCache:
    """One layer of a `StaticKVCache`: writes at `slot`, returns the whole (B, H_kv, max_len, Dh) buffers."""

    def __init__(self, k: Tensor, v: Tensor, slot: Tensor) -> None:
        self.k, self.v, self.slot = k, v, slot

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, self.slot, k)  # k: (B, H_kv, 1, Dh)
        self.v.index_copy_(2, self.slot, v)
        return self.k, self.v
