"""Memory benchmark: the memory model against measured peaks, and what the memory savings are worth.

Prints a table and writes `benchmarks/results/memory_<device>.json`:
1. accuracy: estimated vs measured peak of a training step for a tiny, a ~20M and a ~100M parameter model;
2. loss: peak memory of the chunked loss vs `F.cross_entropy` on full logits (2048 tokens, 49,152 vocabulary);
3. freezing the vision encoder: optimizer state bytes, measured and estimated;
4. gradient checkpointing on vs off: peak, measured and estimated.
On the CPU every measurement runs in a fresh process and reads its peak resident memory; on CUDA it reads the
allocator's peaks. Run: `OMP_NUM_THREADS=1 python benchmarks/memory.py [--device cuda] [--skip-100m]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.memory import (
    estimate_memory,
    measure_in_subprocess,
    measure_step,
    sample_shape,
)
from nanovlm_cli.models.vlm import LOSS_CHUNK_TOKENS, chunked_cross_entropy
from nanovlm_cli.presets import get_preset

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024**2


def scaled(vision_layers: int, vision_dim: int, lm_layers: int, lm_dim: int, lm_heads: int, lm_kv_heads: int,
           intermediate: int, vocab: int) -> VLMConfig:
    """original_small (SigLIP-224 + SmolLM2 shapes) resized; weights are random."""
    base = get_preset("original_small").model
    vision = base.vision.replace(n_layers=vision_layers, hidden_dim=vision_dim, intermediate_dim=4 * vision_dim,
                                 n_heads=vision_dim // 64)
    language = base.language.replace(n_layers=lm_layers, hidden_dim=lm_dim, intermediate_dim=intermediate,
                                      n_heads=lm_heads, n_kv_heads=lm_kv_heads, vocab_size=vocab)
    # the image token is the first extra row, as the presets fix it (presets._with_extra_vocab)
    return base.replace(vision=vision, language=language, image_token_id=vocab)


MODELS = {
    "tiny": (get_preset("tiny").model, 512, 8),
    "20M": (scaled(4, 256, 6, 384, 6, 2, 1024, 16384), 512, 2),
    "100M": (scaled(6, 512, 12, 576, 9, 3, 1536, 49152), 512, 2),
}


def measure(cfg: VLMConfig, train: TrainConfig, seq_len: int, batch_size: int, device: str) -> dict:
    shape = sample_shape(cfg, seq_len)
    if device == "cpu":
        m = measure_in_subprocess(cfg, train, shape, batch_size)
    else:
        m = measure_step(cfg, train, shape, batch_size, device=device)
    estimate = estimate_memory(cfg, shape, batch_size, train=train, device_type=torch.device(device).type)
    return {"seq_len": seq_len, "batch_size": batch_size, "measured": asdict(m), "estimate": estimate.to_dict(),
            "ratio": estimate.total / m.measured_peak_bytes if m.measured_peak_bytes else None}


# --- loss path: a child process per variant so each peak is clean -----------------------------------------------


def _loss_child(variant: str, tokens: int, vocab: int, hidden_dim: int, device: str) -> int:
    """Peak bytes above the inputs of forward + backward of the loss over `tokens` positions."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_dim, generator=gen).to(dev).requires_grad_()
    weight = (0.02 * torch.randn(vocab, hidden_dim, generator=gen)).to(dev).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(dev)
    small = torch.randn(8, hidden_dim, requires_grad=True)  # load the kernels before the baseline
    F.cross_entropy(F.linear(small, weight.detach().cpu()[:16]), torch.zeros(8, dtype=torch.long)).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        import psutil
        base = psutil.Process().memory_info().rss
    if variant == "full":
        loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    else:  # "chunked" (the model's LOSS_CHUNK_TOKENS) or "chunked<N>"
        chunk = int(variant.removeprefix("chunked") or LOSS_CHUNK_TOKENS)
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
    loss.backward()
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def loss_peak(variant: str, tokens: int, vocab: int, hidden_dim: int, device: str) -> int:
    if device != "cpu":
        return _loss_child(variant, tokens, vocab, hidden_dim, device)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = [sys.executable, __file__, "--loss-child", variant, str(tokens), str(vocab), str(hidden_dim)]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-100m", action="store_true", help="leave out the ~100M model (slow on a CPU)")
    parser.add_argument("--loss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loss_child:
        variant, tokens, vocab, hidden = args.loss_child
        print(_loss_child(variant, int(tokens), int(vocab), int(hidden), "cpu"))
        return
    device = args.device
    results: dict = {"device": device, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                     "threads": torch.get_num_threads()}

    print(f"[1] memory model vs measured peak of a training step ({device})")
    accuracy = {}
    for name, (cfg, seq_len, batch_size) in MODELS.items():
        if name == "100M" and args.skip_100m:
            continue
        row = measure(cfg, TrainConfig(), seq_len, batch_size, device)
        row["params"] = row["estimate"]["grads"] // 4
        accuracy[name] = row
        print(f"  {name:>5} {row['params'] / 1e6:6.1f}M params, bs {batch_size} x {seq_len}: measured "
              f"{row['measured']['measured_peak_bytes'] / MIB:8.1f} MiB, estimated {row['estimate']['total'] / MIB:8.1f} "
              f"MiB, ratio {row['ratio']:.3f}")
    results["accuracy"] = accuracy

    print("[2] chunked loss vs full logits (hidden 256, vocab 49,152)")
    loss_rows = []
    for tokens in (2048, 8192):
        full = loss_peak("full", tokens, 49152, 256, device)
        chunked = loss_peak("chunked", tokens, 49152, 256, device)
        small = loss_peak("chunked256", tokens, 49152, 256, device)
        loss_rows.append({"tokens": tokens, "vocab": 49152, "hidden_dim": 256, "chunk_tokens": LOSS_CHUNK_TOKENS,
                          "full_peak_bytes": full, "chunked_peak_bytes": chunked, "ratio": chunked / full,
                          "chunk_256_peak_bytes": small, "chunk_256_ratio": small / full})
        print(f"  {tokens:>5} tokens: full {full / MIB:8.1f} MiB, chunked ({LOSS_CHUNK_TOKENS}) {chunked / MIB:8.1f} "
              f"MiB, ratio {chunked / full:.3f}; chunks of 256: {small / MIB:7.1f} MiB, ratio {small / full:.3f}")
    results["loss"] = loss_rows

    cfg, seq_len, batch_size = MODELS["20M"]
    print("[3] freezing the vision encoder (20M model)")
    free = measure(cfg, TrainConfig(), seq_len, batch_size, device)
    frozen = measure(cfg, TrainConfig(freeze_vision_encoder=True), seq_len, batch_size, device)
    default_cfg = get_preset("default").model
    default_shape = sample_shape(default_cfg, 4096)
    results["freeze_vision"] = {
        "model": "20M", "unfrozen": free, "frozen": frozen,
        "optimizer_state_ratio": frozen["measured"]["optimizer_state_bytes"] / free["measured"]["optimizer_state_bytes"],
        "default_preset_estimate_cuda": {
            "unfrozen": estimate_memory(default_cfg, default_shape, 2).to_dict(),
            "frozen": estimate_memory(default_cfg, default_shape, 2,
                                      train=TrainConfig(freeze_vision_encoder=True)).to_dict()},
    }
    for label, row in (("trained", free), ("frozen", frozen)):
        print(f"  vision {label:>7}: optimizer state {row['measured']['optimizer_state_bytes'] / MIB:7.1f} MiB "
              f"(estimated {row['estimate']['optimizer'] / MIB:7.1f}), peak {row['measured']['measured_peak_bytes'] / MIB:7.1f} "
              f"MiB (estimated {row['estimate']['total'] / MIB:7.1f})")

    print("[4] gradient checkpointing (20M model, batch 4 x 1024)")
    off = measure(cfg, TrainConfig(), 1024, 4, device)
    on = measure(cfg, TrainConfig(gradient_checkpointing=True), 1024, 4, device)
    results["gradient_checkpointing"] = {"model": "20M", "off": off, "on": on,
                                         "peak_ratio": on["measured"]["measured_peak_bytes"]
                                         / off["measured"]["measured_peak_bytes"]}
    for label, row in (("off", off), ("on", on)):
        print(f"  checkpointing {label:>3}: peak {row['measured']['measured_peak_bytes'] / MIB:7.1f} MiB "
              f"(estimated {row['estimate']['total'] / MIB:7.1f}), step {row['measured']['step_time_s']:.2f} s")

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"memory_{torch.device(device).type}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
