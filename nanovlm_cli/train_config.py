"""`TrainConfig`: everything about a training run that does not change what the model computes.

Each field is declared once, with its one description (`option`): the help of its `nanovlm train` flag, the group
it belongs to (the help panel it is listed under), and the bounds the flag checks. The command line, its help, the
man page and the shell completions are all built from these (`cli/config_options.py`), so adding a training flag
is adding one field here; its flag is `--field-name` (`--x/--no-x` for a boolean) unless `flag=` says otherwise,
and a new group is one more title in `GROUPS`. Then `python scripts/gen_docs.py` regenerates the man page and
the completions (a test fails until it has).

The fields are declared by group, in the order the help lists them, and the config stays flat (`cfg.lr_mp`): config
files and saved `run_config.json` files are tables of these field names. Kept apart from the model configs
(`config.py`, which re-exports it) so that each reads in one sitting. No torch import.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

from nanovlm_cli.config_base import DEVICE_NAMES, _Config, _require, is_device_name

# The groups of a run's options, as titled in `nanovlm train --help` (the model choice, --preset and the backbone
# swaps, belongs to the command: those are not training fields).
DATA = "Data"
OPTIMISATION = "Optimisation"
MEMORY = "Freezing and memory"
LORA = "LoRA adapters"
LOGGING = "Checkpoints, evaluation and logging"
RUN = "Run"
GROUPS = (DATA, OPTIMISATION, MEMORY, LORA, LOGGING, RUN)


def option(default: Any = MISSING, *, help: str, group: str, min: float | None = None, max: float | None = None,
           metavar: str | None = None, path: bool = False, flag: str | None = None) -> Any:
    """A field described once: `help` (one or two sentences, shown by --help and the man page), its `group`, the
    `min`/`max` its flag accepts, a `metavar`, `path` (the flag completes file names; the field holds a str), and
    `flag` when the flag is not `--field-name`."""
    if group not in GROUPS:
        raise ValueError(f"option group {group!r} is not one of {', '.join(GROUPS)}")
    metadata = {"help": help, "group": group, "min": min, "max": max, "metavar": metavar, "path": path, "flag": flag}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Everything about a training run that does not change what the model computes."""

    _label = "train"

    # --- data ----------------------------------------------------------------------------------------------------
    dataset: str = option("shapes", group=DATA, help="shapes (built in), a Hub dataset id, a save_to_disk directory, "
                                                     "parquet/jsonl files or a LLaVA JSON file.")
    dataset_config: str | None = option(None, group=DATA, help="Comma-separated subsets of a Hub dataset.")
    split: str = option("train", group=DATA, help="Dataset split to train on.")
    stream: bool = option(False, group=DATA, help="Stream the dataset instead of downloading it first.")
    image_root: str | None = option(None, group=DATA, metavar="DIR", path=True,
                                    help="Directory that relative image paths are resolved against.")
    min_rating: int | None = option(None, group=DATA,
                                    help="Drop samples rated below this (datasets with quality ratings).")
    dataset_size: int = option(20000, group=DATA, min=1, help="Samples of the built-in shapes dataset.")
    shapes_turns: int = option(1, group=DATA, min=1, help="Questions per image in shapes training conversations.")
    shapes_multiple_choice: float = option(0.5, group=DATA, min=0.0, max=1.0,
                                           help="Fraction of shapes training questions asked as multiple choice.")
    max_seq_len: int = option(1024, group=DATA, min=1, help="Tokens per packed row.")
    max_images_per_row: int = option(16, group=DATA, min=1, help="Images allowed in one packed row.")
    packing: bool = option(True, group=DATA, help="Pack several samples per row (block-causal attention).")
    # 1 keeps each batch's samples together
    pack_buffer: int = option(4, group=DATA, min=1, help="Batches whose samples are packed together.")
    num_workers: int = option(0, group=DATA, min=0, help="DataLoader workers.")

    # --- optimisation --------------------------------------------------------------------------------------------
    batch_size: int = option(8, group=OPTIMISATION, min=1, help="Rows per micro-batch.")
    gradient_accumulation_steps: int = option(1, group=OPTIMISATION, min=1, help="Micro-batches per optimizer step.")
    max_steps: int = option(1000, group=OPTIMISATION, min=1, help="Optimizer steps to train for.")
    lr_mp: float = option(2e-3, group=OPTIMISATION, min=0.0, help="Learning rate of the projector.")
    lr_vision: float = option(5e-5, group=OPTIMISATION, min=0.0, help="Learning rate of the vision encoder.")
    lr_language: float = option(5e-5, group=OPTIMISATION, min=0.0, help="Learning rate of the language model.")
    # muon: torch.optim.Muon at lr_muon on the 2-D weight matrices of the hidden layers
    optimizer: Literal["adamw", "muon"] = option("adamw", group=OPTIMISATION,
                                                 help="adamw, or muon (Muon on the hidden weight matrices, AdamW on "
                                                      "the rest).")
    lr_muon: float = option(0.02, group=OPTIMISATION, min=0.0,
                            help="Learning rate of the Muon-trained matrices (--optimizer muon).")
    weight_decay: float = option(0.0, group=OPTIMISATION, min=0.0, help="AdamW weight decay.")
    warmup_ratio: float = option(0.03, group=OPTIMISATION, help="Fraction of steps of linear warm-up.")
    min_lr_ratio: float = option(0.0, group=OPTIMISATION,
                                 help="Final learning rate as a fraction of the peak (cosine).")
    max_grad_norm: float = option(1.0, group=OPTIMISATION, help="Gradient clipping norm.")
    max_nonfinite_steps: int = option(5, group=OPTIMISATION,
                                      help="Stop after this many consecutive non-finite losses.")

    # --- freezing and memory -------------------------------------------------------------------------------------
    compile: bool = option(False, group=MEMORY, help="torch.compile the model (CUDA; slower start).")
    gradient_checkpointing: bool = option(False, group=MEMORY, help="Recompute activations in the backward pass: "
                                                                    "less memory, about 30% more compute.")
    freeze_vision_encoder: bool = option(False, group=MEMORY, help="Do not train the vision encoder.")
    freeze_projector: bool = option(False, group=MEMORY, help="Do not train the projector.")
    freeze_language_model: bool = option(False, group=MEMORY, help="Do not train the language model.")

    # --- LoRA adapters (models/lora.py) ---------------------------------------------------------------------------
    lora_r: int = option(0, group=LORA, min=0, help="Rank of LoRA adapters (e.g. 16); the base weights are frozen. "
                                                    "0: no adapters, the parts not frozen train fully.")
    lora_alpha: float = option(32.0, group=LORA, min=0.0, help="LoRA scale: the update is (alpha / r) * B @ A.")
    lora_dropout: float = option(0.0, group=LORA, min=0.0, max=0.99, help="Dropout on the adapters' input.")
    lora_targets: str = option("language", group=LORA, metavar="PATTERNS",
                               help="Comma-separated glob patterns over module names (e.g. "
                                    "'language.blocks.*.attn.*_proj'), or language, vision, projector.")
    lora_train_projector: bool = option(True, group=LORA,
                                        help="Train the projector fully alongside the adapters.")

    # --- checkpoints, evaluation and logging ---------------------------------------------------------------------
    output_dir: str = option("runs", group=LOGGING, metavar="DIR", path=True,
                             help="Where runs and checkpoints are written.")
    run_name: str | None = option(None, group=LOGGING, help="Name of the run (default: generated).")
    save_checkpoint_steps: int = option(500, group=LOGGING, min=1, help="Save a checkpoint every N steps.")
    keep_last_checkpoints: int = option(2, group=LOGGING, min=1, help="Checkpoints kept on disk (older ones deleted).")
    validation_steps: int = option(250, group=LOGGING, min=1, help="Compute the validation loss every N steps.")
    validation_batches: int = option(8, group=LOGGING, help="Batches per validation.")
    # the dataset's own end-of-run evaluation (shapes: MMStar-style questions), when it has one
    eval_interval: int = option(0, group=LOGGING, help="Run the benchmark every N steps (0: at the end only).")
    eval_size: int = option(200, group=LOGGING, help="Samples per benchmark run.")
    console_log_interval: int = option(20, group=LOGGING, min=1, help="Log to the console every N steps.")
    report_to: Literal["none", "wandb", "tensorboard"] = option("none", group=LOGGING,
                                                                help="Experiment tracker: none, wandb or tensorboard.")
    wandb_project: str | None = option(None, group=LOGGING, help="wandb project.")
    wandb_entity: str | None = option(None, group=LOGGING, help="wandb entity (default: your own).")
    hf_repo_name: str | None = option(None, group=LOGGING,
                                      help="Push the final model to this Hub repo; 'None' disables.")

    # --- run -----------------------------------------------------------------------------------------------------
    resume: str | None = option(None, group=RUN, metavar="DIR", path=True,
                                help="Resume from a checkpoint directory: weights, optimizer, schedule, step, RNG "
                                     "and data position.")
    device: str = option("auto", group=RUN, help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
    strategy: Literal["ddp", "fsdp"] = option("ddp", group=RUN,
                                              help="Under torchrun: ddp (a full copy per process) or fsdp "
                                                   "(parameters, gradients and optimizer state sharded).")
    seed: int = option(0, group=RUN, help="Random seed.")
    max_threads: int | None = option(None, group=RUN, min=1, help="CPU threads torch may use.")

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
        _require(self.strategy in ("ddp", "fsdp"), f"train.strategy={self.strategy!r} is not one of ddp, fsdp")
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
        self._check_lora()

    def _check_lora(self) -> None:
        _require(self.lora_r >= 0, f"train.lora_r={self.lora_r} must be >= 0 (0: no adapters)")
        if not self.lora_r:
            return
        _require(self.lora_alpha > 0 and math.isfinite(self.lora_alpha),
                 f"train.lora_alpha={self.lora_alpha} must be a positive number")
        _require(0 <= self.lora_dropout < 1, f"train.lora_dropout={self.lora_dropout} must be in [0, 1)")
        _require(any(t.strip() for t in self.lora_targets.split(",")),
                 f"train.lora_targets={self.lora_targets!r} names no module; use e.g. language,vision")
        frozen = [f for f in ("freeze_vision_encoder", "freeze_projector", "freeze_language_model") if getattr(self, f)]
        _require(not frozen, f"train.{frozen[0] if frozen else ''} does not combine with LoRA (lora_r="
                             f"{self.lora_r}), which freezes every base weight itself; choose what trains with "
                             "--lora-targets and --lora-train-projector/--no-lora-train-projector")
