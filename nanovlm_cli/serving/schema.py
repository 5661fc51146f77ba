"""The OpenAI chat-completions request, validated: a JSON body becomes a `ChatRequest` or an `APIError`.

Main design choice: validation is plain Python over the decoded JSON (no pydantic models), so every message names
the exact field (`messages[1].content[0].image_url.url`) and this module imports neither FastAPI nor torch; the
HTTP layer only maps `APIError.status` onto the response. Images are decoded here, with the same loader
`nanovlm generate` uses (`data.images.load_image`), after the byte and pixel limits are checked from the header.

Image parts are moved in front of the text of their message (keeping their order): that is where the model was
trained to see them (upstream nanoVLM and `nanovlm generate` put a user turn's images first), so a client that
sends [text, image] gets the same answer as one that sends [image, text].
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from nanovlm_cli.errors import NanoVLMError

ROLES = ("system", "user", "assistant")


class APIError(NanoVLMError):
    """A request the server refuses: an HTTP status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 503: "server_error", 500: "server_error"}.get(
                                 status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is a `nanovlm serve` flag with this default."""

    max_images: int = 4  # per request (also capped by the model's max_images_per_sample)
    max_image_pixels: int = 16_000_000  # width * height of one image
    max_image_bytes: int = 10_000_000  # encoded size of one image
    max_body_bytes: int = 20_000_000
    max_tokens: int = 1024  # the most new tokens a request may ask for
    max_n: int = 8
    queue_size: int = 64  # requests waiting (not yet decoding); more get 503
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0


@dataclass
class ChatRequest:
    """A validated request: HF chat messages ({"type": "image"} parts) plus the decoded images, and sampling."""

    model: str | None
    messages: list[dict[str, Any]]
    images: list[Any]  # PIL images, in the order of the image parts
    max_tokens: int | None  # None: as many as the context and the cap allow
    temperature: float = 1.0
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _bad(message: str, param: str | None, code: str | None = "invalid_value", status: int = 400) -> APIError:
    return APIError(status, message, param=param, code=code)


def _number(body: dict, key: str, *, lo: float, hi: float, integer: bool = False) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise _bad(f"'{key}' must be {kind}, got {type(value).__name__} {value!r:.40}", key, "invalid_type")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _bad(f"'{key}'={value} is out of range; it must be between {lo:g} and {hi:g}", key)
    return value


def parse_request(body: Any, limits: Limits) -> ChatRequest:
    """Validate a decoded JSON body (see the module docstring); raises `APIError` naming the field."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {type(model).__name__}", "model", "invalid_type")
    raw_messages = body.get("messages")
    if raw_messages is None:
        raise _bad("'messages' is required: a non-empty list of {role, content}", "messages", "missing_required")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _bad("'messages' must be a non-empty list of {role, content}", "messages", "invalid_type")
    images: list[Any] = []
    messages = [_parse_message(message, f"messages[{i}]", images, limits) for i, message in enumerate(raw_messages)]
    if messages[-1]["role"] == "assistant":
        raise _bad("the last message is the assistant's; end with a user (or system) message to be answered",
                   f"messages[{len(messages) - 1}].role")
    return ChatRequest(model=model, messages=messages, images=images, **_parse_sampling(body, limits))


def _parse_message(message: Any, where: str, images: list[Any], limits: Limits) -> dict[str, Any]:
    """One message as HF chat parts, its images first; the decoded images are appended to `images`."""
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role is {role!r}; use one of {', '.join(ROLES)}", f"{where}.role")
    content = message.get("content")
    parts: list[dict[str, Any]] = []
    pictures: list[dict[str, Any]] = []
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        parts.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{at}.text must be a string", f"{at}.text", "invalid_type")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if len(images) >= limits.max_images:
                    raise _bad(f"too many images: more than {limits.max_images} in this request (the limit "
                               "is --max-images)", at, "too_many_images")
                images.append(load_request_image(part.get("image_url"), f"{at}.image_url", limits))
                pictures.append({"type": "image"})
            else:
                raise _bad(f"{at} has type {kind!r}; parts must be 'text' or 'image_url'", f"{at}.type")
    else:
        raise _bad(f"{where}.content must be a string or a list of parts, got {type(content).__name__}",
                   f"{where}.content", "invalid_type")
    return {"role": role, "content": pictures + parts}


def _parse_sampling(body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The `ChatRequest` fields after the messages: token budget, sampling, stop strings, streaming."""
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _bad("give 'max_tokens' or 'max_completion_tokens', not both", "max_tokens")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, lo=1, hi=limits.max_tokens, integer=True)
    temperature = _number(body, "temperature", lo=0, hi=2)
    top_p = _number(body, "top_p", lo=0, hi=1)
    if top_p == 0:
        raise _bad("'top_p'=0 keeps no token; use a value in (0, 1]", "top_p")
    seed = _number(body, "seed", lo=-(2 ** 63), hi=2 ** 63 - 1, integer=True)
    n = _number(body, "n", lo=1, hi=limits.max_n, integer=True)
    stops = _parse_stop(body.get("stop"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad(f"'stream' must be true or false, got {stream!r:.40}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    return {"max_tokens": None if max_tokens is None else int(max_tokens),
            "temperature": 1.0 if temperature is None else float(temperature),
            "top_p": None if top_p is None else float(top_p), "stop": stops,
            "seed": None if seed is None else int(seed), "n": 1 if n is None else int(n), "stream": bool(stream),
            "include_usage": bool(options.get("include_usage", False))}


def _parse_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise _bad("'stop' must be a string or a list of at most 4 strings", "stop", "invalid_type")


# ----------------------------------------------------------------------------------------------------------------
# Images


def load_request_image(value: Any, param: str, limits: Limits) -> Any:
    """An `image_url` part's image as an RGB PIL image: a `data:` base64 URL, or http(s) with the flag."""
    url = value.get("url") if isinstance(value, dict) else value if isinstance(value, str) else None
    if not isinstance(url, str) or not url:
        raise _bad(f"{param}.url must be a string (a data: URL)", f"{param}.url", "invalid_type")
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep or ";base64" not in header:
            raise _bad(f"{param}.url is a data: URL without ';base64,'; send data:image/png;base64,<data>",
                       f"{param}.url", "invalid_image_url")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise _bad(f"{param}: the image is larger than {limits.max_image_bytes} bytes (--max-image-bytes)",
                       f"{param}.url", "image_too_large", 413)
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad(f"{param}.url holds broken base64 ({exc})", f"{param}.url", "invalid_base64") from exc
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise _bad(f"{param}.url is a remote URL; this server reads images from data: URLs only (start it with "
                       "--allow-remote-images to fetch http(s) images)", f"{param}.url", "remote_images_disabled")
        data = _fetch(url, f"{param}.url", limits)
    else:
        raise _bad(f"{param}.url must be a data: URL (or http(s) with --allow-remote-images); local paths and other "
                   f"schemes are never read, got {url[:40]!r}", f"{param}.url", "invalid_image_url")
    return decode_image(data, f"{param}.url", limits)


def _fetch(url: str, param: str, limits: Limits) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:
            data = response.read(limits.max_image_bytes + 1)
    except Exception as exc:
        raise _bad(f"{param}: could not fetch {url[:80]} ({exc})", param, "image_fetch_failed") from exc
    if len(data) > limits.max_image_bytes:
        raise _bad(f"{param}: the image is larger than {limits.max_image_bytes} bytes (--max-image-bytes)",
                   param, "image_too_large", 413)
    return data


def decode_image(data: bytes, param: str, limits: Limits) -> Any:
    """Bytes -> RGB PIL image; the pixel limit is checked from the header, before any pixel is decoded."""
    from PIL import Image

    from nanovlm_cli.data.images import load_image
    from nanovlm_cli.errors import ImageError

    if len(data) > limits.max_image_bytes:
        raise _bad(f"{param}: the image is larger than {limits.max_image_bytes} bytes (--max-image-bytes)",
                   param, "image_too_large", 413)
    try:
        width, height = Image.open(io.BytesIO(data)).size
    except Exception as exc:  # noqa: BLE001 - not an image: the loader's message below says so
        width = height = 0
        del exc
    if width * height > limits.max_image_pixels:
        raise _bad(f"{param}: the image is {width}x{height} = {width * height} pixels, more than "
                   f"{limits.max_image_pixels} (--max-image-pixels)", param, "image_too_large", 413)
    try:
        return load_image(data, name="the image")
    except ImageError as exc:
        raise _bad(f"{param}: {exc}", param, "invalid_image") from exc
