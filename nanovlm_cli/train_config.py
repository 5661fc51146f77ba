"""`TrainConfig`: everything about a training run that does not change what the model computes.

Kept apart from the model configs (`config.py`, which re-exports it) so that each reads in one sitting.
No torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from nanovlm_cli.config_base import DEVICE_NAMES, _Config, _require, is_device_name


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Everything about a training run that does not change what the model computes."""

    _label = "train"

    dataset: str = "shapes"  # "shapes", a Hub id, a save_to_disk dir, parquet/jsonl files or LLaVA JSON
    dataset_config: str | None = None  # comma-separated subsets of a Hub dataset
    split: str = "train"
    stream: bool = False
    image_root: str | None = None
    min_rating: int | None = None
    dataset_size: int = 20000  # samples of the built-in shapes dataset
    shapes_turns: int = 1  # questions per image in shapes training conversations
    shapes_multiple_choice: float = 0.5  # fraction of shapes training questions in multiple-choice form
    output_dir: str = "runs"
    run_name: str | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    max_seq_len: int = 1024
    max_images_per_row: int = 16
    packing: bool = True  # knapsack-pack several samples per row (off: one sample per row)
    pack_buffer: int = 4  # batches whose samples are packed together (1 keeps each batch's samples together)
    lr_mp: float = 2e-3
    lr_vision: float = 5e-5
    lr_language: float = 5e-5
    # "muon": torch.optim.Muon at lr_muon on the 2-D weight matrices of the hidden layers, AdamW on the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr_muon: float = 0.02
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    compile: bool = False
    gradient_checkpointing: bool = False
    freeze_vision_encoder: bool = False
    freeze_projector: bool = False
    freeze_language_model: bool = False
    save_checkpoint_steps: int = 500
    keep_last_checkpoints: int = 2
    validation_steps: int = 250
    validation_batches: int = 8
    eval_interval: int = 0  # run the shapes/MMStar-style eval every N steps (0: only at the end if supported)
    eval_size: int = 200
    console_log_interval: int = 20
    resume: str | None = None
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    wandb_project: str | None = None
    wandb_entity: str | None = None
    hf_repo_name: str | None = None
    num_workers: int = 0
    max_threads: int | None = None
    device: str = "auto"
    seed: int = 0
    max_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "max_seq_len",
                     "save_checkpoint_steps", "validation_steps", "console_log_interval", "max_images_per_row",
                     "pack_buffer", "shapes_turns"):
            _require(getattr(self, name) > 0, f"train.{name}={getattr(self, name)} must be positive")
        for name in ("lr_mp", "lr_vision", "lr_language", "lr_muon", "weight_decay"):
            _require(getattr(self, name) >= 0 and math.isfinite(getattr(self, name)),
                     f"train.{name}={getattr(self, name)} must be a finite number >= 0")
        _require(0 <= self.warmup_ratio < 1, f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        _require(0 <= self.shapes_multiple_choice <= 1,
                 f"train.shapes_multiple_choice={self.shapes_multiple_choice} must be a fraction in [0, 1]")
        _require(self.num_workers >= 0, f"train.num_workers={self.num_workers} must be >= 0")
        _require(self.optimizer in ("adamw", "muon"), f"train.optimizer={self.optimizer!r} is not one of adamw, muon")
        _require(self.report_to in ("none", "wandb", "tensorboard"),
                 f"train.report_to={self.report_to!r} is not one of none, wandb, tensorboard")
        _require(self.keep_last_checkpoints >= 1, "train.keep_last_checkpoints must be >= 1")
        _require(is_device_name(self.device), f"train.device={self.device!r} is not a device; use {DEVICE_NAMES}")
        if self.run_name:  # the run directory is output_dir/run_name and must stay inside output_dir
            _require(self.run_name.strip() not in (".", "..")
                     and not any(sep in self.run_name for sep in "/\\"),
                     f"train.run_name={self.run_name!r} is not a plain name (a path separator, '.' or '..' would put "
                     "the run outside the output directory); use a name like 'my-run' and --output-dir for the place")
        _require(not (self.freeze_vision_encoder and self.freeze_projector and self.freeze_language_model),
                 "every part of the model is frozen; unfreeze at least one of vision, projector, language")
