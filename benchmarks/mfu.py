"""Model FLOPs utilisation (MFU) of the training step: a preset's real shapes, random weights, bf16 autocast.

    python benchmarks/mfu.py [--preset default] [--batch-size 4] [--seq-len 4096] [--samples-per-row 4]
                             [--variants eager-sdpa,compiled-sdpa,compiled-flex,compiled-causal] [--json out.json]

Every variant times the same step (forward, chunked loss, backward, clip, fused AdamW) on the same batch of rows
packed with `--samples-per-row` samples (each: one image split into tiles, then text), after warm-up steps:
- eager-sdpa: no compile; one dense block-causal boolean mask per layer through SDPA;
- compiled-sdpa: every block compiled (`compile_blocks`), still the dense mask;
- compiled-flex: what `nanovlm train --compile` runs on CUDA: compiled blocks + FlexAttention block-sparse masks;
- compiled-causal: the same rows as ONE sample each (no mask: `is_causal` flash attention); an upper bound.

FLOP count method: `torch.utils.flop_counter.FlopCounterMode` counts every matmul/convolution/attention FLOP of
one eager forward + backward of the step. SDPA is counted there as if every query saw every key, so its counted
attention FLOPs are replaced by the attention a packed row really needs (each query over the keys of its own
sample up to itself; vision: every patch over every patch of its view), computed from the batch. The optimizer
and elementwise work are in the time but not in the FLOPs, as in the usual MFU definition (PaLM, appendix B).
MFU = model FLOPs per step / step time / the card's dense bf16 peak (H100/H200 SXM: 989.4 TFLOP/s; `--peak-tflops`
for others). The measured bf16 matmul rate of an 8192^3 product is printed beside it as the practical ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.data.sample import Batch
from nanovlm_cli.memory.estimate import SampleShape, sample_shape, synthetic_batch
from nanovlm_cli.memory.measure import prepare_model
from nanovlm_cli.models.vlm import chunked_cross_entropy, loss_targets
from nanovlm_cli.presets import get_preset
from nanovlm_cli.training.optim import build_optimizer

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.05, "RTX 4090": 165.2}
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "flex_attention")

logger = logging.getLogger("benchmarks.mfu")


def packed_batch(cfg: VLMConfig, batch_size: int, seq_len: int, samples_per_row: int, seed: int = 0) -> Batch:
    """`batch_size` full rows of `samples_per_row` equal samples each: image tokens (one image) first, then text."""
    per_sample = seq_len // samples_per_row
    shape = sample_shape(cfg, per_sample)
    single = synthetic_batch(cfg, shape, batch_size * samples_per_row, seed=seed)
    rows = lambda t: t[:, :per_sample].reshape(batch_size, samples_per_row * per_sample)
    segments = torch.arange(1, samples_per_row + 1).repeat_interleave(per_sample).expand(batch_size, -1).clone()
    return Batch(rows(single.input_ids), rows(single.labels), rows(single.position_ids), segments, single.images,
                 batch_size * samples_per_row)


def unpacked(batch: Batch) -> Batch:
    """The same tokens as one sample per row: positions 0..L-1, one segment."""
    b, t = batch.input_ids.shape
    positions = torch.arange(t, device=batch.input_ids.device).expand(b, t).clone()
    return Batch(batch.input_ids, batch.labels, positions, torch.ones_like(batch.segment_ids), batch.images, b)


def useful_attention_flops(cfg: VLMConfig, batch: Batch, views: int) -> float:
    """Forward + backward attention FLOPs a batch needs: QK^T and AV (2 FLOPs per multiply-add each) over the keys
    each query may see, times 3 (backward = 2 x forward)."""
    lang, vis = cfg.language, cfg.vision
    keys = 0
    for row in batch.segment_ids.cpu():
        _, counts = torch.unique_consecutive(row, return_counts=True)
        keys += sum(n * (n + 1) // 2 for n in counts.tolist())
    lm = 4 * lang.n_heads * lang.head_dim * keys * lang.n_layers
    h = w = cfg.image.tile_size // vis.patch_size
    n = h * w + (1 if vis.use_cls else 0) + vis.n_registers
    vision = 4 * vis.hidden_dim * n * n * vis.n_layers * views
    return 3.0 * (lm + vision)


def count_flops(model: torch.nn.Module, batch: Batch, loss_fn) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.input_ids.is_cuda):
        loss = loss_fn(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    ops = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    attention = sum(n for op, n in ops.items() if any(a in op for a in ATTENTION_OPS))
    return {"total": float(counter.get_total_flops()), "attention_counted": float(attention), "by_op": ops}


def loss_packed(model: Any, batch: Batch) -> torch.Tensor:
    out = model.loss(batch)
    return out.loss_sum / max(out.n_tokens, 1)


def loss_causal(model: Any, batch: Batch) -> torch.Tensor:
    """The loss with no segment ids at all: plain causal attention (is_causal, flash) over each row."""
    hidden = model(batch.input_ids, batch.images, position_ids=batch.position_ids)
    targets, keep = loss_targets(batch)
    total = chunked_cross_entropy(hidden[:, :-1][keep], model.language.output_weight, targets[keep])
    return total / max(int(keep.sum()), 1)


def step_time(model: Any, optimizer: Any, batch: Batch, loss_fn, *, warmup: int, steps: int) -> dict[str, Any]:
    device = batch.input_ids.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, losses = [], []
    t_first = None
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        if i == 0:
            t_first = dt
        if i >= warmup:
            times.append(dt)
        losses.append(float(loss.detach()))
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "first_step_s": t_first,
            "losses": losses}


def matmul_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = get_preset(args.preset)
    cfg = preset.model
    if args.layers:  # a shallower model of the same widths (smoke runs on the CPU)
        cfg = cfg.replace(vision=cfg.vision.replace(n_layers=args.layers),
                          language=cfg.language.replace(n_layers=args.layers, layer_types=None))
    seq_len = args.seq_len or preset.train.max_seq_len
    batch = packed_batch(cfg, args.batch_size, seq_len, args.samples_per_row)
    n_views = len(batch.images)
    shape: SampleShape = sample_shape(cfg, seq_len // args.samples_per_row)
    torch.manual_seed(0)
    train_cfg = TrainConfig(compile=False)
    model, _ = prepare_model(cfg, train_cfg, device)
    batch = batch.to(device)
    flops = count_flops(model, batch, loss_packed)
    useful = flops["total"] - flops["attention_counted"] + useful_attention_flops(cfg, batch, n_views)
    if flops["attention_counted"] == 0:
        logger.warning("the FLOP counter saw no attention op on %s; attention is counted analytically only", device)
    # The same tokens as one sample per row differ only in attention (the counter cannot count GQA is_causal SDPA).
    non_attention = flops["total"] - flops["attention_counted"]
    useful_causal = non_attention + useful_attention_flops(cfg, unpacked(batch), n_views)
    n_params = sum(p.numel() for p in model.parameters())
    peak = peak_tflops(device, args.peak_tflops)
    result: dict[str, Any] = {
        "preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "params": n_params, "peak_bf16_tflops": peak,
        "measured_matmul_tflops": matmul_tflops(device),
        "workload": {"batch_size": args.batch_size, "seq_len": seq_len, "samples_per_row": args.samples_per_row,
                     "views": n_views, "view_size": [shape.view_height, shape.view_width],
                     "image_tokens_per_sample": shape.image_tokens, "supervised_tokens": int(loss_targets(batch)[1].sum())},
        "flops_per_step": {"counted": flops["total"], "counted_attention": flops["attention_counted"],
                           "model_packed": useful, "model_causal": useful_causal},
        "flops_by_op": flops["by_op"],
        "variants": {},
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in args.variants.split(","):
        model.load_state_dict(state)
        optimizer = build_optimizer(model, train_cfg, device)
        compiled = name.startswith("compiled")
        attention = "flex" if name.endswith("flex") else "sdpa"
        if compiled:
            for block in (*model.vision.blocks, *model.language.blocks):
                block.compile()
        model.language.chunk_attention = not compiled
        model.language.attention = attention
        causal = name.endswith("causal")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows, loss_fn, model_flops = (unpacked(batch), loss_causal, useful_causal) if causal else (
            batch, loss_packed, useful)
        try:
            timing = step_time(model, optimizer, rows, loss_fn, warmup=args.warmup, steps=args.steps)
        except Exception as exc:  # noqa: BLE001 (one failed variant must not lose the others' figures)
            logger.error("%s failed: %s", name, exc)
            result["variants"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()[-4000:]}
            continue
        finally:
            for block in (*model.vision.blocks, *model.language.blocks):
                block._compiled_call_impl = None
        achieved = model_flops / timing["median_s"] / 1e12
        result["variants"][name] = {
            **timing, "model_tflops": achieved, "mfu": achieved / peak if peak else None,
            "tokens_per_s": rows.input_ids.numel() / timing["median_s"],
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        logger.info("%s: %.3f s/step, %.1f TFLOP/s", name, timing["median_s"], achieved)
        if args.json:  # after every variant: a time limit loses only the variants not yet run
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_table(result: dict[str, Any]) -> None:
    w = result["workload"]
    print(f"{result['preset']} on {result['device']} (torch {result['torch']}): {result['params'] / 1e6:.0f}M params, "
          f"batch {w['batch_size']} x {w['seq_len']} tokens, {w['samples_per_row']} samples/row, {w['views']} views")
    f = result["flops_per_step"]
    print(f"FLOPs/step: counted {f['counted'] / 1e12:.1f} T (attention {f['counted_attention'] / 1e12:.1f} T as "
          f"dense), model {f['model_packed'] / 1e12:.1f} T packed, {f['model_causal'] / 1e12:.1f} T as one sample/row")
    if result["measured_matmul_tflops"]:
        print(f"peak bf16 {result['peak_bf16_tflops']} TFLOP/s; measured 8192^3 matmul "
              f"{result['measured_matmul_tflops']:.0f} TFLOP/s")
    print(f"{'variant':<18}{'s/step':>10}{'first step':>12}{'TFLOP/s':>10}{'MFU':>8}{'tokens/s':>12}{'peak GiB':>10}")
    for name, v in result["variants"].items():
        if "error" in v:
            print(f"{name:<18} failed: {v['error'][:100]}")
            continue
        mfu = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "-"
        mem = f"{v['peak_memory_gib']:.1f}" if v["peak_memory_gib"] is not None else "-"
        print(f"{name:<18}{v['median_s']:>10.3f}{v['first_step_s']:>12.1f}{v['model_tflops']:>10.1f}{mfu:>8}"
              f"{v['tokens_per_s']:>12.0f}{mem:>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the preset's)")
    parser.add_argument("--samples-per-row", type=int, default=4)
    parser.add_argument("--variants", default="compiled-flex,compiled-causal,eager-sdpa,compiled-sdpa")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--layers", type=int, default=None, help="override both towers' depth (smoke runs)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    result = run(args)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
