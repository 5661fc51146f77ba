"""The two data contracts between the pipeline and the model: one encoded `Sample`, one collated `Batch`.

Images travel as a flat list of `(3, h, w)` tensors ("views": tiles, global views or whole images), in the order
their image-token runs appear in the token sequence. View k fills the next `(h / patch / f) * (w / patch / f)`
image-token positions, where f is the pixel-shuffle factor. Views of different sizes (DINOv3's dynamic grids)
are fine: the model groups equal shapes when it encodes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# An image before decoding: a path, raw bytes, a PIL image, or a dict {"bytes": ..., "path": ...} as `datasets` stores it.
ImageSource = str | bytes | Any


@dataclass
class Record:
    """One conversation as every dataset adapter yields it, before tokenisation.

    `messages` follow the Hugging Face chat format: {"role": "system" | "user" | "assistant", "content": str | parts},
    where parts is a list of {"type": "text", "text": str} and {"type": "image"}. The k-th {"type": "image"} part
    is `images[k]`. Only these parts create image slots: an image-token string typed in text stays text.
    """

    messages: list[dict[str, Any]]
    images: list[ImageSource] = field(default_factory=list)
    source_index: int = -1
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"category": ..., "answer": ...} for evaluation


@dataclass
class Sample:
    """One conversation, tokenised. `labels` is -100 wherever the token is not supervised."""

    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long
    images: list[torch.Tensor] = field(default_factory=list)  # views, each (3, h, w)
    source_index: int = -1  # index of the row in its dataset, for ledgers and resume checks

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_supervised(self) -> int:
        return int((self.labels != -100).sum())


@dataclass
class Batch:
    """Rows of packed samples.

    `segment_ids` numbers the samples inside a row from 1; 0 marks padding. Attention never crosses segments and
    `position_ids` restart at 0 for every segment (block-diagonal causal attention).
    """

    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, -100 where unsupervised or padding
    position_ids: torch.Tensor  # (B, L) long
    segment_ids: torch.Tensor  # (B, L) long, 0 = padding
    images: list[torch.Tensor] = field(default_factory=list)  # views of all rows, row-major order
    n_samples: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.segment_ids),
                     [move(v) for v in self.images], self.n_samples)

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int((self.segment_ids != 0).sum())
