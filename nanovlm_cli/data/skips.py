"""Counting the rows a run could not use: `SkipCounter`, by reason, exact across resumes and ranks.

The loader owns the counting (it counts a skip exactly when it consumes the row, so resumed runs agree with
uninterrupted ones); sources and packing only add to the counter they are handed. It is a module of its own, and
not part of `loader.py`, because packing (which the loader imports) counts the samples it cannot place too.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

__all__ = ["SkipCounter"]


class SkipCounter:
    """Skipped rows by reason. Thread-safe, mergeable, saveable (plain dict of ints) and summable across ranks."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self._counts: dict[str, int] = dict(counts or {})
        self._lock = threading.Lock()

    def add(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + int(n)

    def merge(self, other: SkipCounter | Mapping[str, int]) -> None:
        for reason, n in (other.as_dict() if isinstance(other, SkipCounter) else other).items():
            self.add(reason, n)

    def __getitem__(self, reason: str) -> int:
        return self._counts.get(reason, 0)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))

    def state_dict(self) -> dict[str, int]:
        return self.as_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        with self._lock:
            self._counts = {str(k): int(v) for k, v in state.items()}

    def all_reduced(self) -> SkipCounter:
        """The counts summed over every rank (a collective: call it on all ranks); a copy when not distributed."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return SkipCounter(self.as_dict())
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.as_dict())
        total = SkipCounter()
        for counts in gathered:
            total.merge(counts)
        return total

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
