"""`nanovlm serve`: an OpenAI-compatible HTTP server (and a chat page at /) over a checkpoint.

Thin layer: check that the server extra is installed (one line naming `pip install 'nanovlm-cli[serve]'`), load
the checkpoint into a `serving.Service`, run it with `serving.server.run_server`. Limits are flags with safe
defaults; it binds to 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

from typing import Annotated

import typer

from nanovlm_cli.cli.arguments import check_device
from nanovlm_cli.cli.console import err
from nanovlm_cli.cli.options import DEFAULT_CHECKPOINT, CheckpointOpt, DeviceOpt, DType

LIMITS = "Limits"


def serve(
    checkpoint: CheckpointOpt = DEFAULT_CHECKPOINT,
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0 exposes it to the network).")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help="Require 'Authorization: Bearer KEY' on the API routes.")] = None,
    allow_remote_images: Annotated[bool, typer.Option(
        "--allow-remote-images", help="Fetch http(s) image URLs (with a timeout and --max-image-bytes).")] = False,
    max_images: Annotated[int, typer.Option("--max-images", min=1, rich_help_panel=LIMITS,
                                            help="Images per request at most.")] = 4,
    max_image_pixels: Annotated[int, typer.Option("--max-image-pixels", min=1, rich_help_panel=LIMITS,
                                                  help="Pixels (width x height) per image at most.")] = 16_000_000,
    max_image_bytes: Annotated[int, typer.Option("--max-image-bytes", min=1, rich_help_panel=LIMITS,
                                                 help="Encoded bytes per image at most.")] = 10_000_000,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1, rich_help_panel=LIMITS,
                                                help="Request body bytes at most.")] = 20_000_000,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, rich_help_panel=LIMITS,
                                            help="New tokens a request may ask for at most.")] = 1024,
    queue_size: Annotated[int, typer.Option("--queue-size", min=1, rich_help_panel=LIMITS,
                                            help="Requests waiting at most; more get 503.")] = 64,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, rich_help_panel=LIMITS,
                                           help="Answers decoded together at most.")] = 16,
    device: DeviceOpt = "auto",
    dtype: Annotated[DType, typer.Option("--dtype", help="Weights dtype: auto, float32, bfloat16, float16.")] = "auto",
) -> None:
    """Serve CHECKPOINT over the OpenAI chat-completions API, with a chat page at /."""
    from nanovlm_cli.serving.server import require_server_stack

    check_device(device)
    require_server_stack()  # before the model loads: a missing extra costs a second, not a load
    from nanovlm_cli.serving.schema import Limits
    from nanovlm_cli.serving.server import check_address, run_server

    check_address(host, port)
    from nanovlm_cli.serving.service import Service

    limits = Limits(max_images=max_images, max_image_pixels=max_image_pixels, max_image_bytes=max_image_bytes,
                    max_body_bytes=max_body_bytes, max_tokens=max_tokens, queue_size=queue_size,
                    allow_remote_images=allow_remote_images)
    service = Service.from_checkpoint(checkpoint, device=device, dtype=dtype, limits=limits, max_batch=max_batch)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    run_server(service, host=host, port=port, api_key=api_key, log_level="warning",
               on_ready=lambda: err.print(f"serving {service.model_id} on {url} (chat page: {url}/, API: "
                                          f"{url}/v1); Ctrl-C or SIGTERM stops", markup=False, soft_wrap=True))
