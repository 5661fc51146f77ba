"""The vision encoder: one ViT that serves SigLIP/SigLIP2, DINOv2 and DINOv3 through config feature flags.

Main design choice: the three families differ only in a handful of switches read from `VisionConfig` —
learned absolute positions (bicubically resized to the input grid) or 2-D RoPE on patch centres
(`rope_theta`), a CLS token and register tokens (`use_cls`, `n_registers`), LayerScale (`layer_scale`), a plain
or gated MLP (`gated_mlp`, `act`) and per-projection biases (`qkv_bias`, `mlp_bias`). No code path looks at a Hub
id. The output after the final norm equals `transformers`' `last_hidden_state` on the same weights; the HF key
names and the conversion live in `nanovlm_cli.checkpoint.hf_vision`.

Worked example (DINOv3 ViT-S/16+, a 96x160 image): the grid is 6x10 = 60 patches; the sequence is
[CLS, reg1..reg4, p(0,0), p(0,1), ..., p(5,9)] = 65 tokens; RoPE rotates queries/keys of the 60 patch tokens
only, the 5 prefix tokens attend without a position. `forward` returns the 60 patch tokens.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nanovlm_cli.config import VisionConfig
from nanovlm_cli.errors import ImageError

logger = logging.getLogger(__name__)

# Initial LayerScale value for from-scratch training (the DINOv2/DINOv3 recipe); pretrained weights overwrite it.
LAYER_SCALE_INIT = 1e-5
INIT_STD = 0.02


def _activation(name: str):
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    return F.silu


def rope_2d(grid_h: int, grid_w: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin tables of DINOv3's 2-D RoPE for a grid_h x grid_w patch grid, each (grid_h*grid_w, head_dim).

    Patch centres are normalised to [-1, 1] per axis ((i + 0.5) / n * 2 - 1), so the table depends on the grid
    shape only, not on pixels. Each axis gets head_dim/4 frequencies 1/theta**(4k/head_dim); the angle is
    2*pi*coord*freq. The layout [y freqs, x freqs] is then repeated twice to pair with `rotate_half`.
    E.g. a 1x2 grid: x centres are -0.5 and +0.5, the y centre is 0, so only x-frequency channels rotate.
    """
    coords_h = torch.arange(0.5, grid_h, dtype=torch.float32, device=device) / grid_h  # (gh,)
    coords_w = torch.arange(0.5, grid_w, dtype=torch.float32, device=device) / grid_w  # (gw,)
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)  # (P, 2)
    coords = 2.0 * coords - 1.0
    exponents = torch.arange(head_dim // 4, dtype=torch.float32, device=device) * (4 / head_dim)
    inv_freq = 1.0 / theta**exponents  # (head_dim/4,)
    angles = 2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]  # (P, 2, head_dim/4)
    angles = angles.flatten(1, 2).tile(2)  # (P, head_dim)
    return torch.cos(angles), torch.sin(angles)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_to_patches(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the last P = cos.shape[0] tokens of x (B, n_heads, T, head_dim); the T - P prefix tokens are untouched."""
    n_prefix = x.shape[-2] - cos.shape[0]
    prefix, patches = x[..., :n_prefix, :], x[..., n_prefix:, :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    patches = patches * cos + _rotate_half(patches) * sin  # (B, n_heads, P, head_dim)
    return torch.cat((prefix, patches), dim=-2)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with optional RoPE on the patch tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=cfg.qkv_bias[0])
        self.k_proj = nn.Linear(d, d, bias=cfg.qkv_bias[1])
        self.v_proj = nn.Linear(d, d, bias=cfg.qkv_bias[2])
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        if rope is not None:
            q, k = apply_rope_to_patches(q, *rope), apply_rope_to_patches(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # (B, n_heads, T, head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    """fc2(act(fc1(x))), or the gated form down(act(gate(x)) * up(x)) when cfg.gated_mlp (SwiGLU with silu)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, h, bias = cfg.hidden_dim, cfg.intermediate_dim, cfg.mlp_bias
        self.gated = cfg.gated_mlp
        self.act = _activation(cfg.act)
        if self.gated:
            self.gate_proj = nn.Linear(d, h, bias=bias)
        self.up_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, T, D)
        return self.down_proj(self.act(self.up_proj(x)))  # (B, T, D)


class Block(nn.Module):
    """Pre-LN transformer block; with LayerScale each residual branch is scaled per channel before it is added."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        if cfg.layer_scale:
            self.scale1 = nn.Parameter(torch.full((d,), LAYER_SCALE_INIT))
            self.scale2 = nn.Parameter(torch.full((d,), LAYER_SCALE_INIT))
        else:
            self.scale1 = self.scale2 = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        h = self.attn(self.norm1(x), rope)  # (B, T, D)
        x = x + (h * self.scale1 if self.scale1 is not None else h)
        h = self.mlp(self.norm2(x))  # (B, T, D)
        return x + (h * self.scale2 if self.scale2 is not None else h)


class VisionEncoder(nn.Module):
    """Patch embedding -> [CLS, registers] + patches -> blocks -> final LayerNorm.

    Learned positions (`rope_theta is None`) cover the `image_size // patch_size` square grid and are bicubically
    resized to other input grids (HF's `interpolate_pos_encoding=True`). For DINOv2 the CLS position is folded into
    `cls_token` when weights are converted (the CLS position is never resized, so the sum is exact).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        d = cfg.hidden_dim
        self.patch_embed = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.use_cls else None
        self.registers = nn.Parameter(torch.zeros(1, cfg.n_registers, d)) if cfg.n_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, d)) if cfg.rope_theta is None else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.apply(self._init_module)
        for p in (self.cls_token, self.registers, self.pos_embed):
            if p is not None:
                nn.init.normal_(p, std=INIT_STD)

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(gh, gw) patches for an image of height x width pixels; both must be multiples of the patch size."""
        p = self.cfg.patch_size
        if height % p or width % p or height <= 0 or width <= 0:
            raise ImageError(f"image size {height}x{width} is not a positive multiple of the vision patch size {p}; "
                             f"resize it to e.g. {max(p, height // p * p)}x{max(p, width // p * p)}")
        return height // p, width // p

    def _positions(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        """Learned patch positions for a grid_h x grid_w grid, (1, grid_h*grid_w, D); resized in float32 if needed."""
        g = self.cfg.grid_size
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed.to(dtype)
        d = self.cfg.hidden_dim
        pos = self.pos_embed.float().reshape(1, g, g, d).permute(0, 3, 1, 2)  # (1, D, g, g)
        pos = F.interpolate(pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)  # (1, D, gh, gw)
        return pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, d).to(dtype)  # (1, gh*gw, D)

    def forward_features(self, pixel_values: Tensor) -> Tensor:
        """All tokens after the final norm, (N, prefix + gh*gw, D): equals HF's `last_hidden_state`."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ImageError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (N, 3, H, W)")
        grid_h, grid_w = self.grid(pixel_values.shape[2], pixel_values.shape[3])
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (N, gh*gw, D)
        if self.pos_embed is not None:
            x = x + self._positions(grid_h, grid_w, x.dtype)
        prefix = [t for t in (self.cls_token, self.registers) if t is not None]
        if prefix:
            x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)  # (N, prefix + gh*gw, D)
        rope = None
        if self.cfg.rope_theta is not None:
            rope = rope_2d(grid_h, grid_w, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.norm(x)  # (N, prefix + gh*gw, D)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Patch tokens only, (N, gh*gw, D), row-major over the grid; CLS and registers are dropped."""
        return self.forward_features(pixel_values)[:, self.cfg.n_prefix_tokens:]
