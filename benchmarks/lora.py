"""LoRA vs full fine-tuning: memory of the same training run, measured.

For each model (the tiny preset, and a ~20M-parameter one where weights outweigh activations) and each mode (full
fine-tuning; LoRA r=16 on the language model's attention and MLP projections with the projector trained fully;
LoRA with the projector frozen too) a fresh Python process builds the model, runs 3 AdamW steps on the same
synthetic batch and reports:
- exact tensor bytes: parameters, gradients (counted after the last backward, before zero_grad) and optimizer
  state (after the last step), and their sum;
- the peak resident memory of the process (Linux VmHWM) above its baseline taken after a warm-up step of a
  one-layer model. The CPU has no allocator peak counter, so this is RSS: it includes activations, the allocator's
  slack and anything else the process touches, and is labelled as such.
Prints a table and writes `benchmarks/results/lora_cpu.json`.
Run: `OMP_NUM_THREADS=1 python benchmarks/lora.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from nanovlm_cli.config import TrainConfig, VLMConfig
from nanovlm_cli.memory import sample_shape
from nanovlm_cli.memory.estimate import synthetic_batch
from nanovlm_cli.models.lora import LoRAConfig, apply_lora, parameter_counts
from nanovlm_cli.models.vlm import VisionLanguageModel
from nanovlm_cli.presets import get_preset
from nanovlm_cli.training.optim import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024**2
MODES = {
    "full": None,
    "lora r=16": LoRAConfig(r=16, alpha=32.0),
    "lora r=16, projector frozen": LoRAConfig(r=16, alpha=32.0, train_projector=False),
}


def _scaled_20m() -> VLMConfig:
    base = get_preset("original_small").model
    vision = base.vision.replace(n_layers=4, hidden_dim=256, intermediate_dim=1024, n_heads=4)
    language = base.language.replace(n_layers=6, hidden_dim=384, intermediate_dim=1024, n_heads=6, n_kv_heads=2,
                                     vocab_size=16384)
    # the image token is the first extra row, as the presets fix it (presets._with_extra_vocab)
    return base.replace(vision=vision, language=language, image_token_id=language.vocab_size)


MODELS = {"tiny": (get_preset("tiny").model, 256, 8), "20M": (_scaled_20m(), 512, 2)}


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _build(cfg: VLMConfig, lora: LoRAConfig | None) -> tuple[VisionLanguageModel, torch.optim.Optimizer]:
    model = VisionLanguageModel(cfg).train()
    if lora is not None:
        apply_lora(model, lora)
    return model, build_optimizer(model, TrainConfig(), torch.device("cpu"))


def _step(model, optimizer, batch) -> int:
    """One step; returns the gradient bytes held after backward."""
    model.loss(batch).loss.backward()
    grads = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grads


def child(model_name: str, mode: str, steps: int = 3) -> dict:
    cfg, seq_len, batch_size = MODELS[model_name]
    shape = sample_shape(cfg, seq_len)
    torch.manual_seed(0)
    mini = cfg.replace(vision=cfg.vision.replace(n_layers=1), language=cfg.language.replace(n_layers=1))
    model, optimizer = _build(mini, MODES[mode])  # warm-up: kernels, lazy imports, thread pools
    _step(model, optimizer, synthetic_batch(mini, shape, 1))
    del model, optimizer
    base = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak-RSS counter
    model, optimizer = _build(cfg, MODES[mode])
    batch = synthetic_batch(cfg, shape, batch_size)
    for _ in range(steps):
        grad_bytes = _step(model, optimizer, batch)
    counts = parameter_counts(model)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    param_bytes = _tensor_bytes(model.parameters())
    return {"model": model_name, "mode": mode, "seq_len": seq_len, "batch_size": batch_size,
            "trainable": counts.trainable, "frozen": counts.frozen, "param_bytes": param_bytes,
            "grad_bytes": grad_bytes, "optimizer_state_bytes": _tensor_bytes(state),
            "tensor_bytes": param_bytes + grad_bytes + _tensor_bytes(state),
            "peak_rss_above_baseline_bytes": _peak_rss() - base}


def run(model_name: str, mode: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks leave at once: RSS tracks live tensors
    out = subprocess.run([sys.executable, __file__, "--child", model_name, mode], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    rows = [run(name, mode) for name in MODELS for mode in MODES]
    header = (f"{'model':>5} {'mode':<28} {'trainable':>11} {'frozen':>11} {'params MiB':>10} {'grads MiB':>9} "
              f"{'optim MiB':>9} {'sum MiB':>8} {'peak RSS MiB':>12}")
    print(header)
    for r in rows:
        print(f"{r['model']:>5} {r['mode']:<28} {r['trainable']:>11,} {r['frozen']:>11,} "
              f"{r['param_bytes'] / MIB:>10.1f} {r['grad_bytes'] / MIB:>9.1f} {r['optimizer_state_bytes'] / MIB:>9.1f} "
              f"{r['tensor_bytes'] / MIB:>8.1f} {r['peak_rss_above_baseline_bytes'] / MIB:>12.1f}")
    results = {"device": "cpu", "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "steps": 3,
               "peak_note": "peak RSS (VmHWM) above a post-warm-up baseline, fresh process per row; the CPU has no "
                            "allocator peak counter",
               "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_cpu.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
