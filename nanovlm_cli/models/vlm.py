"""The vision-language model: vision encoder -> projector -> image tokens spliced into the decoder's embeddings.

Images arrive as a flat list of views (tiles, global views, whole images) in the order their image-token runs appear
in `input_ids` (see `data/sample.py`). Views of equal shape are encoded together; the projected tokens are written,
in order, into the positions where `input_ids == image_token_id`. So a batch can mix rows with several images, rows
with none, and views of different sizes (DINOv3 dynamic grids).

Worked example: input_ids = [t, I, I, t, I, I] (I = image token) with two views A and B of 2 tokens each gives
embeddings [e(t), A0, A1, e(t), B0, B1].

The loss never materialises full-vocabulary logits for every position: it gathers the hidden states of supervised
positions only and computes cross-entropy over them in chunks (each chunk recomputed in backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanovlm_cli.config import VLMConfig
from nanovlm_cli.errors import ConfigError, DataError
from nanovlm_cli.models.language import LanguageModel
from nanovlm_cli.models.projector import ModalityProjector
from nanovlm_cli.models.vision import VisionEncoder

if TYPE_CHECKING:
    from nanovlm_cli.data.sample import Batch
    from nanovlm_cli.models.kv_cache import KVCache

LOSS_CHUNK_TOKENS = 256  # logit rows live at once: 256 x 49k vocab = 50 MB in fp32


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed cross-entropy over supervised tokens (scalar, fp32)
    n_tokens: int  # supervised tokens in the batch

    @property
    def loss(self) -> torch.Tensor:
        return self.loss_sum / max(self.n_tokens, 1)


def _ce_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # (n, V)
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """Summed cross-entropy of (N, D) hidden states against (N,) targets, at most `chunk_tokens` logit rows live."""
    total = hidden.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled() and hidden.shape[0] > chunk_tokens
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if recompute:
            total = total + checkpoint(_ce_chunk, h, weight, t, use_reentrant=False)
        else:
            total = total + _ce_chunk(h, weight, t)
    return total


def loss_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (B, L-1), keep mask (B, L-1)): position t predicts label t+1, only inside one packed sample."""
    targets = batch.labels[:, 1:]
    same_sample = batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1]
    return targets, (targets != -100) & same_sample


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode without autograd for the block, then back in the mode it had (training calls evaluation
    and validation mid-run, so the mode it finds must be the mode it leaves)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def compile_blocks(model: VisionLanguageModel, device: torch.device) -> None:
    """`torch.compile` every transformer block (regional compilation): identical blocks share one compiled graph,
    so compile time does not grow with depth, and the eager parts around them (mask building, image splicing,
    the chunked loss) keep their data-dependent shapes without graph breaks inside a compiled region.

    On CUDA packed rows then run FlexAttention with block-sparse masks; elsewhere (no FlexAttention backward on
    the CPU) one dense masked SDPA call per layer, since per-chunk calls would recompile for every batch.
    """
    for block in (*model.vision.blocks, *model.language.blocks):
        block.compile()
    model.language.chunk_attention = False
    if device.type == "cuda":
        model.language.attention = "flex"


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        if cfg.image_token_id is None:
            raise ConfigError("VLMConfig.image_token_id is not set; build the config with the tokenizer "
                              "(nanovlm_cli.checkpoint.build_model) or load a checkpoint")
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.projector = ModalityProjector(cfg.projector, cfg.vision.hidden_dim, cfg.language.hidden_dim)
        self.language = LanguageModel(cfg.language)

    @property
    def image_token_id(self) -> int:
        return int(self.cfg.image_token_id)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return self.projector.proj.weight.device

    # --- images -> embeddings ---

    def encode_images(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Projected tokens of every view, concatenated in order: (sum of tokens per view, D_language)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, view in enumerate(views):
            groups.setdefault((int(view.shape[-2]), int(view.shape[-1])), []).append(i)
        outputs: list[torch.Tensor | None] = [None] * len(views)
        dtype = self.projector.proj.weight.dtype
        for (height, width), indices in groups.items():
            pixels = torch.stack([views[i] for i in indices]).to(self.device, dtype)  # (n, 3, H, W)
            grid_h, grid_w = self.vision.grid(height, width)
            features = self.vision(pixels)  # (n, grid_h * grid_w, D_vision)
            tokens = self.projector(features, grid_h, grid_w)  # (n, tokens, D_language)
            if len(groups) == 1:  # one shape (fixed size, tiles): views are already in order
                return tokens.flatten(0, 1)  # (n * tokens, D_language)
            # unbind, not tokens[j]: its backward is one stack, where n selects would each zero a full-size grad.
            for i, view_tokens in zip(indices, tokens.unbind(0)):
                outputs[i] = view_tokens
        return torch.cat(outputs, dim=0)  # type: ignore[arg-type]

    def embed(self, input_ids: torch.Tensor, images: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Token embeddings with image tokens replaced by projected image features: (B, T, D)."""
        embeds = self.language.embed(input_ids)
        mask = input_ids == self.image_token_id  # (B, T)
        n_slots = int(mask.sum())
        if not images:
            if n_slots:
                raise DataError(f"input has {n_slots} image-token positions but no images were given")
            return embeds
        features = self.encode_images(images)
        if features.shape[0] != n_slots:
            raise DataError(
                f"{len(images)} image view(s) give {features.shape[0]} image tokens but the text has {n_slots} "
                "image-token positions; encode prompts with the model's own processor"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))

    # --- forward passes ---

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Sequence[torch.Tensor] = (),
        *,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, D). Positions default to 0..T-1 after what the cache already holds."""
        if position_ids is None:
            start = kv_cache.pos if kv_cache is not None else 0
            position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.unsqueeze(0).expand(input_ids.shape[0], -1)
        embeds = self.embed(input_ids, images)
        return self.language(embeds, position_ids, segment_ids=segment_ids, kv_cache=kv_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language.logits(hidden)

    def loss(self, batch: Batch) -> LossOutput:
        """Summed next-token cross-entropy over supervised tokens of a packed batch.

        Position t predicts label t+1, and only inside one sample: a target whose segment differs from the
        predicting position's (the first token of the next packed sample) is never a target.
        """
        hidden = self(batch.input_ids, batch.images, position_ids=batch.position_ids, segment_ids=batch.segment_ids)
        targets, keep = loss_targets(batch)  # (B, L-1) each
        selected = hidden[:, :-1][keep]  # (N, D)
        n_tokens = int(keep.sum())
        if n_tokens == 0:
            return LossOutput(hidden.sum() * 0.0, 0)
        loss_sum = chunked_cross_entropy(selected, self.language.output_weight, targets[keep])
        return LossOutput(loss_sum, n_tokens)

    # --- the API users of the original repository know ---
    # The package's one deliberate upward import (DESIGN.md: imports point downward only): checkpoint/, generation
    # and hub import this module, so these convenience methods import them on use, inside the method.

    @classmethod
    def from_pretrained(cls, source: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> VisionLanguageModel:
        """Load a nanovlm or upstream-nanoVLM checkpoint from a Hub id or a local directory."""
        from nanovlm_cli.checkpoint.io import load_model

        return load_model(source, device=device, dtype=dtype).model

    def save_pretrained(self, directory: str | Path, *, tokenizer=None) -> Path:
        """Write a self-contained checkpoint (config.json, model.safetensors, tokenizer, README.md) atomically."""
        from nanovlm_cli.checkpoint.io import save_model

        if tokenizer is None:  # keep the checkpoint self-contained: save the tokenizer the config names
            from nanovlm_cli.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.cfg)
        return save_model(self, directory, tokenizer=tokenizer)

    def generate(self, image_or_images, prompt: str, *, tokenizer=None, **sampling) -> str:
        """Answer `prompt` about one image or a list of them (PIL images, paths or bytes; None for text only).

        `sampling` are `nanovlm_cli.generation.SamplingConfig` fields (max_new_tokens, temperature, top_k, top_p,
        greedy, seed, stop_strings). Without `tokenizer`, the one the config names is loaded.
        """
        from nanovlm_cli.generation import generate_text, processor_for

        if image_or_images is None:
            images = []
        elif isinstance(image_or_images, (list, tuple)):
            images = list(image_or_images)
        else:
            images = [image_or_images]
        return generate_text(self, processor_for(self, tokenizer), images, prompt, **sampling)

    def push_to_hub(self, repo_id: str, *, private: bool = False, tokenizer=None) -> str:
        """Save to a temporary directory and upload it to the Hub with a generated model card."""
        import tempfile

        from nanovlm_cli.hub import push_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            directory = self.save_pretrained(Path(tmp) / "checkpoint", tokenizer=tokenizer)
            return push_checkpoint(directory, repo_id, private=private).url or ""
