"""The data side of a training run: the sharded loader, a held-out validation set, and the end-of-run evaluation.

Validation comes from a split that never shares samples with training: the built-in shapes dataset has its own
"val" split (disjoint images by construction); Hub and local datasets use their "validation" or "test" split when
they have one, and otherwise the run reports no validation loss rather than validating on training data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.data.loader import TrainLoader, validation_batches
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.sample import Batch
from nanovlm_cli.data.sources import SkipCounter, open_source
from nanovlm_cli.distributed import DistInfo
from nanovlm_cli.errors import NanoVLMError

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    loader: TrainLoader
    validation: list[Batch]
    skips: SkipCounter
    processor: Processor
    final_eval: Callable[[torch.nn.Module, torch.device], dict[str, Any]] | None = None


def _open(cfg: TrainConfig, split: str, skips: SkipCounter, size: int | None = None):
    return open_source(cfg.dataset, config=cfg.dataset_config, split=split, stream=cfg.stream,
                       image_root=cfg.image_root, min_rating=cfg.min_rating, size=size, seed=cfg.seed, skips=skips,
                       shapes_turns=cfg.shapes_turns, shapes_multiple_choice=cfg.shapes_multiple_choice)


def _validation_source(cfg: TrainConfig, skips: SkipCounter):
    if cfg.dataset == "shapes":
        return _open(cfg, "val", skips, size=cfg.validation_batches * cfg.batch_size)
    for split in ("validation", "test"):
        try:
            return _open(cfg, split, skips)
        except NanoVLMError:
            continue
    log.info("dataset %s has no validation or test split; validation loss is not reported", cfg.dataset)
    return None


def build_training_data(model_cfg: VLMConfig, cfg: TrainConfig, tokenizer: Any, info: DistInfo) -> TrainingData:
    skips = SkipCounter()
    processor = Processor(model_cfg, tokenizer)
    size = cfg.dataset_size if cfg.dataset == "shapes" else None
    source = _open(cfg, cfg.split, skips, size=size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = TrainLoader(
        source, processor.encode, batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
        max_images_per_row=cfg.max_images_per_row, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
        skips=skips, pack_buffer=cfg.pack_buffer, num_workers=cfg.num_workers, pad_token_id=pad_id,
        packing=cfg.packing, name=cfg.dataset,
    )
    validation: list[Batch] = []
    val_source = _validation_source(cfg, SkipCounter())
    if val_source is not None:
        validation = validation_batches(val_source, processor.encode, n_batches=cfg.validation_batches,
                                        batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
                                        max_images_per_row=cfg.max_images_per_row, pad_token_id=pad_id)
        if info.enabled:  # each rank validates its own share; the loss is all-reduced
            validation = validation[info.rank::info.world_size]
    final_eval = None
    if cfg.dataset == "shapes" and cfg.eval_size > 0:
        def final_eval(model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
            """Multiple-choice accuracy (MMStar format, letter replies), the same questions rank-scored under "rank"
            and the short-answer accuracy under "open"."""
            from nanovlm_cli.evaluation import evaluate_shapes, evaluate_shapes_open, evaluate_shapes_ranked

            model.eval()
            result = evaluate_shapes(model, processor, n=cfg.eval_size, seed=cfg.seed, batch_size=32).to_dict()
            result["rank"] = evaluate_shapes_ranked(model, processor, n=cfg.eval_size, seed=cfg.seed).to_dict()
            result["open"] = evaluate_shapes_open(model, processor, n=cfg.eval_size, seed=cfg.seed).to_dict()
            return result
    return TrainingData(loader, validation, skips, processor, final_eval)
