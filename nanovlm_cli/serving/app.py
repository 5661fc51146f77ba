"""The HTTP app (FastAPI): OpenAI chat completions over a `Service`; the engine never sees HTTP.

Routes: POST /v1/chat/completions (JSON, or server-sent `chat.completion.chunk` events ending in `data: [DONE]`
with `stream`), GET /v1/models, GET /health, GET / (the chat page). Every refusal is the OpenAI error object
`{"error": {"message", "type", "param", "code"}}` with its status. The body is read and parsed here (not by
FastAPI's validation) so a size limit and malformed JSON get the same error object as everything else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from nanovlm_cli.serving.page import chat_page
from nanovlm_cli.serving.schema import APIError, parse_request
from nanovlm_cli.serving.service import Encoded, Service

logger = logging.getLogger(__name__)

FINISH = {"eos": "stop", "stop_string": "stop", "length": "length"}


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(service: Service, *, api_key: str | None = None) -> FastAPI:
    """The app serving `service`; with `api_key`, every /v1 route wants `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="nanovlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_error_handlers(app)

    def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>' with the key given "
                                "to --api-key", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_id, "queued": service.batcher.pending,
                "batches": service.batcher.batches}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": service.created,
                                            "owned_by": "nanovlm"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(chat_page(service.model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        body = await _read_json(request, service.limits.max_body_bytes)
        # image decoding and tokenising are CPU work: off the event loop
        encoded = await run_in_threadpool(lambda: service.encode(parse_request(body, service.limits)))
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if encoded.request.stream:
            return _stream(service, encoded, completion_id)
        return await _complete(service, encoded, completion_id)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal, ours or the router's (404, 405), as the OpenAI error object."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc: Exception) -> JSONResponse:
        return _error(APIError(404, f"no route {request.method} {request.url.path}; see /v1/chat/completions, "
                                    "/v1/models, /health", code="unknown_url"))

    @app.exception_handler(405)
    async def _not_allowed(request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(405, f"{request.method} is not allowed on {request.url.path}").body(), 405)


async def _read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON; 413 past `limit` bytes (declared or streamed), 400 when not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, more than {limit} (--max-body-bytes)",
                       code="body_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise APIError(413, f"the request body is more than {limit} bytes (--max-body-bytes)",
                           code="body_too_large")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from exc


async def _complete(service: Service, encoded: Encoded, completion_id: str) -> dict[str, Any]:
    """A whole `chat.completion`: the job is queued, and awaited without blocking the event loop."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()
    service.submit(encoded, on_done=lambda job: loop.call_soon_threadsafe(
        lambda: finished.done() or finished.set_result(job)))
    job = await finished
    if job.error is not None:
        raise APIError(500, f"generation failed: {job.error}", code="generation_failed")
    choices = [{"index": k, "message": {"role": "assistant", "content": text},
                "finish_reason": FINISH.get(job.finish_reasons[k], "stop"), "logprobs": None}
               for k, text in enumerate(job.texts)]
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": service.model_id, "choices": choices, "usage": _usage(encoded, job.new_tokens),
            "system_fingerprint": None}


def _usage(encoded: Encoded, new_tokens: list[int]) -> dict[str, int]:
    completion = sum(new_tokens)
    return {"prompt_tokens": encoded.prompt_tokens, "completion_tokens": completion,
            "total_tokens": encoded.prompt_tokens + completion}


def _stream(service: Service, encoded: Encoded, completion_id: str) -> StreamingResponse:
    """Server-sent events: a role chunk per choice, content deltas as tokens decode, a finish chunk per choice,
    a usage chunk when `stream_options.include_usage`, then `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    created = int(time.time())
    n = encoded.request.n

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": service.model_id, "choices": choices, "system_fingerprint": None}
        if encoded.request.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    service.submit(encoded, on_text=lambda k, piece: loop.call_soon_threadsafe(events.put_nowait, ("text", k, piece)),
                   on_done=lambda job: loop.call_soon_threadsafe(events.put_nowait, ("done", job, None)))

    async def sse():
        for k in range(n):
            yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while True:
            kind, a, b = await events.get()
            if kind == "text":
                yield chunk([{"index": a, "delta": {"content": b}, "finish_reason": None}])
                continue
            job = a
            if job.error is not None:
                err = APIError(500, f"generation failed: {job.error}", code="generation_failed")
                yield f"data: {json.dumps(err.body())}\n\n"
            else:
                for k in range(n):
                    yield chunk([{"index": k, "delta": {}, "finish_reason": FINISH.get(job.finish_reasons[k], "stop")}])
                if encoded.request.include_usage:
                    yield chunk([], _usage(encoded, job.new_tokens))
            yield "data: [DONE]\n\n"
            return

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
