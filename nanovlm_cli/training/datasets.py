"""What a training run asks of its dataset: a training split, a held-out validation split, and (when the dataset has
one) an end-of-run evaluation.

Each dataset answers for itself, so the run never tests a dataset's name: the built-in shapes set
(`ShapesDataset`) has its own "val" split (disjoint images by construction) and scores multiple-choice, rank and
short-answer accuracy at the end; any other dataset `open_source` reads (`SourceDataset`: Hub ids, local files)
validates on its "validation" or "test" split when it has one, and otherwise the run reports no validation loss
rather than validating on training data. A new built-in dataset is one more entry in `BUILTIN_DATASETS`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from nanovlm_cli.config import TrainConfig
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.skips import SkipCounter
from nanovlm_cli.data.sources import RecordSource, open_source
from nanovlm_cli.errors import NanoVLMError
from nanovlm_cli.evaluation import evaluate_shapes, evaluate_shapes_open, evaluate_shapes_ranked

log = logging.getLogger(__name__)

__all__ = ["BUILTIN_DATASETS", "FinalEval", "ShapesDataset", "SourceDataset", "TrainingDataset", "training_dataset"]

# The end-of-run evaluation: (model, device) -> JSON-able results (also run every `eval_interval` steps).
FinalEval = Callable[[torch.nn.Module, torch.device], dict[str, Any]]


class TrainingDataset(ABC):
    """The splits (and evaluation) of the dataset a run trains on, opened with the run's `TrainConfig`."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.dataset

    def _open(self, split: str, skips: SkipCounter | None, size: int | None = None, **options: Any) -> RecordSource:
        cfg = self.cfg
        return open_source(cfg.dataset, config=cfg.dataset_config, split=split, stream=cfg.stream,
                           image_root=cfg.image_root, min_rating=cfg.min_rating, size=size, seed=cfg.seed,
                           skips=skips, **options)

    @abstractmethod
    def train_source(self, skips: SkipCounter) -> RecordSource:
        """The split the run trains on (`cfg.split`); unusable rows are counted in `skips`."""

    @abstractmethod
    def validation_source(self, skips: SkipCounter | None = None) -> RecordSource | None:
        """A held-out split that shares no sample with training, or None (then no validation loss is reported)."""

    def final_eval(self, processor: Processor) -> FinalEval | None:
        """The end-of-run evaluation, or None when this dataset has none (the default)."""
        return None


class SourceDataset(TrainingDataset):
    """Any dataset `open_source` reads: a Hub id, a save_to_disk directory, parquet, jsonl or LLaVA JSON files."""

    def train_source(self, skips: SkipCounter) -> RecordSource:
        return self._open(self.cfg.split, skips)

    def validation_source(self, skips: SkipCounter | None = None) -> RecordSource | None:
        for split in ("validation", "test"):
            try:
                return self._open(split, skips)
            except NanoVLMError:
                continue
        log.info("dataset %s has no validation or test split; validation loss is not reported", self.name)
        return None


class ShapesDataset(TrainingDataset):
    """The built-in shapes set: `dataset_size` training records, a "val" split of exactly the records validation
    uses, and the MMStar-format evaluation on its "eval" split (`eval_size` questions; 0 switches it off)."""

    def _open_shapes(self, split: str, skips: SkipCounter | None, size: int) -> RecordSource:
        return self._open(split, skips, size=size, shapes_turns=self.cfg.shapes_turns,
                          shapes_multiple_choice=self.cfg.shapes_multiple_choice)

    def train_source(self, skips: SkipCounter) -> RecordSource:
        return self._open_shapes(self.cfg.split, skips, self.cfg.dataset_size)

    def validation_source(self, skips: SkipCounter | None = None) -> RecordSource | None:
        return self._open_shapes("val", skips, self.cfg.validation_batches * self.cfg.batch_size)

    def final_eval(self, processor: Processor) -> FinalEval | None:
        if self.cfg.eval_size <= 0:
            return None
        n, seed = self.cfg.eval_size, self.cfg.seed

        def evaluate(model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
            """Multiple-choice accuracy (MMStar format, letter replies), the same questions rank-scored under
            "rank" and the short-answer accuracy under "open"."""
            model.eval()
            result = evaluate_shapes(model, processor, n=n, seed=seed, batch_size=32).to_dict()
            result["rank"] = evaluate_shapes_ranked(model, processor, n=n, seed=seed).to_dict()
            result["open"] = evaluate_shapes_open(model, processor, n=n, seed=seed).to_dict()
            return result

        return evaluate


# Built-in datasets by the name `--dataset` gives; any other name is opened as a Hub id or a path.
BUILTIN_DATASETS: dict[str, type[TrainingDataset]] = {"shapes": ShapesDataset}


def training_dataset(cfg: TrainConfig) -> TrainingDataset:
    """The dataset object for `cfg.dataset`."""
    return BUILTIN_DATASETS.get(cfg.dataset, SourceDataset)(cfg)
