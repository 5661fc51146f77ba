"""The data side of a training run: the sharded loader, a fixed set of held-out validation batches, and the
dataset's end-of-run evaluation, all built from the run's dataset object (`training.datasets`).

The validation batches come from a split that never shares samples with training; which split that is (if any)
is the dataset's own answer, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.data.loader import TrainLoader, validation_batches
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.sample import Batch
from nanovlm_cli.data.skips import SkipCounter
from nanovlm_cli.data.tokenizer import resolve_pad_id
from nanovlm_cli.distributed import DistInfo
from nanovlm_cli.training.datasets import FinalEval, TrainingDataset, training_dataset


@dataclass
class TrainingData:
    loader: TrainLoader
    validation: list[Batch]
    skips: SkipCounter
    processor: Processor
    final_eval: FinalEval | None = None


def build_training_data(model_cfg: VLMConfig, cfg: TrainConfig, tokenizer: Any, info: DistInfo,
                        dataset: TrainingDataset | None = None) -> TrainingData:
    """This rank's loader and validation share for `dataset` (by default the one `cfg.dataset` names)."""
    dataset = dataset if dataset is not None else training_dataset(cfg)
    skips = SkipCounter()
    processor = Processor(model_cfg, tokenizer)
    pad_id = resolve_pad_id(tokenizer)
    loader = TrainLoader(
        dataset.train_source(skips), processor.encode, batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
        max_images_per_row=cfg.max_images_per_row, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
        skips=skips, pack_buffer=cfg.pack_buffer, num_workers=cfg.num_workers, pad_token_id=pad_id,
        packing=cfg.packing, name=dataset.name,
    )
    validation: list[Batch] = []
    val_source = dataset.validation_source(SkipCounter())
    if val_source is not None:
        validation = validation_batches(val_source, processor.encode, n_batches=cfg.validation_batches,
                                        batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
                                        max_images_per_row=cfg.max_images_per_row, pad_token_id=pad_id)
        if info.enabled:  # each rank validates its own share; the loss is all-reduced
            validation = validation[info.rank::info.world_size]
    return TrainingData(loader, validation, skips, processor, dataset.final_eval(processor))
