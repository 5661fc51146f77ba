"""Reusable `Annotated` option aliases and the command class every `nanovlm` command uses.

Options are declared once here with their help text and reused across commands, as in the `hf` CLI; the options
of the training fields are not written here but built from the fields' own descriptions (`cli/config_options.py`).
Underscore spellings (`--batch_size`, `--resume_from_vlm_checkpoint`, as the original nanoVLM scripts spell
them) are accepted for every option by `NanoCommand`, which rewrites them to the kebab-case name before
parsing: help, completions and the man page list one name per option, and an option added later gets its
underscore spelling for free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.2x vendors click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import UsageError  # type: ignore[no-redef]

from nanovlm_cli.cli.config_options import field_option
from nanovlm_cli.cli.help import render_help
from nanovlm_cli.presets import DINOV3_ALIASES, DINOV3_MODELS, LANGUAGE_MODELS, PRESETS
from nanovlm_cli.train_config import MEMORY, TrainConfig

DEFAULT_CHECKPOINT = "lusxvr/nanoVLM-450M"

# Choice types, built from the presets module so the CLI never lists a backbone the library does not know.
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
VisionEncoderName = Literal["siglip", "dinov2", "dinov3"]
Dinov3ModelName = Literal[(*DINOV3_MODELS, *DINOV3_ALIASES)]  # type: ignore[valid-type]
LanguageModelName = Literal[tuple(LANGUAGE_MODELS)]  # type: ignore[valid-type]
ReportTo = Literal["none", "wandb", "tensorboard"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
EvalBackend = Literal["native", "lmms-eval"]
EvalScoring = Literal["generate", "rank"]


# --- The original nanoVLM's spellings ----------------------------------------------------------------------------
#
# Its README, its scripts' argparse flags (train.py, generate.py, eval/measure_vram.py, evaluation.py,
# run_evaluation.py, utils/run_checkpoint_evaluations.py) and its config fields, as `nanovlm <command>` flags.
# Keys are kebab-case (`--use_preset` is looked up as `--use-preset`). Help, completions and the man page list
# only our names; the man page's COMPATIBILITY section is generated from this table.


@dataclass(frozen=True)
class Rename:
    """Another name of one of our options (`merge`: several old flags share it and must agree)."""

    to: str
    merge: bool = False
    many: bool = False  # argparse nargs='+': following words are joined with commas


@dataclass(frozen=True)
class Fixed:
    """An old flag that means one of our options with a fixed value (`--log_wandb` -> `--report-to wandb`)."""

    to: str
    value: str


@dataclass(frozen=True)
class ToArgument:
    """An old option whose value is one of our positional arguments (`--checkpoint_dir DIR` -> `DIR`)."""

    argument: str  # the parameter name of the argument


@dataclass(frozen=True)
class Refused:
    """An old flag with no meaning here: refused in one line with `why` (formatted with the old flags' values)."""

    why: str | Callable[[dict[str, str]], str]
    takes_value: bool = True


Alias = Rename | Fixed | ToArgument | Refused


def _lmms_in_training(values: dict[str, str]) -> str:
    tasks = f" --tasks {values['lmms_eval_tasks']}" if "lmms_eval_tasks" in values else ""
    limit = f" --limit {values['lmms_eval_limit']}" if "lmms_eval_limit" in values else ""
    batch = f" --batch-size {values['lmms_eval_batch_size']}" if "lmms_eval_batch_size" in values else ""
    return ("nanovlm train does not run lmms-eval during training (it scores the shapes benchmark, see "
            f"--eval-interval); train, then run: nanovlm eval CHECKPOINT --backend lmms-eval{tasks}{limit}{batch}")


_ARCHITECTURE = ("the architecture comes from --preset, --vision-encoder/--dinov3-model and --language-model; "
                 "set other model fields in the model table of a --config file")
_LMMS_ONLY = ("lmms-eval options that nanovlm eval does not pass through (it runs lmms-eval with the checkpoint, "
              "--tasks, --limit, --batch-size, --device and --output)")
_ONE_CHECKPOINT = ("nanovlm eval scores one checkpoint: run nanovlm eval RUN/checkpoints/step-N per step "
                   "(results go to --output DIR)")
_NO_STEP_BOOKKEEPING = "nanovlm eval keeps no run/step registry; name the checkpoint and pass --output DIR"

_TRAIN_ALIASES: dict[str, Alias] = {
    "--use-preset": Rename("--preset"),
    "--lr-vision-backbone": Rename("--lr-vision"),
    "--lr-language-backbone": Rename("--lr-language"),
    "--train-dataset-path": Rename("--dataset"),
    "--train-dataset-name": Rename("--dataset-config"),
    "--stream-dataset": Rename("--stream"),
    "--no-stream-dataset": Rename("--no-stream"),
    "--relevance-min-rating": Rename("--min-rating", merge=True),
    "--image-correspondence-min-rating": Rename("--min-rating", merge=True),
    "--visual-dependency-min-rating": Rename("--min-rating", merge=True),
    "--formatting-min-rating": Rename("--min-rating", merge=True),
    "--max-training-steps": Rename("--max-steps"),
    "--stats-log-interval": Rename("--console-log-interval"),
    "--max-images-per-knapsack": Rename("--max-images-per-row"),
    "--max-sample-length": Rename("--max-seq-len"),
    "--lm-max-length": Rename("--max-seq-len"),
    "--log-wandb": Fixed("--report-to", "wandb"),
    "--use-lmms-eval": Refused(_lmms_in_training, takes_value=False),
    "--lmms-eval-tasks": Refused(_lmms_in_training),
    "--lmms-eval-limit": Refused(_lmms_in_training),
    "--lmms-eval-batch-size": Refused(_lmms_in_training),
    "--val-size": Refused("the validation set is --validation-batches batches of --batch-size rows, scored every "
                          "--validation-steps steps"),
    "--eval-in-epochs": Refused("nanovlm train counts steps, not epochs: use --eval-interval N and "
                                "--validation-steps N", takes_value=False),
    "--max-images-per-example": Refused("nanovlm caps images per packed row (--max-images-per-row); a sample "
                                        "with more images than that is skipped and counted"),
    "--lm-model-type": Refused("pick the language model with --language-model (smollm, llama, gemma) or a preset"),
    "--vit-model-type": Refused("pick the vision encoder with --vision-encoder (siglip, dinov2, dinov3) and "
                                "--dinov3-model, or a preset"),
    "--vlm-load-backbone-weights": Refused("pretrained backbone weights are always loaded for a new run and never "
                                           "for --resume"),
    "--max-img-size": Refused("set image.max_side in the model table of a --config file"),
    "--resize-to-max-side-len": Refused("set image.mode in the model table of a --config file",
                                        takes_value=False),
}
_ARCHITECTURE_FIELDS = ("vit-hidden-dim", "vit-inter-dim", "vit-patch-size", "vit-img-size", "vit-n-heads",
                        "vit-dropout", "vit-n-blocks", "vit-ln-eps", "vit-cls-flag", "lm-hidden-dim", "lm-inter-dim",
                        "lm-rms-eps", "lm-re-base", "lm-max-position-embeddings", "lm-base-vocab-size",
                        "extra-token-amount", "lm-vocab-size", "lm-n-heads", "lm-n-kv-heads", "lm-dropout",
                        "lm-n-blocks", "lm-attn-scaling", "lm-use-tokens", "lm-tie-weights", "lm-tokenizer",
                        "lm-chat-template", "mp-pixel-shuffle-factor", "mp-image-token-length", "vlm-extra-tokens")
_TRAIN_ALIASES.update({f"--{name}": Refused(_ARCHITECTURE) for name in _ARCHITECTURE_FIELDS})

ALIASES: dict[str, dict[str, Alias]] = {
    "train": _TRAIN_ALIASES,
    "generate": {
        "--hf-model": Rename("--checkpoint"),
        "--generations": Rename("--num-generations"),
        "--prompt": ToArgument("prompt"),
        "--measure-vram": Refused("nanovlm generate does not measure memory: generate --json reports prefill time "
                                  "and tokens/s; nanovlm vram --checkpoint CKPT measures training memory",
                                  takes_value=False),
    },
    "eval": {
        "--model": ToArgument("checkpoint"),
        "--checkpoint-path": ToArgument("checkpoint"),
        "--eval-tasks": Rename("--tasks", many=True),
        "--lmms-eval-tasks": Rename("--tasks"),
        "--output-path": Rename("--output"),
        "--eval-results-dir": Rename("--output"),
        "--checkpoints-dir": Refused(_ONE_CHECKPOINT),
        "--steps": Refused(_ONE_CHECKPOINT),
        "--global-step": Refused(_NO_STEP_BOOKKEEPING),
        "--run-name": Refused(_NO_STEP_BOOKKEEPING),
        "--force": Refused("nanovlm eval always scores afresh (it never skips existing results)", takes_value=False),
        "--config": Refused("nanovlm eval takes its settings as flags, not a YAML file"),
        **{f"--{name}": Refused(_LMMS_ONLY) for name in (
            "model-args", "num-fewshot", "max-batch-size", "use-cache", "gen-kwargs", "verbosity", "wandb-args",
            "timezone", "hf-hub-log-args", "log-samples-suffix", "system-instruction", "include-path", "seed")},
        **{f"--{name}": Refused(_LMMS_ONLY, takes_value=False) for name in (
            "cache-requests", "check-integrity", "write-out", "log-samples", "wandb-log-samples",
            "apply-chat-template", "fewshot-as-multiturn", "show-config", "predict-only", "trust-remote-code",
            "no-log-wandb", "process-with-media")},
    },
    "vram": {
        "--vlm-checkpoint-path": Rename("--checkpoint"),
        "--use-preset": Rename("--preset"),
        "--lm-max-length": Rename("--seq-len"),
        "--lm-model-type": Refused("nanovlm vram measures a preset or a checkpoint: pick the model with --preset "
                                   "(original_small is SmolLM2-135M) or --checkpoint"),
        "--num-iterations": Refused("nanovlm vram measures 2 training steps per batch size after a warm-up"),
    },
    "validate": {"--checkpoint-dir": ToArgument("checkpoint"), "--checkpoint-path": ToArgument("checkpoint")},
    "push": {"--checkpoint-dir": ToArgument("checkpoint"), "--hf-repo-name": ToArgument("repo_id")},
}
# With no --backend, eval's --tasks (the original evaluation.py's lmms-eval tasks) means --backend lmms-eval.
IMPLIED: dict[str, dict[str, tuple[str, str]]] = {"eval": {"--tasks": ("--backend", "lmms-eval")}}
# When an old flag fills a later argument, an earlier one may come from an option (generate.py's --image IMAGE).
ARGUMENT_FALLBACKS: dict[str, dict[str, str]] = {"generate": {"image": "--image"}}
_BOOL_WORDS = {"True", "False", "true", "false"}


def _take(args: list[str], i: int, sep: str, inline: str, n: int = 1) -> tuple[list[str], int]:
    """The value words of the option before `args[i]` (its `=value`, else the next n words) and the next index."""
    if sep:
        return [inline], i
    return args[i:i + n], min(len(args), i + n)


def _refusal(refused: list[tuple[str, Refused]], old_values: dict[str, str], ctx: Any) -> UsageError:
    """One usage error for every refused old flag, each reason once with the flags it answers."""
    reasons: dict[str, list[str]] = {}  # reason -> the old flags it answers (a callable names them itself)
    for old, r in refused:
        flags = reasons.setdefault(r.why(old_values) if callable(r.why) else r.why, [])
        if not callable(r.why) and old not in flags:
            flags.append(old)
    return UsageError("; ".join(f"{', '.join(flags)}: {why}" if flags else why for why, flags in reasons.items()), ctx)


class NanoCommand(TyperCommand):
    """A Typer command that also accepts `--some_option` for every `--some-option` it declares, and the original
    nanoVLM's spellings of its flags (`ALIASES`)."""

    def _known_options(self) -> set[str]:
        names: set[str] = set()
        for param in self.params:
            names.update(getattr(param, "opts", ()))
            names.update(getattr(param, "secondary_opts", ()))
        return names

    def _value_counts(self) -> dict[str, int]:
        """Option name -> how many words it takes (0 for flags)."""
        counts: dict[str, int] = {}
        for param in self.params:
            if getattr(param, "param_type_name", "") != "option":
                continue
            n = 0 if getattr(param, "is_flag", False) or getattr(param, "count", False) else max(1, param.nargs)
            counts.update(dict.fromkeys((*param.opts, *param.secondary_opts), n))
        return counts

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self.translate(ctx, args))

    def format_help(self, ctx: Any, formatter: Any) -> None:
        formatter.write(render_help(self, ctx))

    def translate(self, ctx: Any, args: list[str]) -> list[str]:
        """`args` with underscore and original-nanoVLM spellings rewritten to this command's own (see ALIASES)."""
        known, counts = self._known_options(), self._value_counts()
        aliases = ALIASES.get(self.name or "", {})
        opts: list[str] = []  # option words, in order
        positionals: list[str] = []
        filled: dict[str, str] = {}  # argument name -> value given through an old option
        refused: list[tuple[str, Refused]] = []
        old_values: dict[str, str] = {}  # old flag (snake_case) -> its value
        merged: dict[str, tuple[str, str]] = {}  # target -> (old flag, value)
        after_dashes = False
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if after_dashes or arg == "--" or not arg.startswith("-") or arg == "-":
                if arg == "--" and not after_dashes:
                    after_dashes = True
                else:
                    positionals.append(arg)
                continue
            name, sep, inline = arg.partition("=")
            if name not in known and name.startswith("--") and "_" in name:
                name = "--" + name[2:].replace("_", "-")
            alias = aliases.get(name) if name not in known else None

            if alias is None:
                if name not in known:  # unknown: leave it to click ("No such option") untouched
                    opts.append(arg)
                    continue
                n = counts.get(name, 0)
                if n == 0:
                    self._refuse_bool_value(ctx, args[i] if i < len(args) and not sep else None, arg, name)
                opts.append(name + sep + inline if sep else name)
                if n and not sep:
                    words, i = _take(args, i, sep, inline, n)
                    opts.extend(words)
                continue
            old = arg.partition("=")[0]
            if isinstance(alias, Refused):
                words, i = _take(args, i, sep, inline) if alias.takes_value else ([], i)
                old_values[name[2:].replace("-", "_")] = words[0] if words else ""
                refused.append((old, alias))
            elif isinstance(alias, ToArgument):
                words, i = _take(args, i, sep, inline)
                if words:
                    filled[alias.argument] = words[0]
            elif isinstance(alias, Fixed):
                self._refuse_bool_value(ctx, args[i] if i < len(args) and not sep else None, old, name)
                opts += [alias.to, alias.value]
            else:
                words, i = self._renamed(ctx, alias, args, i, (old, name, sep, inline), counts.get(alias.to, 0), merged)
                opts += [alias.to, *words]
        if refused:
            raise _refusal(refused, old_values, ctx)
        opts += self._implied(opts)
        if not filled:
            return opts + (["--"] if after_dashes else []) + positionals
        return opts + self._arguments(ctx, filled, positionals, opts)

    def _renamed(self, ctx: Any, alias: Rename, args: list[str], i: int, written: tuple[str, str, str, str], n: int,
                 merged: dict[str, tuple[str, str]]) -> tuple[list[str], int]:
        """The value words of an old flag that is another name of one of ours (`alias.to`, taking `n` words), and the
        next index; `written` is (the old flag as typed, its kebab-case name, "=" or "", the inline value)."""
        old, name, sep, inline = written
        if n == 0:
            self._refuse_bool_value(ctx, args[i] if i < len(args) and not sep else None, old, name)
            return [], i
        words, i = _take(args, i, sep, inline)
        if alias.many and not sep:
            while i < len(args) and not args[i].startswith("-"):
                words.append(args[i])
                i += 1
            words = [",".join(words)]
        if alias.merge and words:
            earlier = merged.setdefault(alias.to, (old, words[0]))
            if earlier[1] != words[0]:
                raise UsageError(f"{earlier[0]} {earlier[1]} and {old} {words[0]} differ; nanovlm applies one "
                                 f"threshold to every rating: pass {alias.to} N once", ctx)
        return words, i

    def _implied(self, opts: list[str]) -> list[str]:
        """The options that the ones given imply (`IMPLIED`) when not given themselves."""
        extra: list[str] = []
        for trigger, (option, value) in IMPLIED.get(self.name or "", {}).items():
            given = {o.partition("=")[0] for o in [*opts, *extra] if o.startswith("-")}
            if trigger in given and option not in given:
                extra += [option, value]
        return extra

    def _arguments(self, ctx: Any, filled: dict[str, str], positionals: list[str], opts: list[str]) -> list[str]:
        """The positional words in argument order, with the values that old options gave."""
        fallbacks = ARGUMENT_FALLBACKS.get(self.name or "", {})
        ordered: list[str] = []
        for param in self.params:
            if getattr(param, "param_type_name", "") != "argument":
                continue
            if param.name in filled:
                ordered.append(filled[param.name])
            elif positionals:
                ordered.append(positionals.pop(0))
            elif param.name in fallbacks and fallbacks[param.name] in opts:
                at = opts.index(fallbacks[param.name])
                ordered.append(opts[at + 1])
                del opts[at:at + 2]
            elif any(p.name in filled for p in self.params if getattr(p, "param_type_name", "") == "argument"):
                usage = " ".join(p.metavar or p.name.upper() for p in self.params
                                 if getattr(p, "param_type_name", "") == "argument")
                raise UsageError(f"missing argument {param.metavar or param.name.upper()}; the command line is "
                                 f"nanovlm {self.name} [OPTIONS] {usage}", ctx)
        return ["--", *ordered, *positionals]

    @staticmethod
    def _refuse_bool_value(ctx: Any, following: str | None, written: str, name: str) -> None:
        """`--compile False` (the original scripts' type=bool, where "False" meant True) is refused clearly."""
        if following in _BOOL_WORDS:
            raise UsageError(f"{written} is a flag and takes no value: write {written} alone (or leave it out), "
                             f"not {written} {following}", ctx)


class NanoGroup(TyperGroup):
    """The `nanovlm` group: its help is rendered like every command's (`cli/help.py`)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        formatter.write(render_help(self, ctx))


# --- Shared by several commands ---------------------------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (sampling, data order, initialisation).")]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="Samples per batch.")]
CheckpointArg = Annotated[
    str, typer.Argument(metavar="CHECKPOINT", help="Checkpoint directory or Hugging Face Hub model id.")
]
CheckpointOpt = Annotated[
    str, typer.Option("--checkpoint", "-c", metavar="CHECKPOINT", help="Checkpoint directory or Hub model id.")
]
PresetOpt = Annotated[PresetName, typer.Option("--preset", help="Named model + training preset (see README).")]
MEMORY_PANEL = MEMORY
# The training fields that `vram` shares with `train`: their help is the field's own (train_config.py).
CompileOpt = field_option(TrainConfig, "compile")
GradientCheckpointingOpt = field_option(TrainConfig, "gradient_checkpointing")
FreezeVisionOpt = field_option(TrainConfig, "freeze_vision_encoder")


def as_str(path: Path | str | None) -> str | None:
    return None if path is None else str(path)
