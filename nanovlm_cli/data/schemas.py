"""Dataset schemas: one raw row (a dict) -> one lazy `Record`, whatever the dataset's layout.

Detected per row, so mixtures work: the_cauldron / FineVision (`images` + `texts` of {"user", "assistant"}, optional
per-turn quality ratings), LLaVA (`image` + `conversations` with "<image>" placeholders) and plain chat (`messages`
in the Hugging Face chat format). Main design choice: a row that cannot be used raises `RecordError` with a
`reason` (the skip-counter key) instead of being dropped here, so the consumer counts it exactly once. Images are
never decoded here: paths are resolved against an image root, bytes and {"bytes", "path"} dicts pass through.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from nanovlm_cli.data.sample import ImageSource, Record
from nanovlm_cli.errors import DataError

# FineVision's per-turn quality ratings (1-5), one list entry per entry of `texts`.
RATING_COLUMNS = ("relevance_ratings", "image_correspondence_ratings", "visual_dependency_ratings",
                  "formatting_ratings")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"

class RecordError(DataError):
    """A row that cannot become a Record; `reason` is the skip-counter key ("missing_field", "low_rating", ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason



def _resolve_image(item: Any, image_root: str | None) -> ImageSource:
    """Paths are made absolute against `image_root`; bytes, PIL images and {"bytes", "path"} dicts stay as they are."""
    if isinstance(item, dict) and item.get("bytes") is None and item.get("path"):
        item = item["path"]
    if isinstance(item, str) and image_root is not None and not os.path.isabs(item):
        return os.path.join(image_root, item)
    return item


def _image_list(value: Any, image_root: str | None) -> list[ImageSource]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_resolve_image(item, image_root) for item in items if item is not None]


def _turn_rated_ok(row: Mapping[str, Any], turn: int, min_rating: int | None) -> bool:
    if min_rating is None:
        return True
    for column in RATING_COLUMNS:
        ratings = row.get(column)
        rating = ratings[turn] if isinstance(ratings, (list, tuple)) and turn < len(ratings) else ratings
        if isinstance(rating, (int, float)) and rating < min_rating:
            return False
    return True


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _cauldron(row: Mapping[str, Any], index: int, image_root: str | None, min_rating: int | None) -> Record:
    """the_cauldron / FineVision: `images` list + `texts` list of {"user", "assistant"}; images open the first turn."""
    turns = row["texts"]
    if not turns:
        raise RecordError("missing_field", f"row {index}: 'texts' is empty; every row needs at least one turn")
    kept = [i for i in range(len(turns)) if _turn_rated_ok(row, i, min_rating)]
    if not kept:
        raise RecordError("low_rating", f"row {index}: every turn is rated below min_rating={min_rating}")
    images = _image_list(row.get("images"), image_root)
    messages: list[dict[str, Any]] = []
    for n, i in enumerate(kept):
        turn = turns[i] or {}
        user, assistant = turn.get("user"), turn.get("assistant")
        if user is None or assistant is None:
            raise RecordError("missing_field", f"row {index}: turn {i} lacks 'user' or 'assistant'")
        image_parts = [{"type": "image"} for _ in images] if n == 0 else []
        messages.append({"role": "user", "content": [*image_parts, _text(user)]})
        messages.append({"role": "assistant", "content": [_text(assistant)]})
    meta = {"source": row["source"]} if isinstance(row.get("source"), str) else {}
    return Record(messages, images, index, meta)


def _split_placeholders(value: str) -> list[dict[str, str]]:
    """"<image>\\nWhat is it?" -> [image part, text part "What is it?"] (newlines next to a placeholder dropped)."""
    pieces = value.split(IMAGE_PLACEHOLDER)
    parts: list[dict[str, str]] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append({"type": "image"})
        piece = piece.strip("\n") if len(pieces) > 1 else piece
        if piece:
            parts.append(_text(piece))
    return parts


def _llava(row: Mapping[str, Any], index: int, image_root: str | None) -> Record:
    """LLaVA: `image` (a path or a list) + `conversations` of {"from", "value"} with "<image>" placeholders."""
    conversations = row["conversations"]
    if not conversations:
        raise RecordError("missing_field", f"row {index}: 'conversations' is empty")
    images = _image_list(row.get("image", row.get("images")), image_root)
    messages = []
    for i, turn in enumerate(conversations):
        role, value = LLAVA_ROLES.get((turn or {}).get("from", "")), (turn or {}).get("value")
        if role is None or value is None:
            raise RecordError("missing_field", f"row {index}: conversation turn {i} lacks a known 'from' or a 'value'")
        messages.append({"role": role, "content": _split_placeholders(value)})
    meta = {"id": row["id"]} if isinstance(row.get("id"), (str, int)) else {}
    return _attach_images(messages, images, index, meta)


def _chat(row: Mapping[str, Any], index: int, image_root: str | None) -> Record:
    """Plain chat: `messages` of {"role", "content"} (a string or parts) + `images` (or `image`), or inline images."""
    messages, inline = [], []
    for i, message in enumerate(row["messages"] or []):
        role, content = (message or {}).get("role"), (message or {}).get("content")
        if role is None or content is None:
            raise RecordError("missing_field", f"row {index}: message {i} lacks 'role' or 'content'")
        if isinstance(content, str):
            messages.append({"role": role, "content": [_text(content)]})
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                parts.append({"type": "image"})
                source = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
                if source is not None:
                    inline.append(source)
            elif part.get("text") is not None:
                parts.append(_text(part["text"]))
        messages.append({"role": role, "content": parts})
    if not messages:
        raise RecordError("missing_field", f"row {index}: 'messages' is empty")
    images = _image_list(row.get("images", row.get("image")), image_root) or _image_list(inline, image_root)
    return _attach_images(messages, images, index, {})


def _attach_images(messages: list[dict[str, Any]], images: list[ImageSource], index: int,
                   meta: dict[str, Any]) -> Record:
    """Images without a slot in the text open the first user turn (LLaVA convention); extra slots are an error."""
    n_slots = sum(part["type"] == "image" for m in messages for part in m["content"])
    if n_slots > len(images):
        raise RecordError("image_count_mismatch",
                          f"row {index}: {n_slots} image placeholder(s) but {len(images)} image(s); fix the row")
    missing = len(images) - n_slots
    if missing:
        first_user = next((m for m in messages if m["role"] == "user"), messages[0])
        first_user["content"] = [{"type": "image"} for _ in range(missing)] + first_user["content"]
    return Record(messages, images, index, meta)


def row_to_record(row: Mapping[str, Any], index: int, *, image_root: str | None = None,
                  min_rating: int | None = None) -> Record:
    """Detect the row's schema and build a Record; raises RecordError (reason "missing_field", ...) otherwise."""
    if not isinstance(row, Mapping):
        raise RecordError("missing_field", f"row {index} is a {type(row).__name__}, not an object with fields")
    if row.get("messages") is not None:
        return _chat(row, index, image_root)
    if row.get("conversations") is not None:
        return _llava(row, index, image_root)
    if row.get("texts") is not None:
        return _cauldron(row, index, image_root, min_rating)
    raise RecordError("missing_field", f"row {index} has none of 'messages', 'conversations', 'texts' "
                                       f"(fields: {', '.join(map(str, row)) or 'none'})")
