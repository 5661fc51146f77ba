"""Tokenizers and chat templates: load / save a tokenizer with the VLM's extra tokens, render conversations.

Chat templates are rendered here in Python, not with jinja, into a list of `ChatPiece`s that say which text is
template scaffolding (special tokens parsed), which is message text (special-token strings NOT parsed, so a user
cannot type `<|image|>` into an image slot), which is an image slot, and which pieces are supervised. The processor
tokenises piece by piece, so labels are exact by construction, never recovered by searching the rendered string.
The same templates are also stored as jinja on the tokenizer so Hugging Face tools render the same text.
A checkpoint that brings its own Jinja template (chat_template "jinja": SmolVLM) is rendered with that template by
`JinjaChat`, then cut into the same kinds of pieces, so label masking stays exact there too.

ChatML (SmolLM2), user "Hi" / assistant "Yo":
    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nYo<|im_end|>\\n      supervised: "Yo", "<|im_end|>"
Gemma-3 (system folded into the first turn, assistant is "model", text trimmed):
    <bos><start_of_turn>user\\nSYS\\n\\nHi<end_of_turn>\\n<start_of_turn>model\\nYo<end_of_turn>\\n
Plain (upstream nanoVLM's first checkpoints, images before the question):
    Question: Hi Answer: Yo<eos>
"""

from __future__ import annotations

import itertools
import logging
import re
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
# A checkpoint's own Jinja template (chat_template "jinja", e.g. SmolVLM's), rendered as transformers renders it, then
# cut into the same pieces: every text part is first rendered as a unique sentinel, so where each message's text
# lands is known exactly; rendering the real text must give the same string with the sentinels substituted (a
# template that trims or rewrites message text is refused rather than masked approximately).

_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class JinjaChat:
    """Renders `source` (a Jinja chat template) into ChatPieces; supervised: assistant text parts and the first
    `end_of_turn` after each assistant turn. Image parts must render as `image_token` (one per part, in order)."""

    def __init__(self, source: str, end_of_turn: str, image_token: str) -> None:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        # the environment transformers' apply_chat_template uses (trim_blocks and lstrip_blocks change the output)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise ConfigError(f"the Jinja chat template does not parse ({exc}); fix jinja_template") from exc
        self.end_of_turn, self.image_token = end_of_turn, image_token

    def _render(self, turns: list[Turn], texts: list[str] | None, **kwargs) -> str:
        messages, k = [], 0
        for turn in turns:
            content = []
            for part in turn.parts:
                if isinstance(part, int):
                    content.append({"type": "image"})
                else:
                    content.append({"type": "text", "text": texts[k] if texts is not None else _SENTINEL.format(k)})
                    k += 1
            messages.append({"role": turn.role, "content": content})
        try:
            return self.template.render(messages=messages, **kwargs)
        except Exception as exc:  # jinja2 raises TemplateError, the template itself may raise anything
            raise ConfigError(f"the Jinja chat template failed to render ({exc}); fix jinja_template") from exc

    def _supervised_spans(self, turns: list[Turn], scaffold: str, **kwargs) -> list[tuple[int, int]]:
        """[start, end) of each assistant reply in `scaffold`: from where the generation prompt of the turns before it
        ends (what the model is asked to continue) to the end of the first `end_of_turn` after its text."""
        spans, k = [], 0
        for m, turn in enumerate(turns):
            n_texts = sum(isinstance(p, str) for p in turn.parts)
            if turn.role == "assistant":
                prompt = self._render(turns[:m], None, **{**kwargs, "add_generation_prompt": True})
                first = scaffold.find(_SENTINEL.format(k)) if n_texts else -1
                start = len(prompt) if scaffold.startswith(prompt) else first
                last = scaffold.find(_SENTINEL.format(k + n_texts - 1)) if n_texts else start
                end = scaffold.find(self.end_of_turn, max(last, start)) if start >= 0 else -1
                if start >= 0 and end >= 0:
                    spans.append((start, end + len(self.end_of_turn)))
            k += n_texts
        return spans

    def render(self, turns: list[Turn], *, add_generation_prompt: bool = False, bos_token: str | None = None,
               eos_token: str | None = None) -> list[ChatPiece]:
        texts = [p for turn in turns for p in turn.parts if isinstance(p, str)]
        kwargs = {"add_generation_prompt": add_generation_prompt, "bos_token": bos_token or "",
                  "eos_token": eos_token or ""}
        scaffold = self._render(turns, None, **kwargs)
        found = [int(i) for i in _SENTINEL_RE.findall(scaffold)]
        if found != list(range(len(texts))) or _SENTINEL_RE.sub(lambda m: texts[int(m[1])], scaffold) != \
                self._render(turns, texts, **kwargs):
            raise ConfigError("the Jinja chat template changes or reorders message text (e.g. trims it), so the "
                              "supervised tokens cannot be found exactly; use a template that writes text as given")
        spans = self._supervised_spans(turns, scaffold, **{**kwargs, "add_generation_prompt": False})
        # cut the scaffold at sentinels, image tokens and span edges; each cut keeps its own kind and supervision
        cuts = sorted({0, len(scaffold), *(e for span in spans for e in span),
                       *(e for m in _SENTINEL_RE.finditer(scaffold) for e in m.span()),
                       *(e for m in re.finditer(re.escape(self.image_token), scaffold) for e in m.span())})
        pieces: list[ChatPiece] = []
        n_images = 0
        for a, b in itertools.pairwise(cuts):
            chunk = scaffold[a:b]
            supervised = any(s <= a and b <= e for s, e in spans)
            sentinel = _SENTINEL_RE.fullmatch(chunk)
            if sentinel:
                if texts[int(sentinel[1])]:
                    pieces.append(ChatPiece("text", texts[int(sentinel[1])], supervised))
            elif chunk == self.image_token:
                pieces.append(ChatPiece("image", n_images))
                n_images += 1
            elif chunk:
                pieces.append(ChatPiece("template", chunk, supervised))
        expected = sum(isinstance(p, int) for turn in turns for p in turn.parts)
        if n_images != expected:
            raise ConfigError(f"the Jinja chat template wrote {n_images} {self.image_token} for {expected} image "
                              f"part(s); it must render each image part as {self.image_token}")
        return pieces


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
    tokenizer.chat_template = (cfg.jinja_template if cfg.chat_template == "jinja"
                               else chat_template_jinja(cfg.chat_template, cfg.image_token))
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


def resolve_pad_id(tokenizer: object, avoid: int | None = None) -> int:
    """The id rows are padded with: the tokenizer's pad token (`load_tokenizer` makes it EOS when it has none), else 0.

    Padding is never attended, so any id works except `avoid` (generation passes the image token, whose positions
    receive image features): then 0, or 1 when `avoid` is 0. `tokenizer` may be None (a processor without one).
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and int(pad) != avoid:
        return int(pad)
    return 1 if avoid == 0 else 0
