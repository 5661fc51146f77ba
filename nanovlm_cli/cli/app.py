"""The `nanovlm` Typer app: registers the commands and maps errors to exit codes; nothing else.

Each command lives in its own module (parse -> call one library function -> render). `main()` runs the app
in non-standalone mode so that it owns the error contract: a `NanoVLMError` becomes one red `error: ...` line
on stderr and exit code 1 (the traceback only with `--debug` or NANOVLM_DEBUG=1), a usage error one line and
exit 2, Ctrl-C exit 130, and anything else (a bug) a traceback and exit 1. Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import Annotated, Any

import typer

try:  # typer >= 0.2x vendors click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]

from nanovlm_cli import __version__
from nanovlm_cli.cli import chat, export, generate, push, serve, train, validate, vram
from nanovlm_cli.cli import eval as eval_cmd
from nanovlm_cli.cli.console import err, print_error, setup_logging
from nanovlm_cli.cli.options import NanoCommand, NanoGroup
from nanovlm_cli.errors import NanoVLMError

PROG = "nanovlm"
HELP = "Train, fine-tune, evaluate and run small vision-language models in pure PyTorch."
EPILOG = ("Options also accept their underscore spelling (--batch_size for --batch-size) and the original nanoVLM's "
          "names (--use_preset, --vlm_checkpoint_path: see COMPATIBILITY in the manual). Manual: man nanovlm (installed "
          "with the package; in a source checkout: man -l man/nanovlm.1). More: README.md.")


@dataclass
class CliState:
    """What the global options decide, read back by `main()` when a command fails."""

    debug: bool = False


def _debug_from_env() -> bool:
    return os.environ.get("NANOVLM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    name=PROG, help=HELP, epilog=EPILOG, no_args_is_help=True, add_completion=False, cls=NanoGroup,
    pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_version,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks and debug logs "
                                                        "(also NANOVLM_DEBUG=1).")] = False,
) -> None:
    """Train, fine-tune, evaluate and run small vision-language models in pure PyTorch."""
    debug = debug or _debug_from_env()
    if isinstance(ctx.obj, CliState):
        ctx.obj.debug = debug
    setup_logging(debug)


def _register(fn: Any, name: str, **settings: Any) -> None:
    app.command(name=name, cls=NanoCommand, context_settings=settings or None)(fn)


_register(train.train, "train")
_register(generate.generate, "generate")
_register(eval_cmd.evaluate, "eval")
_register(vram.vram, "vram", allow_extra_args=True)
_register(validate.validate, "validate")
_register(push.push, "push")
_register(export.export, "export")
_register(chat.chat, "chat")
_register(serve.serve, "serve")


def get_command() -> Any:
    """The click command tree (used by the docs generator and the completion scripts)."""
    return typer.main.get_command(app)


def run(argv: list[str] | None = None) -> int:
    """Run the app on `argv` and return the exit code (the error contract lives here)."""
    state = CliState(debug=_debug_from_env())
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = get_command().main(args=args, prog_name=PROG, standalone_mode=False, obj=state)
        return result if isinstance(result, int) else 0
    except NanoVLMError as exc:
        if state.debug:
            traceback.print_exc(file=sys.stderr)
        print_error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 1
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `nanovlm`: the help, not an error line
            if exc.format_message():
                err.print(exc.format_message(), markup=False, highlight=False)
            return exc.exit_code
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        message = exc.format_message().replace(": Value error, ", ": ")  # typer's validator prefix says nothing
        print_error(f"{message}{hint}")
        return exc.exit_code
    except ClickException as exc:
        print_error(exc.format_message())
        return exc.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception:  # noqa: BLE001 (a bug: always show where it happened)
        traceback.print_exc(file=sys.stderr)
        print_error("unexpected internal error (a bug); please report it with the traceback above")
        return 1


def main() -> None:
    """Console-script entry point: `nanovlm ...`."""
    sys.exit(run())
