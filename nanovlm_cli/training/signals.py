"""Ctrl-C and SIGTERM during training: finish the step and save, or stop at once where nothing is lost.

Main design choice: one handler covers the whole run, and the loop says which phase it is in. While a step runs
(forward, backward, optimizer, validation, a checkpoint save), a signal only sets `requested`; the loop finishes
the step, saves a checkpoint and returns a summary with `interrupted_by` set. Everywhere else (building the model
and data, waiting for the next batch, the end-of-run evaluation) nothing is half done, so the handler raises
`TrainingInterrupted` at once: a data loader that finds nothing usable, or a slow download, cannot make the process
deaf to SIGTERM. A second signal always raises at once. The CLI turns either outcome into exit code 128 + the
signal number (130 for Ctrl-C, 143 for SIGTERM), so `nanovlm train ... && nanovlm push ...` never publishes a
half-trained model.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any, Self

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by the handler when a signal arrives outside a step, or a second time (`forced`: stop now, even
    mid-step). A KeyboardInterrupt, so `except Exception` lets it through. `exit_code` is 128 + the signal."""

    def __init__(self, signum: int, forced: bool = False) -> None:
        super().__init__(signal_name(signum))
        self.signum, self.forced = signum, forced

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopFlag:
    """The run's SIGINT/SIGTERM handler (see the module docstring). Outside the main thread it handles nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self._immediate = True  # outside a step: raise at once
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> Self:
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread): no signal handling
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self._immediate or not first:
            raise TrainingInterrupted(signum, forced=not first)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A phase a signal must not cut short (a step, a save): it only sets `requested` until the phase ends."""
        previous, self._immediate = self._immediate, False
        try:
            yield
        finally:
            self._immediate = previous

    def hold(self) -> None:
        """From now on a signal only sets `requested` (until `release`): for the end of a run, whose last save
        must finish."""
        self._immediate = False

    def release(self) -> None:
        """Back to stopping at once on a signal (after `hold`)."""
        self._immediate = True

    def raise_if_requested(self) -> None:
        """Stop now if a signal came during a deferred phase (for the places that cannot save first)."""
        if self.signum is not None:
            raise TrainingInterrupted(self.signum)
