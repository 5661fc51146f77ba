"""`nanovlm chat`: a multi-turn conversation with a checkpoint in the terminal.

Thin layer over `serving.conversation.Conversation` and the `Engine`: read a line, run a slash command or answer
it (streamed to stdout), repeat. Notices, errors and the prompt go to stderr, so stdout holds only the answers.
With stdin not a terminal every line is one user turn (or command), so a session can be scripted.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from nanovlm_cli.cli.arguments import check_device
from nanovlm_cli.cli.console import err, print_error
from nanovlm_cli.cli.options import DEFAULT_CHECKPOINT, CheckpointOpt, DeviceOpt, DType

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
    from nanovlm_cli.data.images import check_image_path, load_image
    from nanovlm_cli.data.processor import Processor
    from nanovlm_cli.distributed import resolve_device
    from nanovlm_cli.errors import NanoVLMError
    from nanovlm_cli.generation import Engine, SamplingConfig, resolve_dtype
    from nanovlm_cli.serving.conversation import Conversation

    torch_device = resolve_device(device)
    loaded = load_model(checkpoint, device=torch_device, dtype=resolve_dtype(dtype, torch_device))
    processor = Processor(loaded.cfg, loaded.tokenizer)
    engine = Engine(loaded.model, processor)
    context = int(loaded.cfg.language.max_position_embeddings)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                              seed=seed)
    conversation = Conversation(system=system)
    interactive = sys.stdin.isatty()
    if interactive:
        err.print(f"chatting with {checkpoint}; {COMMANDS_HELP}", markup=False, soft_wrap=True)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    pieces: list[str] = []  # the answer so far, kept when Ctrl-C stops it
    while True:
        if interactive:
            err.print("[bold cyan]you>[/] ", end="")
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            err.print()
            return
        if not line:  # end of input (Ctrl-D)
            return
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        word, _, rest = text.strip().partition(" ")
        if word == "/exit" or word == "/quit":
            return
        if word == "/reset":
            conversation.reset()
            err.print("(conversation reset)")
            continue
        if word == "/save":
            if not rest.strip():
                print_error("/save needs a file name: /save chat.json")
                continue
            try:
                err.print(f"(saved to {conversation.save(rest.strip())})", markup=False)
            except OSError as exc:
                print_error(f"cannot write {rest.strip()}: {exc.strerror or exc}")
            continue
        if word == "/image":
            path = rest.strip()
            try:
                if len(conversation.images) + len(conversation.pending) >= loaded.cfg.max_images_per_sample:
                    raise NanoVLMError(f"this model takes at most {loaded.cfg.max_images_per_sample} images per "
                                       "conversation; /reset to start over")
                conversation.attach(load_image(check_image_path(path)), path)
                err.print(f"(attached {path} to your next message)", markup=False)
            except NanoVLMError as exc:
                print_error(str(exc).splitlines()[0] if path else "/image needs a path: /image photo.jpg")
            continue
        if word.startswith("/") and " " not in word[1:] and word[1:].isalpha():
            print_error(f"unknown command {word}; {COMMANDS_HELP}")
            continue

        conversation.add_user(text)
        try:
            prompt = conversation.prompt(processor, max_new_tokens, context)
        except NanoVLMError as exc:
            conversation.messages.pop()
            print_error(str(exc).splitlines()[0])
            continue
        if prompt.dropped:
            err.print(f"(dropped the oldest {prompt.dropped} exchange(s) to stay within the model's context of "
                      f"{context} tokens)", markup=False)
        if interactive:
            err.print("[bold green]model>[/] ", end="")
        pieces.clear()
        try:
            result = engine.generate([prompt.sample], sampling,
                                     on_text=lambda _row, piece: (pieces.append(piece), write(piece)))
            answer = result.texts[0]
        except KeyboardInterrupt:
            answer = "".join(pieces)
            write("\n")
            err.print("(answer stopped)")
            conversation.add_assistant(answer)
            continue
        except NanoVLMError as exc:
            conversation.messages.pop()
            print_error(str(exc).splitlines()[0])
            continue
        write("\n")
        conversation.add_assistant(answer)
