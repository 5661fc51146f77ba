"""`nanovlm train`: resolve preset + config file + flags into validated configs, then train (or print them).

Every option defaults to None ("not given") so that only what the user typed overrides the config file and
the preset; the Python parameter names are the `TrainConfig` field names, which is how the flags are
collected into overrides. `--dry-run` works without torch: it prints the resolved configs and exits.
`--resume DIR` starts from the run's own saved configs instead of the preset. An interrupted run (Ctrl-C, SIGTERM)
saves its checkpoint and exits 128 + the signal number (130, 143), so `nanovlm train ... && nanovlm push ...` never
publishes a half-trained model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

from nanovlm_cli.cli.arguments import check_device, check_output_dir
from nanovlm_cli.cli.console import err, mapping_table, out, print_json
from nanovlm_cli.cli.dashboard import progress_callback
from nanovlm_cli.cli.options import (
    MEMORY_PANEL,
    CompileOpt,
    Dinov3ModelName,
    FreezeVisionOpt,
    GradientCheckpointingOpt,
    JsonOpt,
    LanguageModelName,
    PresetOpt,
    ReportTo,
    VisionEncoderName,
    as_str,
)
from nanovlm_cli.cli.progress import interrupted_exit_code, is_main_process, summary_lines
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.run_config import TRAIN_FIELDS, resolve_resume_config, resolve_run_config

log = logging.getLogger(__name__)

M, D, O, F, L, R, C = ("Model", "Data", "Optimisation", MEMORY_PANEL, "Checkpoints, evaluation and logging", "Run",
                       "Compatibility with the original nanoVLM flags")


def _check_device(value: str | None) -> str | None:
    """`--device banana` is a usage error (exit 2) before anything loads; a device this machine lacks is exit 1."""
    return None if value is None else check_device(value)


def _once(record: logging.LogRecord) -> bool:
    """A log filter: the progress view and the last line name each checkpoint, so the library's own "saved
    checkpoint to ..." line would report the same path twice."""
    return not record.getMessage().startswith("saved checkpoint to")


def _opt(*names: str, panel: str, help: str, **kwargs) -> typer.Option:
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


def train(
    ctx: typer.Context,
    preset: PresetOpt = "default",
    config: Annotated[Path | None, _opt("--config", metavar="FILE", panel=R,
                                        help="A .toml or .json file of training fields plus an optional "
                                             "model table; flags override it.")] = None,
    vision_encoder: Annotated[VisionEncoderName | None, _opt("--vision-encoder", panel=M,
                                                             help="Swap the preset's vision encoder.")] = None,
    dinov3_model: Annotated[Dinov3ModelName | None, _opt("--dinov3-model", panel=M,
                                                         help="DINOv3 size (implies --vision-encoder dinov3); "
                                                              "vitl14 is an alias of vitl16.")] = None,
    language_model: Annotated[LanguageModelName | None, _opt("--language-model", panel=M,
                                                             help="Swap the preset's language model.")] = None,
    dataset: Annotated[str | None, _opt("--dataset", panel=D,
                                        help="shapes (built in), a Hub dataset id, a save_to_disk directory, "
                                             "parquet/jsonl files or a LLaVA JSON file.")] = None,
    dataset_config: Annotated[str | None, _opt("--dataset-config", panel=D,
                                               help="Comma-separated subsets of a Hub dataset.")] = None,
    split: Annotated[str | None, _opt("--split", panel=D, help="Dataset split to train on.")] = None,
    stream: Annotated[bool | None, _opt("--stream/--no-stream", panel=D,
                                        help="Stream the dataset instead of downloading it first.")] = None,
    image_root: Annotated[Path | None, _opt("--image-root", metavar="DIR", panel=D,
                                            help="Directory that relative image paths are resolved against.")] = None,
    min_rating: Annotated[int | None, _opt("--min-rating", panel=D,
                                           help="Drop samples rated below this (datasets with quality ratings).")
                          ] = None,
    dataset_size: Annotated[int | None, _opt("--dataset-size", min=1, panel=D,
                                             help="Samples of the built-in shapes dataset.")] = None,
    shapes_turns: Annotated[int | None, _opt("--shapes-turns", min=1, panel=D,
                                             help="Questions per image in shapes training conversations.")] = None,
    shapes_multiple_choice: Annotated[float | None, _opt("--shapes-multiple-choice", min=0.0, max=1.0, panel=D,
                                                         help="Fraction of shapes training questions asked as "
                                                              "multiple choice.")] = None,
    max_seq_len: Annotated[int | None, _opt("--max-seq-len", min=1, panel=D,
                                            help="Tokens per packed row.")] = None,
    max_images_per_row: Annotated[int | None, _opt("--max-images-per-row", min=1, panel=D,
                                                   help="Images allowed in one packed row.")] = None,
    packing: Annotated[bool | None, _opt("--packing/--no-packing", panel=D,
                                         help="Pack several samples per row (block-causal attention).")] = None,
    pack_buffer: Annotated[int | None, _opt("--pack-buffer", min=1, panel=D,
                                            help="Batches whose samples are packed together.")] = None,
    num_workers: Annotated[int | None, _opt("--num-workers", min=0, panel=D, help="DataLoader workers.")] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", min=1, panel=O, help="Rows per micro-batch.")] = None,
    gradient_accumulation_steps: Annotated[int | None, _opt("--gradient-accumulation-steps", min=1, panel=O,
                                                            help="Micro-batches per optimizer step.")] = None,
    max_steps: Annotated[int | None, _opt("--max-steps", min=1, panel=O, help="Optimizer steps to train for.")] = None,
    lr_mp: Annotated[float | None, _opt("--lr-mp", min=0.0, panel=O, help="Learning rate of the projector.")] = None,
    lr_backbones: Annotated[float | None, _opt("--lr-backbones", min=0.0, panel=O,
                                               help="Learning rate of both backbones (--lr-vision and "
                                                    "--lr-language override it).")] = None,
    lr_vision: Annotated[float | None, _opt("--lr-vision", min=0.0, panel=O,
                                            help="Learning rate of the vision encoder.")] = None,
    lr_language: Annotated[float | None, _opt("--lr-language", min=0.0, panel=O,
                                              help="Learning rate of the language model.")] = None,
    optimizer: Annotated[Literal["adamw", "muon"] | None, _opt("--optimizer", panel=O,
                                                    help="adamw, or muon (Muon on the hidden weight matrices, "
                                                         "AdamW on the rest).")] = None,
    lr_muon: Annotated[float | None, _opt("--lr-muon", min=0.0, panel=O,
                                          help="Learning rate of the Muon-trained matrices (--optimizer muon).")
                       ] = None,
    weight_decay: Annotated[float | None, _opt("--weight-decay", min=0.0, panel=O, help="AdamW weight decay.")] = None,
    warmup_ratio: Annotated[float | None, _opt("--warmup-ratio", panel=O,
                                               help="Fraction of steps of linear warm-up.")] = None,
    min_lr_ratio: Annotated[float | None, _opt("--min-lr-ratio", panel=O,
                                               help="Final learning rate as a fraction of the peak (cosine).")
                            ] = None,
    max_grad_norm: Annotated[float | None, _opt("--max-grad-norm", panel=O, help="Gradient clipping norm.")] = None,
    max_nonfinite_steps: Annotated[int | None, _opt("--max-nonfinite-steps", panel=O,
                                                    help="Stop after this many consecutive non-finite losses.")
                                   ] = None,
    compile: CompileOpt = None,  # the TrainConfig field name (shadows the builtin inside this function only)
    gradient_checkpointing: GradientCheckpointingOpt = None,
    freeze_vision_encoder: FreezeVisionOpt = None,
    freeze_projector: Annotated[bool | None, _opt("--freeze-projector/--no-freeze-projector", panel=F,
                                                  help="Do not train the projector.")] = None,
    freeze_language_model: Annotated[bool | None, _opt("--freeze-language-model/--no-freeze-language-model",
                                                       panel=F, help="Do not train the language model.")] = None,
    output_dir: Annotated[Path | None, _opt("--output-dir", metavar="DIR", panel=L,
                                            help="Where runs and checkpoints are written.")] = None,
    run_name: Annotated[str | None, _opt("--run-name", panel=L, help="Name of the run (default: generated).")
                        ] = None,
    save_checkpoint_steps: Annotated[int | None, _opt("--save-checkpoint-steps", min=1, panel=L,
                                                      help="Save a checkpoint every N steps.")] = None,
    keep_last_checkpoints: Annotated[int | None, _opt("--keep-last-checkpoints", min=1, panel=L,
                                                      help="Checkpoints kept on disk (older ones deleted).")
                                     ] = None,
    validation_steps: Annotated[int | None, _opt("--validation-steps", min=1, panel=L,
                                                 help="Compute the validation loss every N steps.")] = None,
    validation_batches: Annotated[int | None, _opt("--validation-batches", panel=L,
                                                   help="Batches per validation.")] = None,
    eval_interval: Annotated[int | None, _opt("--eval-interval", panel=L,
                                              help="Run the benchmark every N steps (0: at the end only).")] = None,
    eval_size: Annotated[int | None, _opt("--eval-size", panel=L, help="Samples per benchmark run.")] = None,
    console_log_interval: Annotated[int | None, _opt("--console-log-interval", min=1, panel=L,
                                                     help="Log to the console every N steps.")] = None,
    dashboard: Annotated[bool, _opt("--dashboard/--no-dashboard", panel=L,
                                    help="Live dashboard on a terminal (else plain log lines every "
                                         "--console-log-interval steps).")
                         ] = True,
    report_to: Annotated[ReportTo | None, _opt("--report-to", panel=L,
                                               help="Experiment tracker: none, wandb or tensorboard.")] = None,
    wandb_project: Annotated[str | None, _opt("--wandb-project", panel=L, help="wandb project.")] = None,
    wandb_entity: Annotated[str | None, _opt("--wandb-entity", panel=L,
                                             help="wandb entity (default: your own).")] = None,
    hf_repo_name: Annotated[str | None, _opt("--hf-repo-name", panel=L,
                                             help="Push the final model to this Hub repo; 'None' disables.")] = None,
    resume: Annotated[Path | None, _opt("--resume", metavar="DIR", panel=R,
                                        help="Resume from a checkpoint directory: weights, optimizer, schedule, "
                                             "step, RNG and data position.")] = None,
    device: Annotated[str | None, _opt("--device", panel=R, callback=_check_device,
                                       help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")] = None,
    seed: Annotated[int | None, _opt("--seed", panel=R, help="Random seed.")] = None,
    max_threads: Annotated[int | None, _opt("--max-threads", min=1, panel=R,
                                            help="CPU threads torch may use.")] = None,
    dry_run: Annotated[bool, _opt("--dry-run", panel=R,
                                  help="Print the resolved configs and exit (no torch, no weights).")] = False,
    json_output: JsonOpt = False,
    resume_from_vlm_checkpoint: Annotated[bool, _opt("--resume-from-vlm-checkpoint", panel=C,
                                                     help="Resume from --vlm-checkpoint-path (same as --resume).")
                                          ] = False,
    vlm_checkpoint_path: Annotated[Path | None, _opt("--vlm-checkpoint-path", metavar="DIR", panel=C,
                                                     help="Checkpoint to resume from.")] = None,
    no_log_wandb: Annotated[bool, _opt("--no-log-wandb", panel=C, help="Same as --report-to none.")] = False,
) -> None:
    """Train or fine-tune a VLM from a preset, a config file and flags."""
    given = dict(locals())  # parameter names are TrainConfig field names: this collects the flag overrides
    overrides = {name: given[name] for name in TRAIN_FIELDS if name in given}
    for name in ("output_dir", "image_root", "resume"):
        overrides[name] = as_str(overrides[name])
    if lr_backbones is not None:
        overrides["lr_vision"] = lr_vision if lr_vision is not None else lr_backbones
        overrides["lr_language"] = lr_language if lr_language is not None else lr_backbones
    if resume_from_vlm_checkpoint and vlm_checkpoint_path is None and resume is None:
        raise ConfigError("--resume_from_vlm_checkpoint needs --vlm_checkpoint_path DIR (or use --resume DIR)")
    if vlm_checkpoint_path is not None:
        if resume is not None and Path(resume) != vlm_checkpoint_path:
            raise ConfigError(f"--resume {resume} and --vlm_checkpoint_path {vlm_checkpoint_path} disagree; pass one")
        overrides["resume"] = str(vlm_checkpoint_path)
    if no_log_wandb:
        if report_to not in (None, "none"):
            raise ConfigError(f"--no-log-wandb contradicts --report-to {report_to}; pass one of them")
        overrides["report_to"] = "none"

    if overrides.get("resume") is not None:  # the run's own saved config, then the file and the flags given
        swaps = [f"--{k.replace('_', '-')}" for k, v in (("vision_encoder", vision_encoder),
                                                          ("dinov3_model", dinov3_model),
                                                          ("language_model", language_model)) if v is not None]
        if swaps:
            raise ConfigError(f"{', '.join(swaps)} cannot change the model of a resumed run (--resume "
                              f"{overrides['resume']} keeps its checkpoint's model); drop it or start a fresh run")
        if getattr(ctx.get_parameter_source("preset"), "name", None) == "COMMANDLINE":
            log.warning("--preset %s is ignored with --resume: the run's saved config is used", preset)
        source = f"resumed run {overrides['resume']}"
        model_cfg, train_cfg = resolve_resume_config(overrides.pop("resume"), config_file=as_str(config),
                                                     overrides=overrides)
    else:
        source = f"preset {preset}"
        model_cfg, train_cfg = resolve_run_config(
            preset, config_file=as_str(config), overrides=overrides,
            vision_encoder=vision_encoder, dinov3_model=dinov3_model, language_model=language_model,
        )
    if dry_run:
        if json_output:
            print_json({"model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
                        "n_params_estimate": model_cfg.n_params_estimate()})
        else:
            out.print(mapping_table(f"model ({source})", model_cfg.to_dict()))
            out.print(mapping_table("train", train_cfg.to_dict()))
            out.print(f"parameters (estimate): {model_cfg.n_params_estimate():,}")
        return

    check_output_dir(Path(train_cfg.output_dir), "--output-dir")  # below a file: one line now, not a crash later
    from nanovlm_cli.training import train as run_training  # torch: imported only when training runs
    from nanovlm_cli.training.signals import TrainingInterrupted  # torch: imported only when training runs

    checkpoint_log = logging.getLogger("nanovlm_cli.checkpoint.io")
    checkpoint_log.addFilter(_once)
    try:
        with progress_callback(train_cfg.console_log_interval, dashboard=dashboard) as callback:
            result = run_training(model_cfg, train_cfg, callback=callback)
    except TrainingInterrupted as exc:  # before the first step finished, or a second signal: nothing more saved
        message = (f"stopped at once by a second {exc}; nothing more was saved (nanovlm train --resume RUN_DIR "
                   "continues from the run's latest checkpoint)" if exc.forced else
                   f"interrupted ({exc}) before the first step; no checkpoint was written by this process")
        err.print(message, soft_wrap=True, markup=False, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    finally:
        checkpoint_log.removeFilter(_once)
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    if json_output:
        print_json(result)
    elif not result.interrupted or result.interrupted_during == "evaluation":
        for line in summary_lines(result):
            out.print(line, soft_wrap=True, markup=False, highlight=False)
    if result.interrupted:  # the checkpoint is saved and the last log line says how to resume; not a success
        raise typer.Exit(interrupted_exit_code(result.interrupted_by))
