"""`nanovlm chat`: a multi-turn conversation with a checkpoint in the terminal.

Thin layer over `serving.conversation.Conversation` and the `Engine`: read a line, run a slash command or answer
it (streamed to stdout), repeat. Notices, errors and the prompt go to stderr, so stdout holds only the answers.
With stdin not a terminal every line is one user turn (or command), so a session can be scripted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from nanovlm_cli.cli.arguments import check_device
from nanovlm_cli.cli.console import err, print_error
from nanovlm_cli.cli.options import DEFAULT_CHECKPOINT, CheckpointOpt, DeviceOpt, DType
from nanovlm_cli.errors import NanoVLMError

COMMANDS_HELP = ("/image PATH attaches an image to your next message, /reset starts over, /save FILE writes the "
                 "conversation as JSON, /exit leaves; Ctrl-C stops an answer")


def chat(
    checkpoint: CheckpointOpt = DEFAULT_CHECKPOINT,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens per answer at most.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0,
                                               help="Sampling temperature (0 means greedy).")] = 0.5,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0,
                                         help="Nucleus sampling: smallest set with this probability mass.")] = 0.9,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always pick the most likely token.")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed of the sampler.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message kept for the whole chat.")] = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[DType, typer.Option("--dtype", help="Weights dtype: auto, float32, bfloat16, float16.")] = "auto",
) -> None:
    """Talk with a checkpoint: multi-turn, with images, streamed."""
    check_device(device)
    from nanovlm_cli.checkpoint.io import load_model
    from nanovlm_cli.data.processor import Processor
    from nanovlm_cli.devices import resolve_device, resolve_dtype
    from nanovlm_cli.generation import Engine, SamplingConfig
    from nanovlm_cli.serving.conversation import Conversation

    torch_device = resolve_device(device)
    loaded = load_model(checkpoint, device=torch_device, dtype=resolve_dtype(dtype, torch_device))
    processor = Processor(loaded.cfg, loaded.tokenizer)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                              seed=seed)
    session = _Session(Engine(loaded.model, processor), processor, Conversation(system=system), sampling,
                       context=int(loaded.cfg.language.max_position_embeddings),
                       max_images=int(loaded.cfg.max_images_per_sample), interactive=sys.stdin.isatty())
    if session.interactive:
        err.print(f"chatting with {checkpoint}; {COMMANDS_HELP}", markup=False, soft_wrap=True)
    session.run()


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@dataclass
class _Session:
    """The read -> command or answer -> repeat loop of one chat, over a loaded engine and its conversation."""

    engine: Any
    processor: Any
    conversation: Any  # serving.conversation.Conversation
    sampling: Any  # generation.SamplingConfig
    context: int  # the model's positions
    max_images: int  # images per conversation the model takes
    interactive: bool  # stdin is a terminal: prompts and notices are shown

    def run(self) -> None:
        while True:
            text = self._read()
            if text is None:
                return
            if not text.strip():
                continue
            word, _, rest = text.strip().partition(" ")
            if word == "/exit" or word == "/quit":
                return
            if not self._command(word, rest.strip()):
                self._answer(text)

    def _read(self) -> str | None:
        """The next line without its newline; None at the end of input (Ctrl-D) or on Ctrl-C."""
        if self.interactive:
            err.print("[bold cyan]you>[/] ", end="")
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            err.print()
            return None
        return line.rstrip("\r\n") if line else None

    def _command(self, word: str, arg: str) -> bool:
        """Run a slash command (True), or leave a line that is none to be answered (False)."""
        if word == "/reset":
            self.conversation.reset()
            err.print("(conversation reset)")
        elif word == "/save":
            if not arg:
                print_error("/save needs a file name: /save chat.json")
                return True
            try:
                err.print(f"(saved to {self.conversation.save(arg)})", markup=False)
            except OSError as exc:
                print_error(f"cannot write {arg}: {exc.strerror or exc}")
        elif word == "/image":
            self._attach(arg)
        elif word.startswith("/") and " " not in word[1:] and word[1:].isalpha():
            print_error(f"unknown command {word}; {COMMANDS_HELP}")
        else:
            return False
        return True

    def _attach(self, path: str) -> None:
        from nanovlm_cli.data.images import check_image_path, load_image

        conversation = self.conversation
        try:
            if len(conversation.images) + len(conversation.pending) >= self.max_images:
                raise NanoVLMError(f"this model takes at most {self.max_images} images per conversation; /reset to "
                                   "start over")
            conversation.attach(load_image(check_image_path(path)), path)
            err.print(f"(attached {path} to your next message)", markup=False)
        except NanoVLMError as exc:
            print_error(str(exc).splitlines()[0] if path else "/image needs a path: /image photo.jpg")

    def _answer(self, text: str) -> None:
        """Add the user turn, stream the answer to stdout and keep it (also the part before a Ctrl-C)."""
        conversation = self.conversation
        conversation.add_user(text)
        try:
            prompt = conversation.prompt(self.processor, self.sampling.max_new_tokens, self.context)
        except NanoVLMError as exc:
            conversation.messages.pop()
            print_error(str(exc).splitlines()[0])
            return
        if prompt.dropped:
            err.print(f"(dropped the oldest {prompt.dropped} exchange(s) to stay within the model's context of "
                      f"{self.context} tokens)", markup=False)
        if self.interactive:
            err.print("[bold green]model>[/] ", end="")
        pieces: list[str] = []  # the answer so far, kept when Ctrl-C stops it
        try:
            result = self.engine.generate([prompt.sample], self.sampling,
                                          on_text=lambda _row, piece: (pieces.append(piece), _write(piece)))
            answer = result.texts[0]
        except KeyboardInterrupt:
            _write("\n")
            err.print("(answer stopped)")
            conversation.add_assistant("".join(pieces))
            return
        except NanoVLMError as exc:
            conversation.messages.pop()
            print_error(str(exc).splitlines()[0])
            return
        _write("\n")
        conversation.add_assistant(answer)
