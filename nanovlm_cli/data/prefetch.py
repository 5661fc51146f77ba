"""The loader's threads: a producer that builds windows ahead of the consumer, and a pool that encodes records.

Both run as daemon threads and can be *abandoned*: when a run stops on an error or a signal, a thread may be stuck
in a read that never returns (a dead network mount), so closing waits for them only `ABANDON_GRACE_S` seconds
instead of forever. Neither can change the order of what the loader yields: results come back in input order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["ABANDON_GRACE_S", "EncodePool", "join_threads", "prefetch"]

T = TypeVar("T")
_END = object()

# Abandoned threads still get this long to finish the record in hand: a daemon thread left inside a torch op when
# the interpreter exits can abort the process ("terminate called without an active exception"); only a read that
# is truly stuck is left behind.
ABANDON_GRACE_S = 2.0


def join_threads(threads: list[threading.Thread], timeout: float | None) -> None:
    """Join `threads`, all within `timeout` seconds together (None: wait as long as it takes)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


class EncodePool:
    """`map` over `n` daemon threads, results in order. Unlike ThreadPoolExecutor's workers, daemon threads never
    hold the process at exit, so a read stuck on a dead mount cannot keep a stopped run alive."""

    def __init__(self, n: int) -> None:
        self._tasks: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name=f"nanovlm-encode-{i}", daemon=True)
                         for i in range(n)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            fn, item, future = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(item))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller of map, which re-raises it
                future.set_exception(exc)

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        futures = []
        for item in items:
            future: Future = Future()
            self._tasks.put((fn, item, future))
            futures.append(future)
        return [future.result() for future in futures]

    def shutdown(self, wait: bool) -> None:
        """Cancel what has not started, stop the threads; wait for them only when `wait`."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[2].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        join_threads(self._threads, None if wait else ABANDON_GRACE_S)


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put `item` on `q`, waiting while it is full; False when `stop` was set before it went in."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def prefetch(windows: Iterator[T], depth: int, abandon: threading.Event) -> Iterator[T]:
    """Run `windows` in a producer thread, `depth` windows ahead; stops the producer when closed, and waits for it
    unless `abandon` is set (as it is when the consumer leaves on an error or a signal)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in windows:
                if not _put(q, item, stop) or stop.is_set():
                    return
            item = _END
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            item = exc
        _put(q, item, stop)

    thread = threading.Thread(target=produce, name="nanovlm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    except GeneratorExit:
        raise
    except BaseException:
        abandon.set()
        raise
    finally:
        stop.set()
        join_threads([thread], ABANDON_GRACE_S if abandon.is_set() else None)
