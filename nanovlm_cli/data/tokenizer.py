"""Tokenizers and chat templates: load / save a tokenizer with the VLM's extra tokens, render conversations.

Chat templates are rendered here in Python, not with jinja, into a list of `ChatPiece`s that say which text is
template scaffolding (special tokens parsed), which is message text (special-token strings NOT parsed, so a user
cannot type `<|image|>` into an image slot), which is an image slot, and which pieces are supervised. The processor
tokenises piece by piece, so labels are exact by construction, never recovered by searching the rendered string.
The same templates are also stored as jinja on the tokenizer so Hugging Face tools render the same text.

ChatML (SmolLM2), user "Hi" / assistant "Yo":
    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>\\n      supervised: "Yo", "<|im_end|>"
Gemma-3 (system folded into the first turn, assistant is "model", text trimmed):
    <bos><start_of_turn>user\\nSYS\\n\\nHi<end_of_turn>\\n<start_of_turn>model\\nYo<end_of_turn>\\n
Plain (upstream nanoVLM's first checkpoints, images before the question):
    Question: Hi Answer: Yo<eos>
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nanovlm_cli.config import VLMConfig
from nanovlm_cli.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"
BUILTIN_PREFIX = "builtin:"
ROLES = ("system", "user", "assistant")
END_OF_TURN = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>", "plain": None}


@dataclass(frozen=True)
class Turn:
    """One message, normalised: text parts are str, an image slot is the int index of its image in the record."""

    role: str  # "system" | "user" | "assistant"
    parts: tuple[str | int, ...]


@dataclass(frozen=True)
class ChatPiece:
    """A run of the rendered conversation.

    kind "template": scaffolding, tokenised with special tokens parsed; "text": message text, tokenised with
    special-token strings split into ordinary text; "image": image slot `value` (expanded by the processor).
    """

    kind: Literal["template", "text", "image"]
    value: str | int
    supervised: bool = False


def _text_pieces(parts: tuple[str | int, ...], supervised: bool, trim: bool = False) -> list[ChatPiece]:
    out = []
    for part in parts:
        if isinstance(part, int):
            out.append(ChatPiece("image", part))
        else:
            text = part.strip() if trim else part
            if text:
                out.append(ChatPiece("text", text, supervised))
    return out


def _render_chatml(turns: list[Turn], add_generation_prompt: bool) -> list[ChatPiece]:
    pieces: list[ChatPiece] = []
    for turn in turns:
        sup = turn.role == "assistant"
        pieces.append(ChatPiece("template", f"<|im_start|>{turn.role}\n"))
        pieces += _text_pieces(turn.parts, sup)
        pieces += [ChatPiece("template", "<|im_end|>", sup), ChatPiece("template", "\n")]
    if add_generation_prompt:
        pieces.append(ChatPiece("template", "<|im_start|>assistant\n"))
    return pieces


def _render_gemma(turns: list[Turn], add_generation_prompt: bool, bos: str) -> list[ChatPiece]:
    pieces = [ChatPiece("template", bos)]
    prefix = ""
    if turns and turns[0].role == "system":
        prefix = "".join(p for p in turns[0].parts if isinstance(p, str)) + "\n\n"
        turns = turns[1:]
    for i, turn in enumerate(turns):
        sup = turn.role == "assistant"
        pieces.append(ChatPiece("template", f"<start_of_turn>{'model' if sup else turn.role}\n"))
        if i == 0 and prefix:
            pieces.append(ChatPiece("text", prefix))
        pieces += _text_pieces(turn.parts, sup, trim=True)
        pieces += [ChatPiece("template", "<end_of_turn>", sup), ChatPiece("template", "\n")]
    if add_generation_prompt:
        pieces.append(ChatPiece("template", "<start_of_turn>model\n"))
    return pieces


def _render_plain(turns: list[Turn], eos: str) -> list[ChatPiece]:
    pieces: list[ChatPiece] = []
    for turn in turns:
        images = [ChatPiece("image", p) for p in turn.parts if isinstance(p, int)]
        text = "".join(p for p in turn.parts if isinstance(p, str))
        if turn.role == "user":
            pieces += images + [ChatPiece("text", f"Question: {text} Answer:")]
        elif turn.role == "assistant":
            pieces += images + [ChatPiece("text", f" {text}", True), ChatPiece("template", eos, True)]
        else:
            pieces += images + [ChatPiece("text", f"{text}\n")]
    return pieces


def render_chat(turns: list[Turn], template: str, *, add_generation_prompt: bool = False,
                bos_token: str | None = None, eos_token: str | None = None) -> list[ChatPiece]:
    """The pieces of `turns` under `template` ("chatml", "gemma" or "plain"); see the module docstring."""
    if template == "chatml":
        return _render_chatml(turns, add_generation_prompt)
    if template == "gemma":
        return _render_gemma(turns, add_generation_prompt, bos_token or "<bos>")
    if template == "plain":
        return _render_plain(turns, eos_token or "<|endoftext|>")
    raise ConfigError(f"chat_template={template!r} is not one of chatml, gemma, plain")


# ----------------------------------------------------------------------------------------------------------------
# Jinja versions of the same templates, stored on the tokenizer for Hugging Face tools (image parts render as one
# image token: the expansion into a token run depends on the image and is done by our processor).

_CONTENT_MACRO = (
    "{%- macro render(content, trim) -%}{%- if content is string -%}{{ content | trim if trim else content }}"
    "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}"
    "{{ part['text'] | trim if trim else part['text'] }}{%- elif part['type'] == 'image' -%}{{ '@IMAGE@' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)
_JINJA = {
    "chatml": _CONTENT_MACRO + (
        "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}{{ render(message['content'], "
        "false) }}{{ '<|im_end|>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
        "{%- endif -%}"
    ),
    "gemma": _CONTENT_MACRO + (
        "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = render(messages[0]"
        "['content'], false) + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set "
        "first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages"
        " -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}{{ '<start_of_turn>' + "
        "role + '\\n' + (first_user_prefix if loop.first else '') }}{{ render(message['content'], true) }}"
        "{{ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}"
        "{%- endif -%}"
    ),
    "plain": _CONTENT_MACRO + (
        "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{{ 'Question: ' + render(message["
        "'content'], false) + ' Answer:' }}{%- elif message['role'] == 'assistant' -%}{{ ' ' + render(message["
        "'content'], false) + eos_token }}{%- else -%}{{ render(message['content'], false) + '\\n' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
}


def chat_template_jinja(template: str, image_token: str = "<|image|>") -> str:
    """The jinja source of `template`, for `tokenizer.chat_template`."""
    if template not in _JINJA:
        raise ConfigError(f"chat_template={template!r} is not one of chatml, gemma, plain")
    return _JINJA[template].replace("@IMAGE@", image_token)


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving


def _resolve(cfg: VLMConfig, source: str | Path | None) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a checkpoint directory)."""
    if source is not None:
        return str(source), True
    name = cfg.language.tokenizer_source
    if not name:
        raise ConfigError("language.tokenizer and language.hub_id are both unset; set language.tokenizer to a Hub id, "
                          "a local directory or builtin:tiny")
    if name.startswith(BUILTIN_PREFIX):
        if name != "builtin:tiny":
            raise ConfigError(f"unknown built-in tokenizer {name!r}; the only one is builtin:tiny")
        return str(TINY_TOKENIZER_DIR), False
    return name, False


def add_extra_tokens(tokenizer, tokens: list[str]) -> int:
    """Add `tokens` as special tokens, skipping those already present (idempotent); returns how many were added."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if new:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
    return len(new)


def load_tokenizer(cfg: VLMConfig, source: str | Path | None = None):
    """The tokenizer of `cfg` (or of the checkpoint directory `source`) with cfg's extra tokens and chat template.

    Returns a transformers `PreTrainedTokenizerBase`. Every extra token id must fit the model's embedding
    (`< cfg.language.total_vocab_size`), else ConfigError naming the size to use.
    """
    from transformers import AutoTokenizer

    target, is_checkpoint = _resolve(cfg, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
    except Exception as exc:  # OSError, ValueError, HF Hub errors
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if is_checkpoint:
            raise CheckpointError(f"cannot load the tokenizer from {target} ({detail}); the checkpoint is missing "
                                  "its tokenizer files, re-save it") from exc
        raise ConfigError(f"cannot load tokenizer {target!r} ({detail}); check language.tokenizer (a Hub id in "
                          "the local cache when offline, a local directory, or builtin:tiny)") from exc
    added = add_extra_tokens(tokenizer, cfg.extra_tokens)
    if added:
        logger.debug("added %d extra tokens to the tokenizer of %s", added, target)
    limit = cfg.language.total_vocab_size
    ids = tokenizer.convert_tokens_to_ids(cfg.extra_tokens)
    too_big = [(t, i) for t, i in zip(cfg.extra_tokens, ids) if i is None or i >= limit]
    if too_big:
        token, idx = too_big[0]
        needed = max(i for i in ids if i is not None) + 1 - cfg.language.vocab_size
        raise ConfigError(f"extra token {token!r} has id {idx} but the model has {limit} embedding rows "
                          f"(vocab_size {cfg.language.vocab_size} + extra_vocab_size "
                          f"{cfg.language.extra_vocab_size}); set language.extra_vocab_size to at least {needed}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template_jinja(cfg.chat_template, cfg.image_token)
    return tokenizer


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """Write the tokenizer files (with its jinja chat template) into `directory`, for self-contained checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer.save_pretrained(str(directory))
    except OSError as exc:
        raise CheckpointError(f"cannot write the tokenizer to {directory} ({exc}); check free space and "
                              "permissions") from exc


def end_of_turn_token(template: str) -> str | None:
    """The token that closes an assistant turn under `template` (None for "plain", which ends with EOS)."""
    return END_OF_TURN.get(template)
