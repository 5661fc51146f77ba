"""One answer row's streamed text: incremental detokenisation and stop strings, apart from the engine's tensors.

Main design choice: the whole answer is re-decoded at every token and only the new, final suffix is emitted, so a
character whose bytes span several tokens comes out whole and text that could start a stop string waits until it
cannot. Worked example, stop string "##": tokens "a", "#", "b" emit "a", "" (held: may start "##"), then "#b".
"""

from __future__ import annotations

from collections.abc import Callable


class RowOutput:
    """Tokens and text of one output row; streams new text with incremental detokenisation.

    The whole answer is re-decoded at every token and only the new suffix is emitted, so a character whose bytes
    span several tokens comes out whole (a trailing U+FFFD means "incomplete, wait"). With stop strings, text that
    could be the start of one is held back until it is known not to be. Without streaming and stop strings
    (`incremental` False) the text is decoded once, when the row finishes.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...], incremental: bool) -> None:
        self.decode, self.stop_strings, self.incremental = decode, stop_strings, incremental
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None

    def add(self, token: int) -> str:
        """Append `token`; return the newly final text (may be empty). Sets finish_reason on a stop string."""
        self.ids.append(token)
        if not self.incremental:
            return ""
        self.text = self.decode(self.ids)
        safe = len(self.text)
        for stop in self.stop_strings:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.finish_reason = self.text[:at], "stop_string"
                safe = at
                break
        else:
            if self.text.endswith("\ufffd"):
                safe = len(self.text.rstrip("\ufffd"))
            safe -= partial_stop_suffix(self.text[:safe], self.stop_strings)
        return self._emit(safe)

    def finish(self, reason: str) -> str:
        """Mark the row done (if not already); return whatever text was still held back."""
        self.finish_reason = self.finish_reason or reason
        if not self.incremental:
            self.text = self.decode(self.ids)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = self.text[self.emitted:upto]
        self.emitted = upto
        return piece


def partial_stop_suffix(text: str, stop_strings: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
