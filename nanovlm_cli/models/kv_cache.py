"""A preallocated key/value cache for the decoder (nanochat style).

One tensor per keys and per values holds every layer: `(n_layers, batch, n_kv_heads, max_len, head_dim)`,
allocated once before prefill, so decoding never concatenates or reallocates. Slots are absolute indices
`0..max_len-1`; `pos` counts the filled ones. Each layer writes its new keys at `[pos:pos+T]` and attends to the
view `[:pos+T]`; `LanguageModel.forward` calls `advance(T)` once after the last layer. Keys are stored after RoPE,
so the cache is independent of how positions were assigned (left padding, packing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nanovlm_cli.config import LanguageConfig
from nanovlm_cli.errors import GenerationError


class KVCache:
    """Keys and values of every layer for `batch_size` rows and up to `max_len` slots."""

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
            raise GenerationError(f"KV cache max_len={max_len} must be positive; pass the prompt length plus new tokens")
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, H_kv, max_len, Dh)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, H_kv, max_len, Dh)
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def for_model(
        cls, cfg: LanguageConfig, batch_size: int, max_len: int, *, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, max_len, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def check_room(self, n: int) -> None:
        """Raise if `n` more slots do not fit (called before any layer writes, so nothing is half-written)."""
        if self.pos + n > self.max_len:
            raise GenerationError(
                f"KV cache is full: {self.pos} slots used + {n} new > max_len={self.max_len}; "
                "allocate the cache with max_len >= prompt length + max new tokens"
            )

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write `k`, `v` (B, H_kv, T, Dh) at slots [pos:pos+T] of `layer`; return the filled views [:pos+T]."""
        return self.layer(layer).update(k, v)

    def layer(self, layer: int) -> LayerCache:
        """One layer's slice of the cache. Decoder blocks get this rather than the cache and an index, so a compiled
        block sees tensors of the same shape for every layer and compiles once (not once per layer index)."""
        self.check_room(0)
        return LayerCache(self.k[layer], self.v[layer], self.pos)

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
