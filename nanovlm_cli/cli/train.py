"""`nanovlm train`: resolve preset + config file + flags into validated configs, then train (or print them).

Every option defaults to None ("not given") so that only what the user typed overrides the config file and
the preset. The options of the training fields are not written here: `with_config_options` builds one per
`TrainConfig` field from the field's own description (train_config.py), and they arrive in `**fields`, keyed by
field name; the parameters below are the command's own (the preset, the backbone swaps, the display, the original
nanoVLM's spellings). `--dry-run` works without torch: it prints the resolved configs and exits.
`--resume DIR` starts from the run's own saved configs instead of the preset. An interrupted run (Ctrl-C, SIGTERM)
saves its checkpoint and exits 128 + the signal number (130, 143), so `nanovlm train ... && nanovlm push ...` never
publishes a half-trained model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from nanovlm_cli.cli.arguments import check_device, check_output_dir
from nanovlm_cli.cli.config_options import with_config_options
from nanovlm_cli.cli.console import err, mapping_table, out, print_json
from nanovlm_cli.cli.dashboard import progress_callback
from nanovlm_cli.cli.options import Dinov3ModelName, JsonOpt, LanguageModelName, PresetOpt, VisionEncoderName, as_str
from nanovlm_cli.cli.progress import interrupted_exit_code, is_main_process, summary_lines
from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.errors import ConfigError
from nanovlm_cli.run_config import resolve_resume_config, resolve_run_config
from nanovlm_cli.train_config import LOGGING, OPTIMISATION, RUN

log = logging.getLogger(__name__)

MODEL, COMPATIBILITY = "Model", "Compatibility with the original nanoVLM flags"


def _check_device(value: str | None) -> str | None:
    """`--device banana` is a usage error (exit 2) before anything loads; a device this machine lacks is exit 1."""
    return None if value is None else check_device(value)


def _once(record: logging.LogRecord) -> bool:
    """A log filter: the progress view and the last line name each checkpoint, so the library's own "saved
    checkpoint to ..." line would report the same path twice."""
    return not record.getMessage().startswith("saved checkpoint to")


def _opt(*names: str, panel: str, help: str, **kwargs) -> typer.Option:
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


@with_config_options(TrainConfig, before="dry_run", beside={"lr_backbones": "lr_mp", "dashboard": "console_log_interval"},
                     callbacks={"device": _check_device})
def train(
    ctx: typer.Context,
    preset: PresetOpt = "default",
    config: Annotated[Path | None, _opt("--config", metavar="FILE", panel=RUN,
                                        help="A .toml or .json file of training fields plus an optional "
                                             "model table; flags override it.")] = None,
    vision_encoder: Annotated[VisionEncoderName | None, _opt("--vision-encoder", panel=MODEL,
                                                             help="Swap the preset's vision encoder.")] = None,
    dinov3_model: Annotated[Dinov3ModelName | None, _opt("--dinov3-model", panel=MODEL,
                                                         help="DINOv3 size (implies --vision-encoder dinov3); "
                                                              "vitl14 is an alias of vitl16.")] = None,
    language_model: Annotated[LanguageModelName | None, _opt("--language-model", panel=MODEL,
                                                             help="Swap the preset's language model.")] = None,
    lr_backbones: Annotated[float | None, _opt("--lr-backbones", min=0.0, panel=OPTIMISATION,
                                               help="Learning rate of both backbones (--lr-vision and "
                                                    "--lr-language override it).")] = None,
    dashboard: Annotated[bool, _opt("--dashboard/--no-dashboard", panel=LOGGING,
                                    help="Live dashboard on a terminal (else plain log lines every "
                                         "--console-log-interval steps).")] = True,
    dry_run: Annotated[bool, _opt("--dry-run", panel=RUN,
                                  help="Print the resolved configs and exit (no torch, no weights).")] = False,
    json_output: JsonOpt = False,
    resume_from_vlm_checkpoint: Annotated[bool, _opt("--resume-from-vlm-checkpoint", panel=COMPATIBILITY,
                                                     help="Resume from --vlm-checkpoint-path (same as --resume).")
                                          ] = False,
    vlm_checkpoint_path: Annotated[Path | None, _opt("--vlm-checkpoint-path", metavar="DIR", panel=COMPATIBILITY,
                                                     help="Checkpoint to resume from.")] = None,
    no_log_wandb: Annotated[bool, _opt("--no-log-wandb", panel=COMPATIBILITY, help="Same as --report-to none.")
                            ] = False,
    **fields: Any,  # one per TrainConfig field (None: not given), built by with_config_options
) -> None:
    """Train or fine-tune a VLM from a preset, a config file and flags."""
    overrides = _overrides(fields, lr_backbones=lr_backbones, resume_from_vlm_checkpoint=resume_from_vlm_checkpoint,
                           vlm_checkpoint_path=vlm_checkpoint_path, no_log_wandb=no_log_wandb)
    swaps = {"vision_encoder": vision_encoder, "dinov3_model": dinov3_model, "language_model": language_model}
    if overrides.get("resume") is not None:  # the run's own saved config, then the file and the flags given
        _refuse_swaps(swaps, overrides["resume"])
        if getattr(ctx.get_parameter_source("preset"), "name", None) == "COMMANDLINE":
            log.warning("--preset %s is ignored with --resume: the run's saved config is used", preset)
        source = f"resumed run {overrides['resume']}"
        model_cfg, train_cfg = resolve_resume_config(overrides.pop("resume"), config_file=as_str(config),
                                                     overrides=overrides)
    else:
        source = f"preset {preset}"
        model_cfg, train_cfg = resolve_run_config(preset, config_file=as_str(config), overrides=overrides, **swaps)
    if dry_run:
        _print_configs(model_cfg, train_cfg, source, json_output)
    else:
        _run(model_cfg, train_cfg, dashboard=dashboard, json_output=json_output)


def _overrides(fields: dict[str, Any], *, lr_backbones: float | None, resume_from_vlm_checkpoint: bool,
               vlm_checkpoint_path: Path | None, no_log_wandb: bool) -> dict[str, Any]:
    """The training fields the command line sets (None: not given), with the shorthand and old flags applied."""
    overrides = {name: as_str(value) if isinstance(value, Path) else value for name, value in fields.items()}
    resume, report_to = overrides["resume"], overrides["report_to"]
    if lr_backbones is not None:
        for name in ("lr_vision", "lr_language"):
            overrides[name] = lr_backbones if overrides[name] is None else overrides[name]
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
    return overrides


def _refuse_swaps(swaps: dict[str, str | None], resume: str) -> None:
    """A resumed run keeps its checkpoint's model: a backbone swap on the command line is a mistake."""
    given = [f"--{k.replace('_', '-')}" for k, v in swaps.items() if v is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} cannot change the model of a resumed run (--resume {resume} keeps its "
                          "checkpoint's model); drop it or start a fresh run")


def _print_configs(model_cfg: VLMConfig, train_cfg: TrainConfig, source: str, json_output: bool) -> None:
    """`--dry-run`: the resolved configs, as tables or JSON."""
    if json_output:
        print_json({"model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
                    "n_params_estimate": model_cfg.n_params_estimate()})
    else:
        out.print(mapping_table(f"model ({source})", model_cfg.to_dict()))
        out.print(mapping_table("train", train_cfg.to_dict()))
        out.print(f"parameters (estimate): {model_cfg.n_params_estimate():,}")


def _run(model_cfg: VLMConfig, train_cfg: TrainConfig, *, dashboard: bool, json_output: bool) -> None:
    """Train with the progress view, then report; an interrupted run exits 128 + the signal number."""
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
