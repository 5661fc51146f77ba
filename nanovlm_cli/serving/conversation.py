"""A multi-turn conversation kept within the model's context: what `nanovlm chat` runs on.

Main design choice: the history is Hugging Face chat messages (`{"type": "image"}` parts, images beside them) and
is re-encoded whole for every answer, with the same `Processor.encode_prompt` that `generate` and `serve` use.
When prompt + answer would not fit the context, the oldest user/assistant exchange (and its images) is dropped,
a system message is kept; `prompt` reports how many exchanges were dropped so the caller can say so.

Worked example, context 100, max_new_tokens 40: history [sys 5, u1 30, a1 20, u2 30] = 85 + 40 > 100 -> drop
(u1, a1) -> [sys 5, u2 30] = 35 + 40 fits; dropped = 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanovlm_cli.errors import GenerationError


@dataclass
class Prompt:
    sample: Any  # the encoded prompt (data.sample.Sample)
    dropped: int  # exchanges dropped from the front of the history to fit the context


@dataclass
class Conversation:
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # PIL images, in the order of the image parts
    image_names: list[str] = field(default_factory=list)  # where each came from (for /save)
    pending: list[tuple[Any, str]] = field(default_factory=list)  # attached, waiting for the next user message

    def attach(self, image: Any, name: str) -> None:
        self.pending.append((image, name))

    def add_user(self, text: str) -> None:
        parts = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]
        self.images += [image for image, _ in self.pending]
        self.image_names += [name for _, name in self.pending]
        self.pending = []
        self.messages.append({"role": "user", "content": parts})

    def add_assistant(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})

    def reset(self) -> None:
        self.messages, self.images, self.image_names, self.pending = [], [], [], []

    def _all(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        return system + self.messages

    def _drop_oldest(self) -> None:
        """Drop the first user message and the assistant reply after it, with their images."""
        cut = 1
        while cut < len(self.messages) and self.messages[cut]["role"] != "user":
            cut += 1
        n_images = sum(p.get("type") == "image" for m in self.messages[:cut] for p in m["content"])
        self.messages = self.messages[cut:]
        self.images, self.image_names = self.images[n_images:], self.image_names[n_images:]

    def prompt(self, processor: Any, max_new_tokens: int, context: int) -> Prompt:
        """The history encoded for the next answer, oldest exchanges dropped until prompt + answer fit."""
        dropped = 0
        while True:
            sample = processor.encode_prompt(self._all(), list(self.images))
            if len(sample) + max_new_tokens <= context:
                return Prompt(sample, dropped)
            if len(self.messages) <= 1:
                raise GenerationError(f"the message has {len(sample)} tokens (image tokens included); with "
                                      f"--max-new-tokens {max_new_tokens} it does not fit the model's context of "
                                      f"{context}: shorten it, attach fewer images or lower --max-new-tokens")
            self._drop_oldest()
            dropped += 1

    def to_json(self) -> list[dict[str, Any]]:
        """The conversation as Hugging Face chat messages; image parts carry the path they were read from."""
        names = iter(self.image_names)
        out = []
        for message in self._all():
            parts = [{"type": "image", "path": next(names)} if p.get("type") == "image" and message["role"] != "system"
                     else dict(p) for p in message["content"]]
            out.append({"role": message["role"], "content": parts})
        return out

    def save(self, path: str | Path) -> Path:
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")
        return target
