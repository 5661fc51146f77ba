"""The modality projector: pixel shuffle (space-to-depth) then one linear layer into the LM's hidden size.

Pixel shuffle trades sequence length for width: every f x f block of patch features becomes one token with f*f
times the channels, so a 32x32 SigLIP grid with f=4 costs the decoder 64 tokens instead of 1024. It works on
rectangular grids (DINOv3's dynamic resolutions) as long as f divides both sides.

Worked example, f=2, a 2x4 grid of 1-channel patches numbered in row-major order:

    0 1 2 3        token 0 = [0, 1, 4, 5]   (the top-left 2x2 block, channels ordered (row, col, C))
    4 5 6 7   ->   token 1 = [2, 3, 6, 7]

The (row-in-block, col-in-block, channel) ordering matches upstream nanoVLM, so its `MP.proj.weight` loads as is.
"""

from __future__ import annotations

import torch
from torch import nn

from nanovlm_cli.config import ProjectorConfig
from nanovlm_cli.errors import ConfigError


def pixel_shuffle(x: torch.Tensor, grid_h: int, grid_w: int, factor: int) -> torch.Tensor:
    """(N, grid_h * grid_w, C) -> (N, grid_h/f * grid_w/f, C * f * f)."""
    n, seq, c = x.shape
    if seq != grid_h * grid_w:
        raise ConfigError(f"pixel shuffle got {seq} patch tokens for a {grid_h}x{grid_w} grid")
    if grid_h % factor or grid_w % factor:
        raise ConfigError(
            f"pixel_shuffle_factor={factor} does not divide the {grid_h}x{grid_w} patch grid; "
            "resize images so both sides are multiples of patch_size * pixel_shuffle_factor"
        )
    h, w = grid_h // factor, grid_w // factor
    x = x.view(n, h, factor, w, factor, c)  # (N, h, f, w, f, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, h, w, f, f, C)
    return x.reshape(n, h * w, factor * factor * c)


class ModalityProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.factor = cfg.pixel_shuffle_factor
        self.proj = nn.Linear(in_dim * self.factor**2, out_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(N, grid_h * grid_w, D_vision) -> (N, tokens, D_language)."""
        return self.proj(pixel_shuffle(x, grid_h, grid_w, self.factor))
