"""LoRA fine-tuning of a trained tiny checkpoint on new shapes questions: held-out accuracy before and after.

1. base: the tiny preset trained from scratch for `--base-steps` steps on the shapes set (generator seed 0);
2. LoRA: adapters (r=16, alpha=32; `--lora-targets`, default the decoder's and the encoder's attention and MLP
   projections) on that checkpoint, projector trained fully (`--lr` for all of them), everything else frozen, trained for `--lora-steps` steps on *new* shapes questions (generator
   seed 1: images and questions the base never saw), starting from the base through `VLMConfig.hub_id`;
3. both checkpoints answer the same held-out questions (eval split, never trained on by either: `--eval-size`
   open short-answer questions, exact match, per category).
Prints a table and writes `benchmarks/results/lora_finetune_cpu.json`.
Run: `OMP_NUM_THREADS=2 python benchmarks/lora_finetune.py [--base-steps 200 --lora-steps 150]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nanovlm_cli.checkpoint.io import load_model
from nanovlm_cli.evaluation.scoring import evaluate_shapes_open
from nanovlm_cli.generation import processor_for
from nanovlm_cli.models.lora import parameter_counts
from nanovlm_cli.presets import get_preset
from nanovlm_cli.training import train

RESULTS = Path(__file__).resolve().parent / "results"


def held_out_accuracy(checkpoint: Path, n: int) -> dict:
    loaded = load_model(checkpoint)
    result = evaluate_shapes_open(loaded.model, processor_for(loaded.model, loaded.tokenizer), n=n, seed=0)
    out = result.to_dict()
    return {"accuracy": out["accuracy"], "by_category": out["by_category"],
            "trainable_at_load": parameter_counts(loaded.model).trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=200)
    parser.add_argument("--lora-steps", type=int, default=150)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--lora-targets", default="language,vision")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the adapters and the projector")
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_finetune_cpu.json")
    args = parser.parse_args()
    preset = get_preset("tiny")
    common = {"eval_size": 0, "validation_steps": 10**6, "save_checkpoint_steps": 10**6,
              "console_log_interval": 10**6, "num_workers": 0}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = train(preset.model, preset.train.replace(max_steps=args.base_steps, output_dir=tmp, run_name="base",
                                                        seed=0, **common))
        base_dir = Path(base.final_checkpoint)
        t_base = time.perf_counter() - t0
        lora_train = preset.train.replace(max_steps=args.lora_steps, output_dir=tmp, run_name="lora", seed=1,
                                          lora_r=16, lora_alpha=32.0, lora_targets=args.lora_targets,
                                          lr_language=args.lr, lr_vision=args.lr, lr_mp=args.lr, warmup_ratio=0.05,
                                          **common)
        t0 = time.perf_counter()
        lora = train(preset.model.replace(hub_id=str(base_dir)), lora_train)
        t_lora = time.perf_counter() - t0
        before = held_out_accuracy(base_dir, args.eval_size)
        after = held_out_accuracy(Path(lora.final_checkpoint), args.eval_size)
        lora_config = json.loads((Path(lora.final_checkpoint) / "config.json").read_text())["lora"]
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "base_steps": args.base_steps,
               "lora_steps": args.lora_steps, "lora_targets": args.lora_targets, "lr": args.lr,
               "eval_size": args.eval_size, "base_train_s": round(t_base, 1),
               "lora_train_s": round(t_lora, 1), "lora_trainable": lora.n_params_trainable,
               "lora_frozen": lora.n_params_frozen, "lora_modules": len(lora_config["modules"]),
               "before": before, "after": after}
    print(f"held-out open accuracy ({args.eval_size} eval-split questions): base {before['accuracy']:.3f} -> "
          f"base + LoRA {after['accuracy']:.3f} ({lora.n_params_trainable:,} trainable of "
          f"{lora.n_params_trainable + lora.n_params_frozen:,})")
    for category in before["by_category"]:
        print(f"  {category:<9} {before['by_category'][category]:.3f} -> {after['by_category'][category]:.3f}")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
