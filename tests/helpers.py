"""Small builders shared by tests: tiny models, images and batches, all offline."""

from __future__ import annotations

import torch
from PIL import Image

from nanovlm_cli.checkpoint.io import LoadedModel, build_model
from nanovlm_cli.config import VLMConfig
from nanovlm_cli.data.sample import Batch
from nanovlm_cli.presets import get_preset


def tiny_config(**changes) -> VLMConfig:
    return get_preset("tiny").model.replace(**changes) if changes else get_preset("tiny").model


def tiny_model(seed: int = 0, cfg: VLMConfig | None = None) -> LoadedModel:
    torch.manual_seed(seed)
    return build_model(cfg or tiny_config(), load_backbones=False)


def solid_image(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def single_row_batch(input_ids: torch.Tensor, labels: torch.Tensor, images: list[torch.Tensor]) -> Batch:
    """One unpacked sample as a (1, T) batch."""
    t = input_ids.shape[0]
    return Batch(input_ids[None], labels[None], torch.arange(t)[None], torch.ones(1, t, dtype=torch.long),
                 list(images), 1)
