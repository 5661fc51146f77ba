"""Reusable `Annotated` option aliases and the command class every `nanovlm` command uses.

Options are declared once here with their help text and reused across commands, as in the `hf` CLI.
Underscore spellings (`--batch_size`, `--resume_from_vlm_checkpoint`, as the original nanoVLM scripts spell
them) are accepted for every option by `NanoCommand`, which rewrites them to the kebab-case name before
parsing: help, completions and the man page list one name per option, and an option added later gets its
underscore spelling for free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperCommand

from nanovlm_cli.presets import DINOV3_ALIASES, DINOV3_MODELS, LANGUAGE_MODELS, PRESETS

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


class NanoCommand(TyperCommand):
    """A Typer command that also accepts `--some_option` for every `--some-option` it declares."""

    def _known_options(self) -> set[str]:
        names: set[str] = set()
        for param in self.params:
            names.update(getattr(param, "opts", ()))
            names.update(getattr(param, "secondary_opts", ()))
        return names

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        known = self._known_options()
        rewritten: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":  # everything after a bare "--" is positional
                rewritten.extend(args[i:])
                break
            name, sep, value = arg.partition("=")
            if name.startswith("--") and "_" in name and name not in known:
                kebab = "--" + name[2:].replace("_", "-")
                if kebab in known:
                    arg = kebab + sep + value
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


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
MEMORY_PANEL = "Freezing and memory"
CompileOpt = Annotated[
    bool | None,
    typer.Option("--compile/--no-compile", help="torch.compile the model (CUDA; slower start).",
                 rich_help_panel=MEMORY_PANEL),
]
GradientCheckpointingOpt = Annotated[
    bool | None,
    typer.Option("--gradient-checkpointing/--no-gradient-checkpointing",
                 help="Recompute activations in the backward pass: less memory, about 30% more compute.",
                 rich_help_panel=MEMORY_PANEL),
]
FreezeVisionOpt = Annotated[
    bool | None,
    typer.Option("--freeze-vision-encoder/--no-freeze-vision-encoder", help="Do not train the vision encoder.",
                 rich_help_panel=MEMORY_PANEL),
]


def choice_help(text: str, choices: Any) -> str:
    """Help text that lists the accepted values (Literal choices render poorly in some terminals)."""
    return f"{text} One of: {', '.join(choices)}."


def as_str(path: Path | str | None) -> str | None:
    return None if path is None else str(path)
