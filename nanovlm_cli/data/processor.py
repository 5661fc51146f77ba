"""The processor: a `Record` (chat messages + images) becomes a `Sample` (token ids, labels, image views).

Main design choice: the conversation is rendered into pieces (`tokenizer.render_chat`) and tokenised piece by
piece, so the supervised span is known exactly (assistant content + its end-of-turn token) instead of being
searched for in a rendered string, and message text is tokenised with special-token strings split, so text can
never create an image slot. Labels are aligned with `input_ids` (label[t] is input_ids[t] or -100); the loss
shifts them, as in Hugging Face models.

Each image slot expands to upstream nanoVLM's image string (`get_image_string`), built directly as ids:
    fixed / aspect:          <|image|> * n
    tiles, grid 1x1:         <|global_image|> <|image|> * n
    tiles, grid 2x2:         <|global_image|> <|image|> * n  <row_1_col_1> <|image|> * n  ...  <row_2_col_2> <|image|> * n
and, when a record has several images, each string is preceded by the text "<image: k>" (k from 0).

The "idefics3" layout is Idefics3Processor's string instead (F = <fake_token_around_image>, G = <global-img>):
    grid 1x1 (not split):    F G <image> * n F
    grid 2x2:                F <row_1_col_1> <image> * n  F <row_1_col_2> <image> * n  "\n"  F <row_2_col_1> ...
                             <image> * n  "\n\n"  F G <image> * n F
With a "jinja" chat template (the checkpoint's own, e.g. SmolVLM's) transformers tokenises the whole rendered prompt
at once, so text that touches template text between two special tokens ("Assistant: " + "A cat") merges into the
same tokens; those runs are tokenised whole here too (with offsets, so labels stay exact: a token is supervised
when any of its characters is), and only the special tokens of the template are parsed.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import torch

from nanovlm_cli.config import VLMConfig
from nanovlm_cli.data.images import ProcessedImage, load_image, process_image
from nanovlm_cli.data.sample import Record, Sample
from nanovlm_cli.data.tokenizer import ROLES, ChatPiece, JinjaChat, Turn, end_of_turn_token, render_chat
from nanovlm_cli.errors import DataError, ImageError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
REASONS = ("unreadable_image", "no_supervised_tokens", "image_count_mismatch", "missing_field", "too_many_images")


class SampleError(DataError):
    """A record that cannot become a training sample; `reason` (one of REASONS) is for skip counters."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _turns(messages: Any, where: str) -> list[Turn]:
    """Validate HF chat messages and normalise them to Turns (image parts become slot indices 0, 1, ...)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise SampleError(f"{where} has no messages; a record needs a non-empty 'messages' list", "missing_field")
    turns, n_images = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise SampleError(f"{where}: message {i} lacks 'role' or 'content'; each message needs both",
                              "missing_field")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise SampleError(f"{where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}",
                              "missing_field")
        if content is None:
            content = ""
        if isinstance(content, str):
            parts: list[str | int] = [content]
        elif isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif kind == "image":
                    parts.append(n_images)
                    n_images += 1
                else:
                    raise SampleError(f"{where}: message {i} has a content part {str(part)[:60]!r}; parts must be "
                                      "{'type': 'text', 'text': str} or {'type': 'image'}", "missing_field")
        else:
            raise SampleError(f"{where}: message {i} content is {type(content).__name__}; use a string or a list "
                              "of parts", "missing_field")
        turns.append(Turn(role, tuple(parts)))
    return turns


class Processor:
    """Turns records into samples for one model config and tokenizer (see the module docstring)."""

    def __init__(self, cfg: VLMConfig, tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.image_token_id = self._special_id(cfg.image_token, vocab)
        self.global_image_token_id = (self._special_id(cfg.global_image_token, vocab)
                                      if cfg.global_image_token in cfg.extra_tokens else None)
        self._tile_ids = {tok: self._special_id(tok, vocab) for tok in cfg.tile_tokens}
        self.fake_image_token_id = (self._special_id(cfg.fake_image_token, vocab) if cfg.image.mode == "idefics3"
                                    else None)
        self._jinja = (JinjaChat(cfg.jinja_template or "", cfg.end_of_turn or "", cfg.image_token)
                       if cfg.chat_template == "jinja" else None)
        added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(re.escape(t) for t in added) + ")") if added else None
        stops = [tokenizer.eos_token_id, cfg.language.eos_token_id]
        eot = cfg.end_of_turn or end_of_turn_token(cfg.chat_template)
        if eot is not None and eot in vocab:
            stops.append(tokenizer.convert_tokens_to_ids(eot))
        self.stop_token_ids: list[int] = [i for i in dict.fromkeys(stops) if i is not None]
        self._cache: dict[tuple[str, bool], list[int]] = {}  # template pieces and "<image: k>" labels
        self._lock = threading.Lock()
        self._backends: dict[bool, Any] = {}  # split_specials -> private tokenizers.Tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            for split in (False, True):
                copy = Tokenizer.from_str(backend.to_str())
                copy.encode_special_tokens = split
                copy.no_truncation()
                copy.no_padding()
                self._backends[split] = copy

    @staticmethod
    def _special_id(token: str, vocab: dict[str, int]) -> int:
        if token not in vocab:
            raise DataError(f"the tokenizer has no token {token!r}; load it with nanovlm_cli.data.tokenizer."
                            "load_tokenizer(cfg), which adds the VLM's extra tokens")
        return int(vocab[token])

    # -- tokenisation -------------------------------------------------------------------------------------------

    def _ids(self, text: str, parse_specials: bool) -> list[int]:
        """Token ids of `text`; with parse_specials False, "<|im_end|>" typed in text stays plain text.

        Thread-safe (the loader encodes in a thread pool): fast tokenizers are encoded through two private copies of
        the Rust backend whose `encode_special_tokens` flag is fixed, never toggled on the shared tokenizer.
        """
        if parse_specials:
            key = (text, True)
            if key not in self._cache:
                self._cache[key] = self._encode(text, False)
            return self._cache[key]
        return self._encode(text, True)

    def _encode(self, text: str, split_specials: bool) -> list[int]:
        backend = self._backends.get(split_specials)
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        with self._lock:  # slow tokenizers: the flag lives on the shared tokenizer
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=split_specials)["input_ids"])

    def _idefics3_image_ids(self, image: ProcessedImage) -> list[int]:
        """Idefics3Processor's image string as ids (see the module docstring): tiles row by row, the global view last."""
        fake, run = self.fake_image_token_id, [self.image_token_id] * image.tokens_per_view[-1]
        ids: list[int] = []
        rows, cols = image.grid
        if (rows, cols) != (1, 1):
            for r in range(1, rows + 1):
                for c in range(1, cols + 1):
                    ids += [fake, self._tile_ids[f"<row_{r}_col_{c}>"], *run]
                ids += self._ids("\n" if r < rows else "\n\n", True)
        return ids + [fake, self.global_image_token_id, *run, fake]

    def image_token_ids(self, image: ProcessedImage, index: int, n_images: int) -> list[int]:
        """The token ids an image slot expands to (upstream nanoVLM's `get_image_string`, or Idefics3's)."""
        if self.cfg.image.mode == "idefics3":
            return self._idefics3_image_ids(image)
        ids: list[int] = self._ids(f"<image: {index}>", False) if n_images > 1 else []
        counts = iter(image.tokens_per_view)
        if image.has_global:
            ids += [self.global_image_token_id] + [self.image_token_id] * next(counts)
            if image.grid == (1, 1):
                return ids
        rows, cols = image.grid
        markers = self.cfg.image.mode == "tiles"
        for r in range(1, rows + 1):
            for c in range(1, cols + 1):
                if markers:
                    ids.append(self._tile_ids[f"<row_{r}_col_{c}>"])
                ids += [self.image_token_id] * next(counts)
        return ids

    def _images(self, sources: list[Any], where: str) -> list[ProcessedImage]:
        if len(sources) > self.cfg.max_images_per_sample:
            raise SampleError(f"{where} has {len(sources)} images, more than max_images_per_sample="
                              f"{self.cfg.max_images_per_sample}; raise it or drop the record", "too_many_images")
        out = []
        for k, src in enumerate(sources):
            try:
                out.append(process_image(load_image(src), self.cfg))
            except ImageError as exc:
                raise SampleError(f"{where}, image {k}: {exc}", "unreadable_image") from exc
        return out

    def _run_ids(self, run: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """(ids, labels) of text pieces that touch (no special token between them), tokenised as one string."""
        text = "".join(t for t, _ in run)
        backend = self._backends.get(True)
        if backend is None:
            raise DataError("a jinja chat template needs a fast (Rust) tokenizer, for token offsets; save the "
                            "tokenizer as tokenizer.json")
        supervised = [sup for t, sup in run for _ in t]  # per character
        encoding = backend.encode(text, add_special_tokens=False)
        labels = [i if any(supervised[a:b]) else IGNORE_INDEX for i, (a, b) in zip(encoding.ids, encoding.offsets)]
        return list(encoding.ids), labels

    def _build_jinja(self, turns: list[Turn], images: list[ProcessedImage], add_generation_prompt: bool) -> Sample:
        """`_build` for a jinja template: runs of text between special tokens are tokenised whole (module docstring)."""
        assert self._jinja is not None
        pieces = self._jinja.render(turns, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token)
        ids: list[int] = []
        labels: list[int] = []
        run: list[tuple[str, bool]] = []

        def flush() -> None:
            if run:
                run_ids, run_labels = self._run_ids(run)
                ids.extend(run_ids)
                labels.extend(run_labels)
                run.clear()

        for piece in pieces:
            if piece.kind == "image":
                flush()
                expansion = self.image_token_ids(images[int(piece.value)], int(piece.value), len(images))
                ids.extend(expansion)
                labels.extend([IGNORE_INDEX] * len(expansion))
            elif piece.kind == "text":
                run.append((str(piece.value), piece.supervised))
            else:
                parts = self._added_re.split(str(piece.value)) if self._added_re else [str(piece.value)]
                for k, part in enumerate(parts):
                    if k % 2:  # a special token of the template
                        flush()
                        ids.append(self.tokenizer.convert_tokens_to_ids(part))
                        labels.append(ids[-1] if piece.supervised else IGNORE_INDEX)
                    elif part:
                        run.append((part, piece.supervised))
        flush()
        prefix = self._prefix_ids()  # what the tokenizer adds around one sequence (BOS), as transformers' call does
        ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
        views = [v for image in images for v in image.views]
        return Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), views)

    def _prefix_ids(self) -> list[int]:
        backend = self._backends.get(False)
        return list(backend.encode("", add_special_tokens=True).ids) if backend is not None else []

    def _build(self, turns: list[Turn], images: list[ProcessedImage], add_generation_prompt: bool) -> Sample:
        if self._jinja is not None:
            return self._build_jinja(turns, images, add_generation_prompt)
        pieces: list[ChatPiece] = render_chat(
            turns, self.cfg.chat_template, add_generation_prompt=add_generation_prompt,
            bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token,
        )
        ids: list[int] = []
        labels: list[int] = []
        for piece in pieces:
            if piece.kind == "image":
                assert isinstance(piece.value, int)
                run = self.image_token_ids(images[piece.value], piece.value, len(images))
            else:
                assert isinstance(piece.value, str)
                run = self._ids(piece.value, piece.kind == "template")
            ids += run
            labels += run if piece.supervised else [IGNORE_INDEX] * len(run)
        views = [v for image in images for v in image.views]
        return Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), views)

    # -- public API ---------------------------------------------------------------------------------------------

    def encode(self, record: Record) -> Sample:
        """A training sample: labels are -100 except on assistant content and its end-of-turn token.

        Raises SampleError (a DataError) with `.reason` in REASONS instead of returning an unusable sample.
        """
        where = f"record {record.source_index}"
        turns = _turns(record.messages, where)
        n_slots = sum(isinstance(p, int) for t in turns for p in t.parts)
        if n_slots != len(record.images):
            raise SampleError(f"{where} has {n_slots} image part(s) in its messages but {len(record.images)} "
                              "image(s); each {'type': 'image'} part needs exactly one image", "image_count_mismatch")
        sample = self._build(turns, self._images(list(record.images), where), add_generation_prompt=False)
        if sample.n_supervised == 0:
            raise SampleError(f"{where} has no assistant reply to learn from; every record needs an assistant "
                              "message", "no_supervised_tokens")
        sample.source_index = record.source_index
        return sample

    def encode_prompt(self, messages: list[dict] | str, images: list | None = None) -> Sample:
        """A generation prompt: the conversation plus the assistant generation prompt; labels are all -100.

        `messages` may be a plain string (one user turn); its images go first, as in upstream nanoVLM.
        """
        images = list(images or [])
        if isinstance(messages, str):
            messages = [{"role": "user", "content": [{"type": "image"}] * len(images)
                         + [{"type": "text", "text": messages}]}]
        turns = _turns(messages, "prompt")
        n_slots = sum(isinstance(p, int) for t in turns for p in t.parts)
        if n_slots != len(images):
            raise SampleError(f"the prompt has {n_slots} image part(s) but {len(images)} image(s) were given; "
                              "pass one image per {'type': 'image'} part", "image_count_mismatch")
        sample = self._build(turns, self._images(images, "prompt"), add_generation_prompt=True)
        sample.labels.fill_(IGNORE_INDEX)
        return sample

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of `ids` without special tokens (image, end-of-turn and EOS tokens are dropped)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)
