"""The model behind the HTTP layer: a validated `ChatRequest` becomes a queued batcher `Job`; no HTTP here.

Main design choice: everything that can fail for one request (images, the chat template, the context length, the
sampling values) is checked here, in the request's own thread, before the job is queued, so the batch it joins
can only fail for reasons that are the server's (a bug, broken weights), never another client's input.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from nanovlm_cli.errors import GenerationError, NanoVLMError
from nanovlm_cli.serving.batcher import Batcher, Job, PieceCallback
from nanovlm_cli.serving.schema import APIError, ChatRequest, Limits

logger = logging.getLogger(__name__)


@dataclass
class Encoded:
    """A request ready to queue, with what the response needs to report."""

    request: ChatRequest
    sample: Any
    sampling: Any
    prompt_tokens: int


class Service:
    """One loaded model, its engine and batcher, and the limits every request is checked against."""

    def __init__(self, model: Any, processor: Any, *, model_id: str, limits: Limits | None = None,
                 max_batch: int = 16, compile: bool = False) -> None:
        from nanovlm_cli.generation import Engine

        self.model, self.processor, self.model_id = model, processor, model_id
        self.limits = limits or Limits()
        self.context = int(model.cfg.language.max_position_embeddings)
        self.max_images = min(self.limits.max_images, int(model.cfg.max_images_per_sample))
        self.engine = Engine(model, processor, compile=compile)
        self.batcher = Batcher(self.engine, queue_size=self.limits.queue_size, max_batch=max_batch)
        self.created = int(time.time())

    @classmethod
    def from_checkpoint(cls, checkpoint: str, *, device: str = "auto", dtype: str = "auto",
                        limits: Limits | None = None, max_batch: int = 16, compile: bool = False,
                        model_id: str | None = None) -> Service:
        """Load `checkpoint` (a directory or Hub id) as `nanovlm generate` does."""
        from nanovlm_cli.checkpoint.io import load_model
        from nanovlm_cli.data.processor import Processor
        from nanovlm_cli.devices import resolve_device, resolve_dtype

        torch_device = resolve_device(device)
        loaded = load_model(checkpoint, device=torch_device, dtype=resolve_dtype(dtype, torch_device))
        name = model_id or str(checkpoint).rstrip("/")
        return cls(loaded.model, Processor(loaded.cfg, loaded.tokenizer), model_id=name, limits=limits,
                   max_batch=max_batch, compile=compile)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id:
            raise APIError(404, f"model {name!r} is not served here; this server serves {self.model_id!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def encode(self, request: ChatRequest) -> Encoded:
        """The request as a prompt sample and a SamplingConfig; APIError (400) for anything that does not fit."""
        from nanovlm_cli.generation import SamplingConfig

        self.check_model(request.model)
        if len(request.images) > self.max_images:
            raise APIError(400, f"too many images: {len(request.images)}, this model takes at most {self.max_images} "
                                "per request", param="messages", code="too_many_images")
        try:
            sample = self.processor.encode_prompt(request.messages, request.images)
        except NanoVLMError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from exc
        room = self.context - len(sample)
        if room < 1:
            raise APIError(400, f"the prompt has {len(sample)} tokens (image tokens included), the model's context is "
                                f"{self.context}; shorten the conversation or send fewer images", param="messages",
                           code="context_length_exceeded")
        if request.max_tokens is not None and request.max_tokens > room:
            raise APIError(400, f"max_tokens={request.max_tokens} does not fit: the prompt has {len(sample)} tokens and "
                                f"the context is {self.context}, so at most {room} new tokens", param="max_tokens",
                           code="context_length_exceeded")
        max_new = request.max_tokens or min(room, self.limits.max_tokens)
        try:
            sampling = SamplingConfig(max_new_tokens=max_new, temperature=request.temperature, top_p=request.top_p,
                                      num_generations=request.n, seed=request.seed, stop_strings=request.stop)
        except GenerationError as exc:
            raise APIError(400, str(exc)) from exc
        return Encoded(request, sample, sampling, len(sample))

    def submit(self, encoded: Encoded, on_text: PieceCallback | None = None, on_done: Any = None) -> Job:
        return self.batcher.submit(Job(encoded.sample, encoded.sampling, on_text=on_text, on_done=on_done))

    def close(self) -> None:
        self.batcher.close()
