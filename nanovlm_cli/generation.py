"""Text generation: a KV-cache engine, separate from the model (nanochat's `engine.py` style).

Main design choice: one prefill, then one token per row per step into a cache preallocated for the whole answer.
Prompts of different lengths are LEFT-padded; padding gets segment id 0 (never attended) and each row's position
ids start at 0 on its first real token, so a padded prompt computes exactly what it computes alone.

Worked example, prompts [a b c] and [d e], max_new_tokens 2 (P = pad; cache max_len = 3 + 2 = 5):

    prefill    input_ids [[a b c], [P d e]]   segment_ids [[1 1 1], [0 1 1]]   position_ids [[0 1 2], [0 0 1]]
    decode 1   input_ids [[x], [y]]           segment_ids += [[1], [1]]        position_ids [[3], [2]]

With `num_generations` n, each prompt is prefilled once (one vision encoding) and the cache rows are repeated n
times before decoding. Sampling scales logits by the temperature BEFORE top-k / top-p filtering and draws from an
explicit `torch.Generator`, so a seed reproduces an answer. A row stops at any of the processor's stop tokens
(not part of its answer) or stop strings (the answer is cut before them); finished rows keep feeding a pad token
while the others go on, and their output is frozen.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanovlm_cli.checkpoint.io import load_model
from nanovlm_cli.data.images import load_image
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.sample import Sample
from nanovlm_cli.data.tokenizer import load_tokenizer, resolve_pad_id
from nanovlm_cli.devices import resolve_device, resolve_dtype
from nanovlm_cli.errors import GenerationError
from nanovlm_cli.models.kv_cache import KVCache, StaticKVCache
from nanovlm_cli.models.vlm import VisionLanguageModel, compile_blocks
from nanovlm_cli.streaming import RowOutput

logger = logging.getLogger(__name__)

TextCallback = Callable[[int, str], None]


@dataclass
class SamplingConfig:
    """How tokens are chosen. temperature 0 or greedy=True means argmax; top_k 0/None and top_p None/1 mean off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    num_generations: int = 1
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise GenerationError(f"temperature={self.temperature} must be a finite number >= 0 (0 means greedy; "
                                  "1 samples the model's own distribution, larger values flatten it)")
        if self.top_k is not None and self.top_k < 0:
            raise GenerationError(f"top_k={self.top_k} must be >= 0 (0 means no top-k filtering)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1] (1 means no nucleus filtering)")
        if self.num_generations < 1:
            raise GenerationError(f"num_generations={self.num_generations} must be >= 1")
        self.stop_strings = tuple(s for s in self.stop_strings if s)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class GenerationResult:
    """One entry per output row: prompt i's generations are rows i*n .. i*n+n-1 (n = num_generations)."""

    texts: list[str]
    token_ids: list[list[int]]  # answer tokens, without the stop token
    prompt_tokens: list[int]  # tokens of each prompt (image tokens included)
    new_tokens: list[int]  # len(token_ids[row])
    prefill_s: float  # vision encoding + prefill
    decode_s: float
    decode_tokens_per_s: float  # new tokens of all rows / decode_s
    finish_reasons: list[str]  # "eos" | "stop_string" | "length"


# ------------------------------------------------------------------------------------------------------------------
# Sampling


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(B, V) logits divided by `temperature`, then top-k / top-p filtered (removed entries set to -inf).

    The temperature comes first: it reshapes the distribution that top-p measures, so with a high temperature the
    nucleus holds more tokens (upstream nanoVLM filtered first, so temperature never changed the candidate set).
    """
    removed = logits == float("-inf")  # blocked tokens; -inf / a huge temperature would be NaN, not -inf
    logits = (logits.float() / max(temperature, 1e-5)).masked_fill(removed, float("-inf"))  # (B, V)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # keeps the smallest set reaching top_p (the top token always)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_finite_logits(logits: torch.Tensor, step: int) -> None:
    """Raise `GenerationError` when a row's scores hold NaN or +inf (-inf marks blocked tokens and is fine).

    Broken weights (NaN / Inf in the checkpoint, an overflow in half precision) show up here; sampling from them
    would fail inside torch, and argmax would return a meaningless token.
    """
    if not bool((logits.isfinite() | (logits == float("-inf"))).all()):
        raise GenerationError(
            f"the model's next-token scores are NaN or infinite (decoding step {step}); its weights are probably "
            "corrupt (a diverged run?) or overflow in this dtype: run `nanovlm validate` on the checkpoint, use an "
            "earlier one, or try --dtype float32")


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row, (B,) long: argmax when greedy, else a draw from the filtered distribution."""
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p).softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Prefill:
    input_ids: torch.Tensor  # (B, T) long, left padded
    position_ids: torch.Tensor  # (B, T) long, 0 at each row's first real token
    segment_ids: torch.Tensor | None  # (B, T) long, 0 on padding; None when no row is padded
    next_pos: torch.Tensor  # (B,) long, each row's next position = its prompt length


@dataclass
class _Decoding:
    """What the decode loop carries from the prefill, one row per answer (R = prompts x num_generations)."""

    logits: torch.Tensor  # (R, V) next-token logits
    next_pos: torch.Tensor  # (R,) long, each row's next position
    segment_ids: torch.Tensor | None  # (R, S) long, 0 on padding; None when no row is padded (eager decode only)
    cache: KVCache | None = None  # the growing cache of the eager decode
    static: StaticKVCache | None = None  # the fixed-shape cache of the static decode


def _left_pad(prompts: Sequence[Sample], pad_id: int, device: torch.device) -> _Prefill:
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    b, t = len(prompts), int(lengths.max())
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, t - len(prompt):] = prompt.input_ids.to(torch.long)
    pads = (t - lengths)[:, None]  # (B, 1)
    slot = torch.arange(t)[None, :]  # (1, T)
    real = slot >= pads  # (B, T)
    position_ids = (slot - pads).clamp(min=0)  # (B, T); pads sit at 0 and are never attended
    segment_ids = real.long() if bool((pads > 0).any()) else None
    return _Prefill(input_ids.to(device), position_ids.to(device),
                    None if segment_ids is None else segment_ids.to(device), lengths.to(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """Batched generation with a preallocated KV cache for a `VisionLanguageModel` and its `Processor`.

    Decoding runs one of two ways. Eager (the default): a `KVCache` that grows by a slot per step, each step
    attending to the filled slots only. Static (`compile=True`, or the `static_decode` attribute set): after the
    prefill the cache moves into a `StaticKVCache` the engine keeps between calls, and every step is one fixed-shape
    `LanguageModel.decode_step`; compiled, that is one graph for the whole step (one CUDA graph replay on CUDA).
    Both give the same tokens (tested).
    """

    STATIC_SLOTS = 64  # the static cache's length is rounded up to this, so similar prompts reuse one graph

    def __init__(self, model: VisionLanguageModel, processor: Any, *, compile: bool = False) -> None:
        """`compile=True` compiles the model's blocks in place (`compile_blocks`) for the prefill and the whole
        decode step as one graph: the first calls are slower (compilation), later ones far cheaper per token."""
        self.model = model
        self.processor = processor
        self.static_decode = compile
        self._static: StaticKVCache | None = None
        self._decode = self._decode_logits
        self._cuda_graphs = False
        if compile:
            compile_blocks(model, model.device)
            self._compile_decode(cuda_graphs=model.device.type == "cuda")

    def _compile_decode(self, cuda_graphs: bool) -> None:
        """Compile the decode step as one graph. CUDA graphs ("reduce-overhead") replay it with one launch; they
        need the fixed shapes the static cache gives and its buffers at fixed addresses (`mark_static_address`)."""
        self._cuda_graphs = cuda_graphs
        self._decode = torch.compile(self._decode_logits, fullgraph=True, dynamic=False,
                                     mode="reduce-overhead" if cuda_graphs else None)

    def _decode_logits(self, feed: torch.Tensor, next_pos: torch.Tensor, cache: StaticKVCache,
                       blocked: torch.Tensor) -> torch.Tensor:
        """(R, 1) tokens at positions (R,) -> (R, V) next-token logits, through the static cache."""
        language = self.model.language
        hidden = language.decode_step(language.embed(feed), next_pos[:, None], cache)  # (R, 1, D)
        return self.model.logits(hidden[:, -1]).index_fill(-1, blocked, float("-inf"))

    def _static_cache(self, rows: int, max_len: int, dtype: torch.dtype) -> StaticKVCache:
        """The kept static cache when it fits, else a new one (a compiled step then compiles for its shapes)."""
        if self._static is None or not self._static.fits(rows, max_len, dtype):
            slots = -(-max_len // self.STATIC_SLOTS) * self.STATIC_SLOTS
            self._static = None  # free the old buffers before allocating the new ones
            self._static = StaticKVCache.for_model(self.model.cfg.language, rows, slots, device=self.model.device,
                                                   dtype=dtype)
            if self._cuda_graphs:
                for t in (self._static.k, self._static.v, self._static.filled, self._static.slot):
                    torch._dynamo.mark_static_address(t)
        return self._static

    def _pad_id(self) -> int:
        """The tokenizer's pad (`resolve_pad_id`), never the image token (a fed pad must not ask for image features)."""
        return resolve_pad_id(getattr(self.processor, "tokenizer", None), avoid=self.model.image_token_id)

    def _placeholder_ids(self) -> list[int]:
        """Ids of the extra image tokens the tokenizer knows (the image token at least)."""
        ids = {self.model.image_token_id}
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            ids.update(vocab[t] for t in self.model.cfg.extra_tokens if t in vocab)
        return sorted(i for i in ids if i < self.model.cfg.language.total_vocab_size)

    def _check(self, prompts: Sequence[Sample], sampling: SamplingConfig) -> None:
        if not prompts:
            raise GenerationError("no prompts given; pass at least one encoded prompt")
        limit = self.model.cfg.language.max_position_embeddings
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise GenerationError(f"prompt {i} is empty; give a text prompt or at least one image")
            if len(prompt) + sampling.max_new_tokens > limit:
                raise GenerationError(
                    f"prompt {i} has {len(prompt)} tokens (image tokens included) + max_new_tokens="
                    f"{sampling.max_new_tokens} = {len(prompt) + sampling.max_new_tokens} > the model's context of "
                    f"{limit} positions; lower --max-new-tokens, shorten the prompt or use fewer/smaller images"
                )

    @torch.inference_mode()
    def generate(
        self, prompts: list[Sample], sampling: SamplingConfig, on_text: TextCallback | None = None
    ) -> GenerationResult:
        """Generate for every prompt (`sampling.num_generations` answers each); `on_text(row, piece)` streams."""
        self._check(prompts, sampling)
        device = self.model.device
        t0 = time.perf_counter()
        state = self._prefill(prompts, sampling)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        outputs = self._decode_rows(state, sampling, on_text)
        _sync(device)
        decode_s = time.perf_counter() - t1
        new_tokens = [len(o.ids) for o in outputs]
        return GenerationResult(
            texts=[o.text for o in outputs], token_ids=[list(o.ids) for o in outputs],
            prompt_tokens=[len(p) for p in prompts], new_tokens=new_tokens, prefill_s=prefill_s, decode_s=decode_s,
            decode_tokens_per_s=sum(new_tokens) / decode_s if decode_s > 0 else 0.0,
            finish_reasons=[o.finish_reason or "length" for o in outputs],
        )

    def _prefill(self, prompts: Sequence[Sample], sampling: SamplingConfig) -> _Decoding:
        """Run the left-padded prompts once into a fresh cache; repeat its rows for `num_generations`."""
        model, device = self.model, self.model.device
        n, max_new = sampling.num_generations, sampling.max_new_tokens
        batch = _left_pad(prompts, self._pad_id(), device)
        images = [view for prompt in prompts for view in prompt.images]  # row-major, as the image tokens appear
        dtype = model.projector.proj.weight.dtype
        prompt_len = batch.input_ids.shape[1]
        # The static decode keeps its own cache, so the prefill's needs room for the prompt only.
        cache = KVCache.for_model(model.cfg.language, len(prompts), prompt_len + (0 if self.static_decode else max_new),
                                  device=device, dtype=dtype)
        hidden = model(batch.input_ids, images, position_ids=batch.position_ids, segment_ids=batch.segment_ids,
                       kv_cache=cache)  # (B, T, D)
        logits = model.logits(hidden[:, -1])  # (B, V)
        segment_ids, next_pos = batch.segment_ids, batch.next_pos
        if n > 1:  # share the prefill (and its image encoding) between the n samples of each prompt
            cache = cache.repeat_batch(n)
            logits = logits.repeat_interleave(n, dim=0)  # (B*n, V)
            next_pos = next_pos.repeat_interleave(n, dim=0)
            segment_ids = None if segment_ids is None else segment_ids.repeat_interleave(n, dim=0)
        if not self.static_decode:
            return _Decoding(logits, next_pos, segment_ids, cache=cache)
        static = self._static_cache(logits.shape[0], prompt_len + max_new, dtype)
        static.load(cache, segment_ids)
        return _Decoding(logits, next_pos, segment_ids, static=static)

    def _decode_rows(
        self, state: _Decoding, sampling: SamplingConfig, on_text: TextCallback | None
    ) -> list[RowOutput]:
        """Sample a token per unfinished row per step until every row stops (a stop token or string, or length)."""
        device, max_new = self.model.device, sampling.max_new_tokens
        generator = None
        if not sampling.is_greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(sampling.seed) if sampling.seed is not None else generator.seed()
        # Image placeholders (image, global-image and tile tokens) are inputs only: never sample them.
        blocked = torch.tensor(self._placeholder_ids(), dtype=torch.long, device=device)
        logits = state.logits.index_fill(-1, blocked, float("-inf"))
        rows = logits.shape[0]
        incremental = on_text is not None or bool(sampling.stop_strings)
        outputs = [RowOutput(self.processor.decode, sampling.stop_strings, incremental) for _ in range(rows)]
        stop_ids = {int(i) for i in self.processor.stop_token_ids}
        pad = torch.full((rows,), self._pad_id(), dtype=torch.long, device=device)
        for step in range(max_new):
            check_finite_logits(logits, step)
            tokens = sample_next(logits, sampling, generator)  # (R,)
            for row, token in enumerate(tokens.tolist()):
                out = outputs[row]
                if out.finish_reason is not None:
                    continue
                piece = out.finish("eos") if token in stop_ids else out.add(token)
                if out.finish_reason is None and step == max_new - 1:
                    piece += out.finish("length")
                if piece and on_text is not None:
                    on_text(row, piece)
            done = torch.tensor([o.finish_reason is not None for o in outputs], device=device)
            if bool(done.all()):
                break
            feed = torch.where(done, pad, tokens)[:, None]  # (R, 1); finished rows feed padding
            logits = self._step_logits(feed, state, blocked)  # (R, V)
            state.next_pos = state.next_pos + 1
        return outputs

    def _step_logits(self, feed: torch.Tensor, state: _Decoding, blocked: torch.Tensor) -> torch.Tensor:
        """(R, 1) fed tokens -> (R, V) next-token logits, through the static cache or the growing one."""
        if state.static is not None:
            return self._decode(feed, state.next_pos, state.static, blocked)
        if state.segment_ids is not None:
            state.segment_ids = torch.cat([state.segment_ids, torch.ones_like(feed)], dim=1)  # (R, S + 1)
        # Straight to the decoder: a sampled image-token id must not ask for image features.
        language = self.model.language
        hidden = language(language.embed(feed), state.next_pos[:, None], segment_ids=state.segment_ids,
                          kv_cache=state.cache)  # (R, 1, D)
        return self.model.logits(hidden[:, -1]).index_fill(-1, blocked, float("-inf"))


# ------------------------------------------------------------------------------------------------------------------
# Convenience: one prompt about some images


def user_message(prompt: str, n_images: int) -> list[dict[str, Any]]:
    """The chat messages of one user turn: an image part per image, then the text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def processor_for(model: VisionLanguageModel, tokenizer: Any = None) -> Any:
    """The model's `Processor`; without `tokenizer`, the one its config names (`load_tokenizer(model.cfg)`)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(model.cfg)
    return Processor(model.cfg, tokenizer)


def _check_prompt_text(prompt: str) -> None:
    if not prompt or not prompt.strip():
        raise GenerationError("prompt is empty; pass the question or instruction as text")


def generate_text(
    model: VisionLanguageModel, processor: Any, images: Sequence[Any], prompt: str, **sampling: Any
) -> str:
    """The answer to `prompt` about `images` (PIL images, paths or bytes); `sampling` are SamplingConfig fields."""
    config = SamplingConfig(**sampling)
    if config.num_generations != 1:
        raise GenerationError(f"generate_text returns one answer but num_generations={config.num_generations}; "
                              "use Engine.generate for several")
    _check_prompt_text(prompt)
    sample = processor.encode_prompt(user_message(prompt, len(images)), list(images))
    return Engine(model, processor).generate([sample], config).texts[0]


def generate_from_checkpoint(
    checkpoint: str,
    images: Sequence[Any],
    prompt: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    on_text: TextCallback | None = None,
    **sampling: Any,
) -> GenerationResult:
    """Load `checkpoint` (directory or Hub id), read `images` (paths), answer `prompt`: what `nanovlm generate` runs.

    Images are read before the model loads, so a bad file fails fast with an `ImageError` naming it. `compile`
    is `Engine(compile=True)`: a slower start, then cheaper tokens.
    """
    _check_prompt_text(prompt)
    pictures = [load_image(src) for src in images]
    config = SamplingConfig(**sampling)
    torch_device = resolve_device(device)
    loaded = load_model(checkpoint, device=torch_device, dtype=resolve_dtype(dtype, torch_device))
    processor = Processor(loaded.cfg, loaded.tokenizer)
    sample = processor.encode_prompt(user_message(prompt, len(pictures)), pictures)
    result = Engine(loaded.model, processor, compile=compile).generate([sample], config, on_text=on_text)
    logger.debug("prompt %d tokens, prefill %.3fs, decode %.1f tokens/s", result.prompt_tokens[0], result.prefill_s,
                result.decode_tokens_per_s)
    return result
