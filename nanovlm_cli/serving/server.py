"""Running the app: uvicorn on one port, with a drain on SIGTERM; what `nanovlm serve` calls.

Main design choice: uvicorn's own graceful shutdown does the draining (stop accepting, let open requests finish),
and the batcher is closed only after it, so every request that was in flight gets its answer. uvicorn re-raises a
captured SIGTERM after shutdown (the process would die of it, exit 143); a SIGTERM here is the ordinary way to
stop a server, so it ends with exit 0 instead.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from nanovlm_cli.errors import NanoVLMError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'nanovlm-cli[serve]'"


class ServingError(NanoVLMError):
    """The server cannot start: its extra is not installed, the port is taken."""


def require_server_stack() -> None:
    """Raise a one-line `ServingError` with the install command when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ServingError(f"serve needs FastAPI and uvicorn ({exc.name} is not installed): {INSTALL_HINT}") from exc


def run_server(service: Any, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               log_level: str = "info", on_ready: Any = None) -> None:
    """Serve `service` until SIGINT / SIGTERM; returns after in-flight requests finished (then the batcher stops)."""
    require_server_stack()
    import uvicorn

    from nanovlm_cli.serving.app import create_app

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM:  # drain and exit 0: do not re-raise it after shutdown
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready()

    config = uvicorn.Config(create_app(service, api_key=api_key), host=host, port=port, log_level=log_level,
                            access_log=log_level == "debug", timeout_graceful_shutdown=None, lifespan="off")
    server = _Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; the reason is in its log line above
        pass
    finally:
        service.close()
    if not server.started:
        raise ServingError(f"could not listen on {host}:{port} (is the port taken? pick another with --port)")


def check_address(host: str, port: int) -> None:
    """Raise `ServingError` now when `host:port` cannot be bound (taken, or not an address of this machine), before
    a model is loaded for nothing."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        raise ServingError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                           "(or --host)") from exc
