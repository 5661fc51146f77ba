"""A dynamic batcher: one thread owns the `Engine`; requests queue up and join the next batch.

Main design choice: batches are formed per *sampling key*. `Engine.generate` takes one `SamplingConfig` for the
whole batch and one `torch.Generator`, so only jobs that would compute the same thing together may share a call:
greedy jobs with the same max_new_tokens and stop strings batch together (the engine's left padding makes a padded
prompt compute what it computes alone, so each answer equals its solo answer), unseeded sampled jobs batch with
identical settings, and a seeded sampled job runs alone, so the same seed gives the same answers whatever else is
queued. While a batch decodes, new jobs wait in the queue; the next loop takes the oldest job and every queued job
with its key (up to `max_batch`), so throughput grows with the number of clients.

Worked example, queue [g32, s, g32, g16] (g32 greedy 32 tokens, s seeded sampled): batch 1 = [g32, g32],
batch 2 = [s], batch 3 = [g16].

When the previous batch was shared, the batcher waits up to `batch_window_s` (20 ms) for the clients it just
answered to send their next request, stopping as soon as they have (queued + just answered); without it, clients
settle into two cohorts that alternate half batches (measured: 16 clients ran as batches of 7 and 9). A lone
client's request starts at once.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanovlm_cli.serving.schema import APIError

logger = logging.getLogger(__name__)

# on_text(choice_index, piece) for streaming; called on the batcher thread.
PieceCallback = Callable[[int, str], None]


@dataclass
class Job:
    """One request's encoded prompt and sampling, and, once done, its result (or error)."""

    sample: Any  # a data.sample.Sample
    sampling: Any  # a generation.SamplingConfig (num_generations = the request's n)
    on_text: PieceCallback | None = None
    texts: list[str] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[Job], None] | None = None  # called on the batcher thread after `done` is set
    _unique: int = field(default_factory=itertools.count().__next__)

    @property
    def key(self) -> tuple:
        s = self.sampling
        if s.is_greedy:
            return ("greedy", s.max_new_tokens, s.stop_strings, s.num_generations)
        if s.seed is not None:
            return ("seeded", self._unique)
        return ("sampled", s.max_new_tokens, s.stop_strings, s.num_generations, s.temperature, s.top_k, s.top_p)

    def wait(self, timeout: float | None = None) -> Job:
        self.done.wait(timeout)
        return self


class Batcher:
    """Owns `engine` on one thread; `submit` queues a job (503 when full), `close` drains and stops."""

    def __init__(self, engine: Any, *, queue_size: int = 64, max_batch: int = 16, batch_window_s: float = 0.02) -> None:
        self.engine, self.queue_size, self.max_batch = engine, queue_size, max_batch
        self.batch_window_s = batch_window_s
        self._last_size = 1
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.batches = 0  # how many engine calls ran (tests and logs read it)
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="nanovlm-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closing:
                raise APIError(503, "the server is shutting down; retry on another instance", code="shutting_down")
            if len(self._queue) >= self.queue_size:
                raise APIError(503, f"the request queue is full ({self.queue_size} waiting, --queue-size); retry "
                                    "in a moment", code="queue_full")
            self._queue.append(job)
            self._cond.notify()
        return job

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting; finish every queued job; stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.sampling.num_generations
            # Clients that were just answered need a moment to send their next request; when the last batch was
            # shared (several clients are active), wait up to `batch_window_s` for them. A lone client never waits.
            deadline = time.monotonic() + (self.batch_window_s if self._last_size > 1 else 0.0)
            target = 1 + len(self._queue) + self._last_size  # those waiting + those just answered
            while True:
                for job in list(self._queue):
                    if rows >= self.max_batch:
                        break
                    if job.key == first.key:
                        self._queue.remove(job)
                        batch.append(job)
                        rows += job.sampling.num_generations
                left = deadline - time.monotonic()
                if rows >= self.max_batch or len(batch) >= target or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            self._last_size = len(batch)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.batches += 1
            self.batch_sizes.append(len(batch))
            started = time.perf_counter()
            try:
                self._run(batch)
                logger.debug("batch of %d request(s) in %.3f s, %d queued", len(batch),
                             time.perf_counter() - started, self.pending)
            except BaseException as exc:
                logger.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    job.error = exc
            for job in batch:
                job.done.set()
                if job.on_done is not None:
                    try:
                        job.on_done(job)
                    except Exception:
                        logger.exception("a finished job's callback failed")

    def _run(self, batch: list[Job]) -> None:
        n = batch[0].sampling.num_generations
        owners = [(job, k) for job in batch for k in range(n)]  # output row -> (job, choice index)

        def on_text(row: int, piece: str) -> None:
            job, k = owners[row]
            if job.on_text is not None:
                job.on_text(k, piece)

        streaming = any(job.on_text is not None for job in batch)
        result = self.engine.generate([job.sample for job in batch], batch[0].sampling,
                                      on_text=on_text if streaming else None)
        for row, (job, _k) in enumerate(owners):
            job.texts.append(result.texts[row])
            job.new_tokens.append(result.new_tokens[row])
            job.finish_reasons.append(result.finish_reasons[row])
