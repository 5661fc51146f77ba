"""Scoring a model on MMStar-format multiple choice (the Hub MMStar set, the built-in shapes set, local data).

Main design choice: one prompt format for training and evaluation. Every question (which already lists its options)
is asked with `mmstar_prompt` (`evaluation/prompt.py`), answered greedily in batches, and the reply is mapped to an
option letter by `extract_choice` (`evaluation/choices.py`: a cascade from strict to loose matching). Every sample
is kept in the result's `records` (the per-sample ledger, `evaluation/results.py`).

The alternative, "rank" scoring (`evaluate_ranked`), asks no letter: it scores every option's text as the reply to
the question without its option list and picks the most likely one, as lm-evaluation-harness does for
"multiple_choice" tasks. It measures what the model knows even when it never learned the option-to-letter lookup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nanovlm_cli.checkpoint.io import load_model
from nanovlm_cli.data.images import load_image
from nanovlm_cli.data.packing import collate
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.sample import Record
from nanovlm_cli.data.shapes import shapes_mmstar_rows, shapes_records
from nanovlm_cli.data.tokenizer import resolve_pad_id
from nanovlm_cli.devices import resolve_device, resolve_dtype
from nanovlm_cli.errors import DataError
from nanovlm_cli.evaluation.choices import (
    extract_choice,
    match_option_text,
    normalise_text,
    parse_options,
    question_stem,
)
from nanovlm_cli.evaluation.datasets import load_benchmark
from nanovlm_cli.evaluation.lmms import run_lmms_eval
from nanovlm_cli.evaluation.prompt import mmstar_prompt
from nanovlm_cli.evaluation.results import EvalResult, summarise, write_results
from nanovlm_cli.generation import Engine, SamplingConfig, user_message
from nanovlm_cli.models.vlm import compile_blocks, eval_mode, loss_targets

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
ProgressCallback = Callable[[int, "int | None"], None]  # (samples done, total or None)

# ------------------------------------------------------------------------------------------------------------------
# Scoring a model


def normalise_row(raw: dict[str, Any], position: int) -> dict[str, Any]:
    """An MMStar-format row with every field present: index, question, image, answer (letter), category."""
    for name in ("question", "image", "answer"):
        if raw.get(name) is None:
            raise DataError(f"benchmark row {position} has no {name!r} field; MMStar-format rows need "
                            "question, image, answer (and optionally index, category)")
    question = str(raw["question"])
    options = parse_options(question)
    answer = str(raw["answer"]).strip()
    if len(answer) != 1 or not answer.isalpha():  # an answer given as option text
        answer = match_option_text(answer, options) or answer
    index = raw.get("index")
    return {"index": position if index is None else index, "question": question, "image": raw["image"],
            "answer": answer.upper(), "category": str(raw.get("category") or "all"), "options": options}


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    chunk: list[tuple[int, dict[str, Any]]] = []
    for position, row in enumerate(rows):
        chunk.append((position, row))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def evaluate(
    model: Any,
    processor: Any,
    rows: Iterable[dict[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = 8,
    on_progress: ProgressCallback | None = None,
    benchmark: str = "custom",
    compile: bool = False,
) -> EvalResult:
    """Ask every MMStar-format row with `mmstar_prompt`, greedily, `batch_size` prompts at a time, and score it.

    The model is put in eval mode for the run and restored afterwards (the training loop calls this mid-run).
    `compile` generates with `Engine(compile=True)`.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    total = len(rows) if isinstance(rows, Sized) else None
    engine = Engine(model, processor, compile=compile)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    with eval_mode(model):
        for chunk in _chunks(rows, batch_size):
            batch = [normalise_row(raw, position) for position, raw in chunk]
            prompts = [processor.encode_prompt(user_message(mmstar_prompt(row["question"]), 1),
                                               [load_image(row["image"], name=f"benchmark row {row['index']}")])
                       for row in batch]
            texts = engine.generate(prompts, sampling).texts
            for row, text in zip(batch, texts):
                choice = extract_choice(text, row["options"] or None)
                records.append({"index": row["index"], "question": row["question"], "prediction": text,
                                "extracted": choice, "answer": row["answer"], "correct": choice == row["answer"],
                                "category": row["category"]})
            if on_progress is not None:
                on_progress(len(records), total)
    result = summarise(benchmark, records, time.perf_counter() - start)
    log.info("%s: accuracy %.4f on %d samples (%.1fs)", benchmark, result.accuracy, result.n, result.wall_s)
    return result


def evaluate_shapes(model: Any, processor: Any, n: int = 200, seed: int = 0, batch_size: int = 32) -> EvalResult:
    """Accuracy on `n` built-in shapes MCQs (eval split): what the training loop reports at the end of a run."""
    return evaluate(model, processor, shapes_mmstar_rows(n, seed=seed), batch_size=batch_size, benchmark="shapes")


def evaluate_shapes_open(model: Any, processor: Any, n: int = 200, seed: int = 0,
                         batch_size: int = 32, compile: bool = False) -> EvalResult:
    """Exact-match accuracy of short answers on `n` open shapes questions (eval split, images never trained on)."""
    engine = Engine(model, processor, compile=compile)
    sampling = SamplingConfig(max_new_tokens=4, greedy=True)
    rows = shapes_records(n, seed=seed, split="eval", multiple_choice=0.0)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    with eval_mode(model):
        for chunk in _chunks(rows, batch_size):
            prompts = [processor.encode_prompt(record.messages[:1], record.images) for _, record in chunk]
            for (position, record), text in zip(chunk, engine.generate(prompts, sampling).texts):
                answer = record.meta["answer"]
                records.append({"index": position, "question": record.messages[0]["content"][-1]["text"],
                                "prediction": text, "extracted": normalise_text(text) or None, "answer": answer,
                                "correct": normalise_text(text) == normalise_text(answer),
                                "category": record.meta["category"]})
    result = summarise("shapes-open", records, time.perf_counter() - start)
    log.info("shapes-open: accuracy %.4f on %d samples (%.1fs)", result.accuracy, result.n, result.wall_s)
    return result


# ------------------------------------------------------------------------------------------------------------------
# Scoring by option likelihood ("rank")


def _option_samples(processor: Any, row: dict[str, Any]) -> list[Any]:
    """One training-style Sample per option: the question stem and image asked, the option text as the reply."""
    if not row["options"]:
        raise DataError(f"benchmark row {row['index']} lists no options in its question; rank scoring needs "
                        "'A. text' lines or 'Options: A: x, B: y' in the question (or use --scoring generate)")
    image = load_image(row["image"], name=f"benchmark row {row['index']}")
    prompt = user_message(question_stem(row["question"]), 1)
    return [processor.encode(Record(prompt + [{"role": "assistant", "content": [{"type": "text", "text": text}]}],
                                    [image], source_index=row["index"]))
            for text in row["options"].values()]


def score_samples(model: Any, samples: list[Any], pad_token_id: int = 0) -> list[float]:
    """Summed log-probability of each sample's supervised tokens (its reply and end-of-turn token), one forward.

    Only the supervised positions are projected to the vocabulary, so no (B, L, V) logits are ever built.
    """
    batch = collate([[sample] for sample in samples], pad_token_id=pad_token_id).to(model.device)
    hidden = model(batch.input_ids, batch.images, position_ids=batch.position_ids,
                   segment_ids=batch.segment_ids)  # (B, L, D)
    targets, keep = loss_targets(batch)  # (B, L-1) each: position t predicts label t+1
    logits = model.logits(hidden[:, :-1][keep]).float()  # (N, V), N supervised positions
    token_logp = logits.log_softmax(-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)  # (N,)
    rows = keep.nonzero()[:, 0]  # (N,) the sample each supervised position belongs to
    return torch.zeros(len(samples), device=logits.device).index_add_(0, rows, token_logp).tolist()


def evaluate_ranked(
    model: Any,
    processor: Any,
    rows: Iterable[dict[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
    benchmark: str = "custom",
) -> EvalResult:
    """Choose each MMStar-format row's option by likelihood, `batch_size` rows (all their options) per forward.

    Each option's text is scored as the assistant's reply to the question stem (`question_stem`) and the image,
    under the chat template the model trained with: the summed log-probability of its tokens and the end-of-turn
    token. The highest score wins (ties: the earlier letter), as lm-evaluation-harness scores "multiple_choice"
    tasks. The model is put in eval mode for the run and restored afterwards.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    total = len(rows) if isinstance(rows, Sized) else None
    pad_id = resolve_pad_id(processor.tokenizer)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    with eval_mode(model), torch.inference_mode():
        for chunk in _chunks(rows, batch_size):
            batch = [normalise_row(raw, position) for position, raw in chunk]
            samples = [_option_samples(processor, row) for row in batch]
            scores = iter(score_samples(model, [s for row_samples in samples for s in row_samples], pad_id))
            for row in batch:
                by_letter = {letter: next(scores) for letter in row["options"]}
                choice = max(by_letter, key=by_letter.__getitem__)  # the first of equal maxima
                records.append({"index": row["index"], "question": row["question"],
                                "prediction": row["options"][choice], "extracted": choice,
                                "answer": row["answer"], "correct": choice == row["answer"],
                                "category": row["category"], "scores": by_letter})
            if on_progress is not None:
                on_progress(len(records), total)
    result = summarise(benchmark, records, time.perf_counter() - start, scoring="rank")
    log.info("%s (rank): accuracy %.4f on %d samples (%.1fs)", benchmark, result.accuracy, result.n, result.wall_s)
    return result


def evaluate_shapes_ranked(model: Any, processor: Any, n: int = 200, seed: int = 0,
                           batch_size: int = 32) -> EvalResult:
    """Rank-scored accuracy on the same `n` built-in shapes MCQs `evaluate_shapes` asks (eval split)."""
    return evaluate_ranked(model, processor, shapes_mmstar_rows(n, seed=seed), batch_size=batch_size,
                           benchmark="shapes-rank")


# ------------------------------------------------------------------------------------------------------------------
# What `nanovlm eval` runs


def evaluate_checkpoint(
    checkpoint: str,
    *,
    benchmark: str = "mmstar",
    limit: int | None = None,
    batch_size: int | None = None,
    split: str | None = None,
    output_dir: str | None = None,
    backend: str = "native",
    tasks: list[str] | None = None,
    device: str = "auto",
    max_new_tokens: int = 8,
    seed: int = 0,
    scoring: str = "generate",
    compile: bool = False,
    on_progress: ProgressCallback | None = None,
) -> Any:
    """Load `checkpoint`, score it on `benchmark`, write results.json + ledger.jsonl to `output_dir` when given.

    `scoring` "generate" asks for a letter and extracts it from the reply (`evaluate`); "rank" picks the most likely
    option text (`evaluate_ranked`). With backend "lmms-eval" the checkpoint is handed to lmms-eval's `tasks` instead
    (see `evaluation/lmms.py`). `compile` compiles the model (for generation, the whole decode step: `Engine`).
    """
    if scoring not in ("generate", "rank"):
        raise DataError(f"scoring={scoring!r} is not one of generate, rank")
    if scoring == "rank" and backend != "native":
        raise DataError("--scoring rank works with the native backend only; drop --backend lmms-eval or use "
                        "--scoring generate")
    if scoring == "rank" and benchmark == "shapes-open":
        raise DataError("--scoring rank needs multiple-choice questions and shapes-open has none; use --benchmark "
                        "shapes or --scoring generate")
    if compile and backend != "native":
        raise DataError("--compile works with the native backend only; drop --compile or --backend lmms-eval")
    if output_dir is not None:  # checked before anything loads: a run's results must not be lost at the end
        out = Path(output_dir).expanduser()
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise DataError(f"output directory {output_dir} cannot be created: {blocker} is a file; pass a directory")
    if backend == "lmms-eval":
        return run_lmms_eval(checkpoint, tasks or [benchmark], limit=limit, batch_size=batch_size or 1,
                             device=device, output_dir=output_dir)
    if backend != "native":
        raise DataError(f"backend={backend!r} is not one of native, lmms-eval")
    if tasks:
        raise DataError("--tasks applies to --backend lmms-eval only; use --benchmark with the native backend")
    data = None if benchmark == "shapes-open" else load_benchmark(benchmark, split=split, limit=limit, seed=seed)
    torch_device = resolve_device(device)  # data errors come before the model loads
    loaded = load_model(checkpoint, device=torch_device, dtype=resolve_dtype("auto", torch_device))
    processor = Processor(loaded.cfg, loaded.tokenizer)
    if data is None:  # the built-in short-answer set: exact match per category
        result = evaluate_shapes_open(loaded.model, processor, n=limit or 200, seed=seed,
                                      batch_size=batch_size or DEFAULT_BATCH_SIZE, compile=compile)
    elif scoring == "rank":
        if compile:
            compile_blocks(loaded.model, torch_device)
        result = evaluate_ranked(loaded.model, processor, data.rows, batch_size=batch_size or DEFAULT_BATCH_SIZE,
                                 on_progress=on_progress, benchmark=data.name)
    else:
        result = evaluate(loaded.model, processor, data.rows, batch_size=batch_size or DEFAULT_BATCH_SIZE,
                          max_new_tokens=max_new_tokens, on_progress=on_progress, benchmark=data.name,
                          compile=compile)
    result = replace(result, checkpoint=str(checkpoint))
    if output_dir is not None:
        result = replace(result, output_dir=str(output_dir))
        write_results(result, output_dir)
    return result
