"""`nanovlm generate`: answer a prompt about one or more images with a checkpoint.

Thin layer: check the inputs exist (fast, before any model loads), call the library's generation function,
print the answers (stdout; streamed token by token on a terminal) or JSON with timings. Sampling settings are
passed through untouched; `--greedy` overrides them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from nanovlm_cli.cli.arguments import check_device
from nanovlm_cli.cli.console import out, print_json
from nanovlm_cli.cli.options import DEFAULT_CHECKPOINT, CheckpointOpt, DeviceOpt, DType, JsonOpt


def generate(
    # str, not Path: Path("https://x") would become "https:/x" before we could say that URLs are not read.
    image: Annotated[str, typer.Argument(metavar="IMAGE", help="Image file to ask about.")],
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="The question or instruction.")],
    checkpoint: CheckpointOpt = DEFAULT_CHECKPOINT,
    extra_images: Annotated[list[str] | None, typer.Option(
        "--image", metavar="IMAGE", help="Another image for the same prompt (repeatable).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0,
                                               help="Sampling temperature (0 means greedy).")] = 0.5,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k most likely tokens (0: all).")] = 50,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0,
                                         help="Nucleus sampling: smallest set with this probability mass.")] = 0.9,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always pick the most likely token.")] = False,
    num_generations: Annotated[int, typer.Option("--num-generations", "-n", min=1,
                                                 help="Independent answers to sample.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the sampler.")] = 0,
    device: DeviceOpt = "auto",
    dtype: Annotated[DType, typer.Option("--dtype", help="Weights dtype: auto, float32, bfloat16, float16.")] = "auto",
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the model: a slower start (about a minute), then faster tokens; pays for "
                          "long answers and many samples.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Answer PROMPT about IMAGE (and any --image) with a checkpoint."""
    from nanovlm_cli.data.images import check_image_path  # torch-free --help: the library loads on use
    from nanovlm_cli.generation import generate_from_checkpoint

    images = [image, *(extra_images or [])]
    check_device(device)
    for path in images:
        check_image_path(path)  # a missing file, a directory or a URL fails here, before the model loads

    stream = not json_output and num_generations == 1 and out.is_terminal
    result = generate_from_checkpoint(
        checkpoint, [str(p) for p in images], prompt, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, greedy=greedy, num_generations=num_generations, seed=seed, device=device,
        dtype=dtype, compile=compile, on_text=(lambda _row, piece: out.print(piece, end="", markup=False, soft_wrap=True))
        if stream else None,
    )
    if json_output:
        print_json({"checkpoint": checkpoint, "images": [str(p) for p in images], "prompt": prompt,
                    "answers": result.texts, "prompt_tokens": result.prompt_tokens[0],
                    "new_tokens": result.new_tokens, "finish_reasons": result.finish_reasons,
                    "prefill_s": result.prefill_s, "decode_tokens_per_s": result.decode_tokens_per_s})
        return
    if stream:
        out.print()
        return
    for i, answer in enumerate(result.texts):
        if len(result.texts) > 1:
            out.print(f"[bold]>> generation {i + 1}[/]")
        out.print(answer, markup=False, soft_wrap=True)
