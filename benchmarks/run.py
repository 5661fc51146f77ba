"""Speed and memory benchmarks: ours vs the same computation built from transformers modules.

    python benchmarks/run.py [--suite cpu|gpu] [--json out.json] [--quick] [--repeats N] [--sizes tiny,20m]

Cases (see benchmarks/common.py for how the reference is built and what is compared):
- train/<size>: seconds per optimizer step, tokens/s and samples/s on pre-built packed batches (B rows x L tokens,
  shapes images in 2x2 tiles + a global view), ours vs SiglipVisionModel + our projector + LlamaForCausalLM.
- pipeline/<size>: ours only; samples/s with the real data pipeline (TrainLoader over the shapes dataset, the
  Processor encoding in a prefetch thread) vs the pure compute rate on batches drawn from the same loader beforehand;
  up to 3 interleaved rounds, the gap is the median per-round gap.
- generate/<size>/b<B>: prefill and decode tokens/s for one 5-view image prompt (repeated B times), greedy, 64 new
  tokens; our Engine (KV cache) vs `LlamaForCausalLM.generate(inputs_embeds=..., min_new_tokens=max_new_tokens)`.
Every case reports peak memory (RSS on CPU, CUDA peak allocated on GPU). Figures are medians over `--repeats`
interleaved repeats (reference, ours, reference, ours, ...), and the speedup is the per-repeat ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    SIZES,
    ModelPair,
    PeakMemory,
    ReferenceVLM,
    build_pair,
    environment,
    make_optimizer,
    our_loss_fn,
    ratios,
    stats,
    sync_fn,
    train_step,
)
from nanovlm_cli.data.loader import TrainLoader
from nanovlm_cli.data.packing import collate, pack
from nanovlm_cli.data.processor import Processor
from nanovlm_cli.data.shapes import shapes_records
from nanovlm_cli.generation import Engine, SamplingConfig, user_message

SCHEMA_VERSION = 1
TARGETS = {"decode_speedup": 1.5, "train_speedup_tiny": 1.3, "pipeline_gap_max": 0.10}


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _packed_batches(processor: Processor, n: int, rows: int, seq_len: int, seed: int) -> list[Any]:
    """`n` batches of exactly `rows` packed rows padded to `seq_len` tokens (first-fit-decreasing packing)."""
    records = shapes_records(n * rows * (seq_len // 64 + 2) + 8, seed=seed)  # samples are >= 100 tokens
    samples, batches, i = [], [], 0
    while len(batches) < n:
        samples.append(processor.encode(records[i]))
        i += 1
        packed = pack(samples, max_seq_len=seq_len, max_images_per_row=64)
        if len(packed) > rows:  # the last sample opened an extra row: the previous ones fill `rows`
            last = samples.pop()
            packed = pack(samples, max_seq_len=seq_len, max_images_per_row=64)
            batches.append(collate([[samples[j] for j in row] for row in packed], pad_to=seq_len))
            samples = [last]
    return batches


# ------------------------------------------------------------------------------------------------------------------
# Training


def bench_training(pair: ModelPair, processor: Processor, device: torch.device, *, rows: int, seq_len: int,
                   repeats: int) -> dict[str, Any]:
    sync = sync_fn(device)
    batches = [b.to(device) for b in _packed_batches(processor, 2, rows, seq_len, seed=1)]
    ours = copy.deepcopy(pair.ours.model).to(device).train()  # trained copies: the pair's weights stay as built
    ref = ReferenceVLM(pair).to(device).train()
    with torch.no_grad(), _autocast(device):  # same weights, same inputs: the losses agree
        ours_loss = float(our_loss_fn(ours, batches[0])())
        ref_loss = float(ref.loss(batches[0]))
    opt_ours, opt_ref = make_optimizer(ours), make_optimizer(ref)

    def step(which: str, batch: Any) -> float:
        with _autocast(device):
            if which == "ours":
                return train_step(our_loss_fn(ours, batch), ours, opt_ours, sync)
            return train_step(lambda: ref.loss(batch), ref, opt_ref, sync)

    step("reference", batches[0]), step("ours", batches[0])  # warmup
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    peaks = {"reference": 0.0, "ours": 0.0}
    for r in range(repeats):
        for which in ("reference", "ours"):
            with PeakMemory(device) as mem:
                times[which].append(step(which, batches[r % len(batches)]))
            peaks[which] = max(peaks[which], mem.peak_mb)
    samples = statistics_mean([b.n_samples for b in batches])
    tokens = statistics_mean([b.n_tokens for b in batches])
    side = {}
    for which, values in times.items():
        med = stats(values)["median"]
        side[which] = {"step_s": stats(values), "tokens_per_s": tokens / med, "samples_per_s": samples / med,
                       "peak_memory_mb": peaks[which]}
    return {
        "name": f"train/{pair.size.name}", "kind": "train", "model": pair.size.name, "params": pair.n_params,
        "workload": {"rows": rows, "seq_len": seq_len, "samples_per_batch": samples, "real_tokens_per_batch": tokens,
                     "views_per_batch": statistics_mean([len(b.images) for b in batches])},
        "ours": side["ours"], "reference": side["reference"], "speedup": ratios(times["reference"], times["ours"]),
        "parity": {"ours_loss": ours_loss, "reference_loss": ref_loss, "abs_diff": abs(ours_loss - ref_loss)},
        "memory_kind": "cuda_peak_allocated" if device.type == "cuda" else "peak_rss",
    }


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def bench_pipeline(pair: ModelPair, processor: Processor, device: torch.device, *, records_per_batch: int,
                   seq_len: int, steps: int, num_workers: int, rounds: int = 3) -> dict[str, Any]:
    """Ours: samples/s fed live by TrainLoader vs on batches drawn from an identical loader beforehand.

    `rounds` pairs of (compute, pipeline) runs, interleaved; the gap is the median of the per-round gaps, so a
    slow spell of a shared machine shifts one round rather than one side.
    """
    sync = sync_fn(device)
    model = copy.deepcopy(pair.ours.model).to(device).train()
    opt = make_optimizer(model)

    def loader() -> TrainLoader:
        return TrainLoader(shapes_records(records_per_batch * (steps + 2), seed=2), processor.encode,
                           batch_size=records_per_batch, max_seq_len=seq_len, max_images_per_row=64, seed=0,
                           num_workers=num_workers, epochs=1)

    def run(batches: Any) -> tuple[float, int]:
        it = iter(batches)
        with _autocast(device):
            train_step(our_loss_fn(model, next(it).to(device)), model, opt, sync)  # warmup (and first window)
        n, t0 = 0, time.perf_counter()
        for batch in islice(it, steps):
            with _autocast(device):
                train_step(our_loss_fn(model, batch.to(device)), model, opt, sync)
            n += batch.n_samples
        return time.perf_counter() - t0, n

    prebuilt = list(islice(loader(), steps + 1))
    run(prebuilt)  # every batch shape once first: CUDA's per-shape warm-up (allocator, kernel choice) is not compute
    compute, pipeline, peaks = [], [], {"compute": 0.0, "pipeline": 0.0}
    for _ in range(rounds):
        for which, batches, rates in (("compute", prebuilt, compute), ("pipeline", None, pipeline)):
            with PeakMemory(device) as mem:
                seconds, n = run(batches if batches is not None else loader())
            rates.append(n / seconds)
            peaks[which] = max(peaks[which], mem.peak_mb)
    gaps = [1.0 - p / c for c, p in zip(compute, pipeline)]
    return {
        "name": f"pipeline/{pair.size.name}", "kind": "pipeline", "model": pair.size.name,
        "workload": {"records_per_batch": records_per_batch, "seq_len": seq_len, "steps": steps, "rounds": rounds,
                     "num_workers": num_workers, "rows_per_batch": statistics_mean([b.input_ids.shape[0]
                                                                                    for b in prebuilt])},
        "compute_samples_per_s": stats(compute)["median"], "pipeline_samples_per_s": stats(pipeline)["median"],
        "gap": stats(gaps)["median"], "gap_range": stats(gaps), "peak_memory_mb": peaks,
    }


# ------------------------------------------------------------------------------------------------------------------
# Generation


class _NoStop:
    """The processor with no stop tokens, so both sides run exactly max_new_tokens steps."""

    def __init__(self, processor: Processor) -> None:
        self._processor = processor
        self.stop_token_ids: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


def _first_call_timer():
    from transformers import LogitsProcessor

    class FirstCall(LogitsProcessor):
        """Records when generate first asks for scores: the end of its prefill."""

        def __init__(self) -> None:
            self.t_first: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.t_first is None:
                self.t_first = time.perf_counter()
            return scores

    return FirstCall()


def bench_generation(pair: ModelPair, processor: Processor, device: torch.device, *, batch: int, new_tokens: int,
                     repeats: int, dtype: torch.dtype, compiled: bool = False) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    sync = sync_fn(device)
    model = copy.deepcopy(pair.ours.model).to(device, dtype).eval()
    ref = ReferenceVLM(pair).to(device, dtype).eval()
    record = shapes_records(1, seed=3)[0]
    prompt = processor.encode_prompt(user_message("Describe the shapes, their colours and positions.", 1),
                                     list(record.images))
    sampling = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    input_ids = prompt.input_ids[None].expand(batch, -1).to(device)
    images = [v.to(device) for v in prompt.images] * batch
    n_prompt = len(prompt)

    def ours(engine: Engine) -> Callable[[], tuple[float, float, list[list[int]]]]:
        def run() -> tuple[float, float, list[list[int]]]:
            out = engine.generate([prompt] * batch, sampling)
            return out.prefill_s, out.decode_s, out.token_ids
        return run

    def reference(**generate_kwargs: Any) -> Callable[[], tuple[float, float, list[list[int]]]]:
        @torch.inference_mode()
        def run() -> tuple[float, float, list[list[int]]]:
            timer = _first_call_timer()
            sync()
            t0 = time.perf_counter()
            embeds = ref.embed(input_ids, images)  # vision + projector + splice, as our prefill includes
            out = ref.language.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(input_ids.shape, dtype=torch.long, device=device),
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=processor.
                stop_token_ids, pad_token_id=0, logits_processor=LogitsProcessorList([timer]), **generate_kwargs)
            sync()
            t_end = time.perf_counter()
            return timer.t_first - t0, t_end - timer.t_first, out.tolist()
        return run

    sides = {"reference": reference(), "ours": ours(Engine(model, _NoStop(processor)))}
    if compiled:
        # Ours with `Engine(compile=True)` (on a copy: it compiles the model's blocks in place), against transformers'
        # own compiled decoding: its static cache, whose forward `generate` compiles (on every device when asked).
        from transformers import CompileConfig

        compile_config = CompileConfig(fullgraph=False)
        compile_config._compile_all_devices = True
        sides["ours_compiled"] = ours(Engine(copy.deepcopy(model), _NoStop(processor), compile=True))
        sides["reference_compiled"] = reference(cache_implementation="static", compile_config=compile_config)
    for _ in range(2 if compiled else 1):  # warmup; compiled sides compile on their first calls
        for run in sides.values():
            run()
    prefill: dict[str, list[float]] = {which: [] for which in sides}
    decode: dict[str, list[float]] = {which: [] for which in sides}
    peaks = {which: 0.0 for which in sides}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for which, run in sides.items():
            with PeakMemory(device) as mem:
                p, d, tokens[which] = run()
            prefill[which].append(p)
            decode[which].append(d)
            peaks[which] = max(peaks[which], mem.peak_mb)
    side = {w: {"prefill_s": stats(prefill[w]), "decode_s": stats(decode[w]),
                "prefill_tokens_per_s": batch * n_prompt / stats(prefill[w])["median"],
                "decode_tokens_per_s": batch * new_tokens / stats(decode[w])["median"],
                "peak_memory_mb": peaks[w]} for w in prefill}
    match = [a == b for a, b in zip(tokens["ours"], tokens["reference"])]
    extra = {}
    if compiled:
        extra = {"ours_compiled": side["ours_compiled"], "reference_compiled": side["reference_compiled"],
                 "compiled_decode_speedup": ratios(decode["reference"], decode["ours_compiled"]),
                 "compiled_prefill_speedup": ratios(prefill["reference"], prefill["ours_compiled"]),
                 "compiled_vs_compiled_decode_speedup": ratios(decode["reference_compiled"], decode["ours_compiled"]),
                 "compiled_same_tokens_rows": sum(a == b for a, b in zip(tokens["ours_compiled"], tokens["ours"])),
                 "reference_compiled_same_tokens_rows": sum(
                     a == b for a, b in zip(tokens["reference_compiled"], tokens["reference"]))}
    return {
        "name": f"generate/{pair.size.name}/b{batch}", "kind": "generate", "model": pair.size.name,
        "workload": {"batch": batch, "prompt_tokens": n_prompt, "views": len(prompt.images), "new_tokens": new_tokens,
                     "dtype": str(dtype).replace("torch.", "")},
        "ours": side["ours"], "reference": side["reference"],
        "prefill_speedup": ratios(prefill["reference"], prefill["ours"]),
        "decode_speedup": ratios(decode["reference"], decode["ours"]),
        "same_tokens_rows": sum(match), "rows": batch, **extra,
        "memory_kind": "cuda_peak_allocated" if device.type == "cuda" else "peak_rss",
    }


# ------------------------------------------------------------------------------------------------------------------
# Driver


def check_targets(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        if case["kind"] == "generate":
            value = case["decode_speedup"]["median"]
            out.append({"case": case["name"], "metric": "decode_speedup", "target": f">= {TARGETS['decode_speedup']}",
                        "value": value, "met": value >= TARGETS["decode_speedup"]})
            if "compiled_decode_speedup" in case:
                value = case["compiled_decode_speedup"]["median"]
                out.append({"case": case["name"], "metric": "compiled_decode_speedup",
                            "target": f">= {TARGETS['decode_speedup']}", "value": value,
                            "met": value >= TARGETS["decode_speedup"]})
        elif case["kind"] == "train" and case["model"] == "tiny":
            value = case["speedup"]["median"]
            out.append({"case": case["name"], "metric": "train_speedup", "target": f">= {TARGETS['train_speedup_tiny']}",
                        "value": value, "met": value >= TARGETS["train_speedup_tiny"]})
        elif case["kind"] == "pipeline":
            value = case["gap"]
            out.append({"case": case["name"], "metric": "pipeline_gap", "target": f"<= {TARGETS['pipeline_gap_max']}",
                        "value": value, "met": value <= TARGETS["pipeline_gap_max"]})
    return out


def run_suite(suite: str, *, quick: bool, repeats: int, sizes: list[str], num_workers: int = 1,
              compile_decode: bool = False, kinds: tuple[str, ...] = ("train", "pipeline", "generate")
              ) -> dict[str, Any]:
    if suite == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--suite gpu needs a CUDA device; none is visible")
    device = torch.device("cuda" if suite == "gpu" else "cpu")
    gen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, seq_len, new_tokens, gen_batches, pipe_steps = (2, 128, 8, (1, 2), 2) if quick else (8, 512, 64, (1, 8), 6)
    cases: list[dict[str, Any]] = []
    for name in sizes:
        t0 = time.perf_counter()
        pair = build_pair(SIZES[name])
        processor = Processor(pair.ours.cfg, pair.ours.tokenizer)
        if "train" in kinds or "pipeline" in kinds:
            train = bench_training(pair, processor, device, rows=rows, seq_len=seq_len, repeats=repeats)
            if "train" in kinds:
                cases.append(train)
        if "pipeline" in kinds:
            records_per_batch = max(1, round(train["workload"]["samples_per_batch"]))
            cases.append(bench_pipeline(pair, processor, device, records_per_batch=records_per_batch,
                                        seq_len=seq_len, steps=pipe_steps, num_workers=num_workers,
                                        rounds=min(repeats, 3)))
        for b in gen_batches if "generate" in kinds else ():
            cases.append(bench_generation(pair, processor, device, batch=b, new_tokens=new_tokens, repeats=repeats,
                                          dtype=gen_dtype, compiled=compile_decode))
        logging.getLogger("benchmarks").info("%s done in %.1fs", name, time.perf_counter() - t0)
    return {"schema_version": SCHEMA_VERSION, "suite": suite, "quick": quick, "repeats": repeats,
            "environment": environment(device), "cases": cases, "targets": check_targets(cases)}


def _fmt_range(s: dict[str, float]) -> str:
    return f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(case, metric, ours, reference, ours/ref) rows for the printed table."""
    rows = []
    for c in result["cases"]:
        if c["kind"] == "train":
            o, r = c["ours"], c["reference"]
            rows.append((c["name"], "s/step", f"{o['step_s']['median']:.3f}", f"{r['step_s']['median']:.3f}",
                         _fmt_range(c["speedup"])))
            rows.append(("", "tokens/s | samples/s", f"{o['tokens_per_s']:.0f} | {o['samples_per_s']:.1f}",
                         f"{r['tokens_per_s']:.0f} | {r['samples_per_s']:.1f}", ""))
            rows.append(("", "peak MB", f"{o['peak_memory_mb']:.0f}", f"{r['peak_memory_mb']:.0f}", ""))
        elif c["kind"] == "pipeline":
            rows.append((c["name"], "samples/s pipeline vs compute", f"{c['pipeline_samples_per_s']:.1f}",
                         f"{c['compute_samples_per_s']:.1f} (compute)",
                         (f"gap {100 * c['gap']:.1f}% [{100 * c['gap_range']['min']:.1f} to "
                          f"{100 * c['gap_range']['max']:.1f}]")))
        else:
            o, r = c["ours"], c["reference"]
            rows.append((c["name"], "prefill tok/s", f"{o['prefill_tokens_per_s']:.0f}",
                         f"{r['prefill_tokens_per_s']:.0f}", _fmt_range(c["prefill_speedup"])))
            rows.append(("", "decode tok/s", f"{o['decode_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.0f}",
                         _fmt_range(c["decode_speedup"])))
            rows.append(("", "peak MB", f"{o['peak_memory_mb']:.0f}", f"{r['peak_memory_mb']:.0f}",
                         f"same tokens {c['same_tokens_rows']}/{c['rows']}"))
            if "ours_compiled" in c:
                oc = c["ours_compiled"]
                rows.append(("", "compiled: prefill tok/s", f"{oc['prefill_tokens_per_s']:.0f}",
                             f"{r['prefill_tokens_per_s']:.0f}", _fmt_range(c["compiled_prefill_speedup"])))
                rows.append(("", "compiled: decode tok/s", f"{oc['decode_tokens_per_s']:.0f}",
                             f"{r['decode_tokens_per_s']:.0f}", _fmt_range(c["compiled_decode_speedup"])))
                rc = c["reference_compiled"]
                rows.append(("", "both compiled: decode tok/s", f"{oc['decode_tokens_per_s']:.0f}",
                             f"{rc['decode_tokens_per_s']:.0f}", _fmt_range(c["compiled_vs_compiled_decode_speedup"])))
    return rows


def print_table(result: dict[str, Any]) -> None:
    header = ("case", "metric", "ours", "transformers", "speedup (median [min-max])")
    rows = table_rows(result)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        for row in (header, *rows):
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    else:
        table = Table(title=f"nanovlm benchmarks ({result['suite']}, {result['environment']['device']})")
        for h in header:
            table.add_column(h)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    for t in result["targets"]:
        print(f"target {t['case']} {t['metric']} {t['target']}: {t['value']:.3f} -> {'met' if t['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: a smoke run of every case")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per case (default 5; quick 1)")
    parser.add_argument("--sizes", default=None, help="comma-separated model sizes (default tiny,20m; quick tiny)")
    parser.add_argument("--cases", default="train,pipeline,generate", help="which kinds of case to run")
    parser.add_argument("--compile-decode", action="store_true",
                        help="also time compiled generation: ours (Engine(compile=True)) and transformers' (static cache, "
                             "compiled forward)")
    parser.add_argument("--num-workers", type=int, default=1, help="TrainLoader encode threads in the pipeline case")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default 1 on CPU: on a shared machine several intra-op threads "
                             "spin against other processes and ratios swing by 3x; 0 keeps torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("nanovlm_cli").setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = args.threads if args.threads is not None else (1 if args.suite == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    sizes = (args.sizes or ("tiny" if args.quick else "tiny,20m")).split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    repeats = args.repeats or (1 if args.quick else 5)
    result = run_suite(args.suite, quick=args.quick, repeats=repeats, sizes=sizes, num_workers=args.num_workers,
                       compile_decode=args.compile_decode, kinds=tuple(args.cases.split(",")))
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
